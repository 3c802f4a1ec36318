"""`warden audit ...`: audit log tools."""

from __future__ import annotations

import argparse

from egresswarden.record.journal import verify_chain


def cmd_audit_verify(args: argparse.Namespace) -> int:
    result = verify_chain(args.files)
    if result.ok:
        print(result.message)
        return 0
    print(f"{result.file}:{result.line}: {result.message} (after {result.records} good records)")
    return 1


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="verify the hash chain of audit files (oldest first)")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.set_defaults(func=cmd_audit_verify)
