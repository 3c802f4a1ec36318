"""`warden run`: the proxy (one process, or `--workers N` under a supervisor)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egresswarden.cli.common import format_listen, host_port, load_or_report

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"


def cmd_run(args: argparse.Namespace) -> int:
    if load_or_report(args.rules) is None:
        print("warden: refusing to start with invalid rules", file=sys.stderr)
        return 2
    if args.worker_index is None:
        from egresswarden.cli.ca import ca_key_path, init_ca

        if not ca_key_path(Path(args.confdir)).exists():
            # Here, once, before any worker starts: mitmproxy would create an RSA-2048 CA in
            # each process; Warden's default is ECDSA P-256 (cheaper handshakes, issue 17).
            init_ca(Path(args.confdir))
    if args.workers > 1 and args.worker_index is None:
        from egresswarden.runtime.workers import run_workers

        return run_workers(args)
    return run_proxy(args)


def mitmproxy_arguments(args: argparse.Namespace) -> list[str]:
    host, port = args.listen
    margs = [
        "--listen-host", host, "--listen-port", str(port),
        "--set", f"confdir={args.confdir}",
        "--set", f"warden_rules={args.rules}",
        "--set", f"warden_audit_log={args.audit_log}",
        "--set", f"warden_metrics_listen={format_listen(args.metrics_listen)}",
        "--set", "termlog_verbosity=warn" if not args.verbose else "termlog_verbosity=info",
    ]
    for item in args.set or []:
        margs += ["--set", item]
    return margs


def run_proxy(args: argparse.Namespace) -> int:
    from mitmproxy.tools import cmdline, main

    from egresswarden.runtime.master import WardenMaster

    if args.worker_index is not None:
        from egresswarden.runtime.workers import enable_reuse_port

        enable_reuse_port()

    from egresswarden.runtime.eventloop import EventLoopError, install

    try:
        install()  # WARDEN_EVENT_LOOP (asyncio or uvloop); before mitmproxy starts its loop
    except EventLoopError as e:
        print(f"warden: {e}", file=sys.stderr)
        return 2
    Path(args.confdir).mkdir(parents=True, exist_ok=True)
    main.run(WardenMaster, cmdline.mitmdump, mitmproxy_arguments(args))
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--rules", default="rules", metavar="DIR", help="rules directory (default: rules)")
    run.add_argument("--listen", type=host_port, default=host_port(DEFAULT_LISTEN), metavar="HOST:PORT",
                     help=f"proxy listen address (default: {DEFAULT_LISTEN})")
    run.add_argument("--metrics-listen", type=host_port, default=host_port(DEFAULT_METRICS_LISTEN),
                     metavar="HOST:PORT", help=f"/metrics and /healthz listen address (default: {DEFAULT_METRICS_LISTEN})")
    run.add_argument("--audit-log", default="audit.jsonl", metavar="PATH",
                     help="audit log file, or '-' for stdout (default: audit.jsonl)")
    run.add_argument("--confdir", default="certs", metavar="DIR",
                     help="mitmproxy confdir holding the interception CA (default: certs)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="run N proxy processes on one port (SO_REUSEPORT); metrics merged, one audit chain "
                          "per worker in <audit>.w<i>.jsonl (default: 1)")
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--set", action="append", metavar="NAME=VALUE", help="set a mitmproxy option (repeatable)")
    run.add_argument("-v", "--verbose", action="store_true", help="log mitmproxy's info messages too")
    run.set_defaults(func=cmd_run)
