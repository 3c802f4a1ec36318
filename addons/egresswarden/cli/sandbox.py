"""`warden sandbox`: run a command in bubblewrap whose only way out is Warden (see egresswarden.sandbox)."""

from __future__ import annotations

import argparse
import os
import re
import sys

_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def cmd_sandbox(args: argparse.Namespace) -> int:
    from egresswarden.sandbox.launcher import EXIT_SANDBOX_FAILED, Options, run

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("warden sandbox: no command given: warden sandbox --agent ID [...] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    if not _AGENT_ID.match(args.agent):
        print(f"warden sandbox: invalid agent id {args.agent!r}", file=sys.stderr)
        return 2
    if args.attach and (args.audit_log or args.confdir or args.set or args.rules_given):
        print("warden sandbox: --rules, --audit-log, --confdir and --set configure the embedded Warden; with "
              "--attach the running Warden's own settings and audit log apply", file=sys.stderr)
        return 2
    opts = Options(agent=args.agent, command=command, workdir=args.workdir or os.getcwd(), profile=args.profile,
                   attach=args.attach, rules=args.rules or "rules", audit_log=args.audit_log, confdir=args.confdir,
                   limits_backend=args.limits_backend, warden_set=list(args.set or []), verbose=args.verbose)
    try:
        return run(opts)
    except KeyboardInterrupt:
        return EXIT_SANDBOX_FAILED


class _RulesAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.rules_given = True


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sandbox", help="run a command in a sandbox whose only way out is Warden (Linux, bubblewrap)",
                       description="Run CMD in bubblewrap: loopback-only network bridged to Warden, read-only root, "
                                   "read-write workdir, denied paths absent, allowlisted environment.")
    p.add_argument("--agent", required=True, metavar="ID", help="the agent the sandbox is identified as")
    p.add_argument("--profile", metavar="NAME",
                   help="sandbox profile (default: the agent's sandbox_profile, else 'default'); refused if the "
                        "agent is bound to another")
    p.add_argument("--workdir", metavar="DIR", help="read-write working directory (default: the current directory)")
    p.add_argument("--attach", metavar="ADMIN_SOCKET",
                   help="use the running Warden behind this admin socket (warden run --admin-socket) instead of "
                        "starting one")
    p.add_argument("--rules", metavar="DIR", action=_RulesAction, default=None,
                   help="embedded mode: rules directory (default: rules)")
    p.add_argument("--audit-log", metavar="PATH",
                   help="embedded mode: audit log (default: $XDG_STATE_HOME/warden/sandbox-audit.jsonl)")
    p.add_argument("--confdir", metavar="DIR",
                   help="embedded mode: interception CA directory (default: $XDG_STATE_HOME/warden/certs)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="embedded mode: a mitmproxy option for the embedded Warden (repeatable)")
    p.add_argument("--limits-backend", choices=("auto", "cgroup", "rlimit"), default="auto",
                   help="how profile limits are enforced: auto (cgroup v2, v1, else rlimits), cgroup (refuse "
                        "without one), rlimit (default: auto)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the bubblewrap command line")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_sandbox, rules_given=False)
