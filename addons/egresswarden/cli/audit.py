"""`warden audit ...`: audit log tools.

    warden audit verify [--public-key F]... [--live] FILE...|-   check chain, seq and checkpoint signatures
    warden audit keygen --out-dir DIR [--name N]                 an Ed25519 key pair for checkpoints
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from egresswarden.record.journal import (
    KeyError_,
    VerifyResult,
    generate_key_pair,
    load_public_key,
    verify_chain,
    verify_sources,
)


def _report(result: VerifyResult) -> int:
    for note in result.notes:
        print(f"note: {note}")
    if result.ok:
        print(result.message)
        return 0
    print(f"{result.file}:{result.line}: {result.message} (after {result.records} good records)")
    return 1


def cmd_audit_verify(args: argparse.Namespace) -> int:
    keys = []
    for path in args.public_key or []:
        try:
            keys.append(load_public_key(Path(path).read_bytes()))
        except (OSError, KeyError_) as e:
            print(f"warden: --public-key {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
    if args.files == ["-"]:
        result = verify_sources([("<stdin>", sys.stdin.buffer, False)], keys, live=args.live)
    elif "-" in args.files:
        print("warden: '-' (stdin) cannot be combined with files", file=sys.stderr)
        return 2
    else:
        result = verify_chain(args.files, keys, live=args.live)
    return _report(result)


def cmd_audit_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = out / args.name, out / f"{args.name}.pub"
    if private_path.exists() and not args.force:
        print(f"warden: {private_path} exists; use --force to replace it", file=sys.stderr)
        return 1
    private_pem, public_pem, kid = generate_key_pair()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    print(f"key id {kid}\nprivate key (keep secret; put it in settings.secrets_dir): {private_path}\n"
          f"public key (for `warden audit verify --public-key`): {public_path}\n"
          f"rules: settings: {{audit: {{signing_key: \"${{secret:{args.name}}}\"}}}}")
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="verify audit files (oldest first) or a captured stream ('-' for stdin)",
        description="Checks the hash chain, seq numbers and (with --public-key) every checkpoint signature; "
                    "prints the first bad line as FILE:LINE and exits 1.")
    verify.add_argument("files", nargs="+", metavar="FILE", help="audit files in chain order, or '-' for stdin")
    verify.add_argument("--public-key", action="append", metavar="FILE",
                        help="Ed25519 public key (PEM) of the checkpoint signer; repeatable (key rotation)")
    verify.add_argument("--live", action="store_true",
                        help="the last file belongs to a running Warden: accept records after its last checkpoint")
    verify.set_defaults(func=cmd_audit_verify)
    keygen = audit_sub.add_parser("keygen", help="create an Ed25519 key pair for signed audit checkpoints")
    keygen.add_argument("--out-dir", required=True, metavar="DIR", help="where to write NAME and NAME.pub")
    keygen.add_argument("--name", default="AUDIT_SIGNING_KEY", help="file name of the private key "
                        "(= the secret name; default AUDIT_SIGNING_KEY)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=cmd_audit_keygen)
