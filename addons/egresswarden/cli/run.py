"""`warden run`: the proxy (one process, or `--workers N` under a supervisor)."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from egresswarden.cli.common import format_listen, host_port, load_or_report
from egresswarden.runtime.connlimits import raise_descriptor_limit

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"


def address_in_use(host: str, port: int) -> bool:
    """Would binding the proxy address fail because something already listens there?

    Checked before mitmproxy starts, so the operator reads Warden's words instead of
    mitmproxy's `--mode regular@...` hint. SO_REUSEADDR as asyncio sets it: a port held
    only by TIME_WAIT connections is free, a listening socket is not. (If another process
    takes the port in between, mitmproxy's own error still stops the start.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def cmd_run(args: argparse.Namespace) -> int:
    if load_or_report(args.rules) is None:
        print("warden: refusing to start with invalid rules", file=sys.stderr)
        return 2
    if args.admin_socket and args.workers > 1:
        print("warden: --admin-socket (warden sandbox --attach) needs --workers 1", file=sys.stderr)
        return 2
    if args.worker_index is None and args.listen[1] != 0 and address_in_use(*args.listen):
        print(f"warden: {format_listen(args.listen)} is already in use (another Warden?); "
              "pick another with --listen", file=sys.stderr)
        return 1
    if args.worker_index is None:
        from egresswarden.cli.ca import ca_key_path, init_ca

        if not ca_key_path(Path(args.confdir)).exists():
            # Here, once, before any worker starts: mitmproxy would create an RSA-2048 CA in
            # each process; Warden's default is ECDSA P-256 (cheaper handshakes, issue 17).
            init_ca(Path(args.confdir))
    raise_descriptor_limit()  # inherited by the workers; warden_max_connections' default reads it
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
        "--set", f"warden_log_format={args.log_format}",
    ]
    if args.admin_socket:
        margs += ["--set", f"warden_admin_socket={args.admin_socket}"]
    for item in args.set or []:
        margs += ["--set", item]
    return margs


def _mirrors_to_stdout(rules_dir: str) -> bool:
    from egresswarden.core.errors import WardenError
    from egresswarden.core.validate import load_model

    try:
        return load_model(Path(rules_dir)).settings.audit.stdout
    except WardenError:
        return False  # reported by the proxy itself


def run_proxy(args: argparse.Namespace) -> int:
    from mitmproxy.tools import cmdline, main

    from egresswarden.runtime.master import WardenMaster

    if args.worker_index is not None:
        from egresswarden.runtime.workers import prepare_worker

        prepare_worker()

    if args.audit_log == "-" or _mirrors_to_stdout(args.rules):
        from egresswarden.record.journal import claim_stdout

        claim_stdout()  # stdout carries audit records only; every other line goes to stderr
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
    run.add_argument("--admin-socket", metavar="PATH", default="",
                     help="unix socket for `warden sandbox --attach` (0600, in a 0700 directory; default: off)")
    run.add_argument("--set", action="append", metavar="NAME=VALUE", help="set a mitmproxy option (repeatable)")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="operational log format on stderr (default: text); audit records are separate")
    run.add_argument("-v", "--verbose", action="store_true", help="log mitmproxy's info messages too")
    run.set_defaults(func=cmd_run)
