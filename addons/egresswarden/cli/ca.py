"""Interception CA lifecycle for Warden: ``warden ca init|bundle|rotate``.

Warden is mitmproxy underneath, so the CA lives in mitmproxy's confdir
layout and mitmproxy loads it unchanged at start-up:

* ``mitmproxy-ca.pem``       private key + cert (mode 0600; mitmproxy signs leaves with it)
* ``mitmproxy-ca.p12``       same, PKCS#12 (mode 0600)
* ``mitmproxy-ca-cert.pem``  public cert only (what clients must trust)
* ``mitmproxy-ca-cert.cer`` / ``mitmproxy-ca-cert.p12`` / ``mitmproxy-dhparam.pem``

Rotation keeps the *public* cert of the previous CA in ``previous/`` and
records until when it stays in the client bundle in ``warden-ca-rotation.json``.
The previous private key is deleted: nothing may sign with it again.

Why the overlap works without downtime: mitmproxy reads the CA only when the
process starts. So after ``warden ca rotate`` the running Warden still signs
with the old CA while the new bundle (old + new CA) is pushed to agents; when
Warden restarts it signs with the new CA, which agents already trust. After
the overlap window the old cert drops out of the bundle.

Key type (issue 17): mitmproxy signs every leaf certificate with the CA key and gives the
leaf the CA's own public key, so the CA's key type is the key type of every intercepted
handshake. An ECDSA P-256 key makes the signature in each TLS handshake far cheaper than
RSA-2048 (the cost that dominates a new intercepted connection), so ``--key-type ecdsa`` is
the default for new CAs. mitmproxy itself only generates RSA CAs, so Warden writes the EC
store itself, in the same layout; an existing RSA CA keeps working unchanged (mitmproxy
loads either), and ``--key-type rsa`` still creates one for clients that need it.

The owner's ``addons/cli.py`` calls :func:`add_cli`; ``python -m addons.ca``
works standalone (used by tests and before the main CLI exists).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import secrets
import shutil
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mitmproxy import certs
from mitmproxy.certs import CertStore

BASENAME = "mitmproxy"  # mitmproxy's fixed file prefix; it only looks for these names
KEY_SIZE = 2048  # RSA CAs
KEY_TYPES = ("ecdsa", "rsa")
DEFAULT_KEY_TYPE = "ecdsa"  # measured: see README "Performance" (intercepted, new connection)
DEFAULT_CONFDIR = "certs"
DEFAULT_OVERLAP_DAYS = 14
ROTATION_FILE = "warden-ca-rotation.json"
PREVIOUS_DIR = "previous"
BUNDLE_NAME = "warden-ca-bundle.pem"
ORGANIZATION = "Warden"

# Files that contain the private key: these must never be group/world readable.
SECRET_FILES = (f"{BASENAME}-ca.pem", f"{BASENAME}-ca.p12")
# Everything create_store writes; all replaced together on rotation.
STORE_FILES = SECRET_FILES + (
    f"{BASENAME}-ca-cert.pem",
    f"{BASENAME}-ca-cert.cer",
    f"{BASENAME}-ca-cert.p12",
    f"{BASENAME}-dhparam.pem",
)


class CAError(Exception):
    """A user-facing CA problem (printed, exit code 1)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ca_key_path(confdir: Path) -> Path:
    return confdir / f"{BASENAME}-ca.pem"


def ca_cert_path(confdir: Path) -> Path:
    return confdir / f"{BASENAME}-ca-cert.pem"


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _unique_cn() -> str:
    # A distinct subject per generation: during a rotation overlap two Warden CAs
    # sit in the same trust store, and identical subjects make some verifiers
    # (OpenSSL issuer lookup by name, Java keystores by alias) pick the wrong one.
    return f"Warden interception CA {_now():%Y-%m-%d} {secrets.token_hex(3)}"


def key_type_of(cert: x509.Certificate) -> str:
    """"ecdsa" or "rsa" (or the key class name for anything else)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ecdsa"
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    return type(key).__name__


def _create_ec_store(path: Path, cn: str) -> None:
    """mitmproxy's `CertStore.create_store` layout and CA extensions, with an ECDSA P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(name)
        .issuer_name(name)
        .not_valid_before(now + certs.CERT_VALIDITY_OFFSET)
        .not_valid_after(now + certs.CERT_VALIDITY_OFFSET + certs.CA_EXPIRY)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(private_key=key, algorithm=hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    with CertStore.umask_secret():
        (path / f"{BASENAME}-ca.pem").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()) + pem_cert)
        (path / f"{BASENAME}-ca.p12").write_bytes(pkcs12.serialize_key_and_certificates(
            BASENAME.encode(), key, cert, None, serialization.NoEncryption()))
    (path / f"{BASENAME}-ca-cert.pem").write_bytes(pem_cert)
    (path / f"{BASENAME}-ca-cert.cer").write_bytes(pem_cert)
    (path / f"{BASENAME}-ca-cert.p12").write_bytes(pkcs12.serialize_key_and_certificates(
        BASENAME.encode(), None, cert, None, serialization.NoEncryption()))
    (path / f"{BASENAME}-dhparam.pem").write_bytes(certs.DEFAULT_DHPARAM)


def _check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise CAError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def _generate_into(confdir: Path, key_type: str = DEFAULT_KEY_TYPE) -> x509.Certificate:
    """Create a fresh CA in a staging dir, then move it into confdir.

    Staging in the same directory keeps os.replace atomic per file, so a crash
    never leaves mitmproxy-ca.pem half-written (mitmproxy would fail to start).
    """
    _check_key_type(key_type)
    staging = Path(tempfile.mkdtemp(prefix=".ca-staging-", dir=confdir))
    try:
        if key_type == "rsa":
            CertStore.create_store(staging, BASENAME, KEY_SIZE, organization=ORGANIZATION, cn=_unique_cn())
        else:
            _create_ec_store(staging, _unique_cn())
        for name in SECRET_FILES:
            os.chmod(staging / name, 0o600)  # explicit, independent of the caller's umask
        for name in STORE_FILES:
            os.replace(staging / name, confdir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_cert(ca_cert_path(confdir))


def _ensure_confdir(confdir: Path) -> None:
    if not confdir.exists():
        confdir.mkdir(parents=True)
        os.chmod(confdir, 0o700)  # holds the CA key; only the Warden user needs it


def init_ca(confdir: Path, force: bool = False, key_type: str = DEFAULT_KEY_TYPE) -> x509.Certificate:
    _check_key_type(key_type)  # before anything is created
    _ensure_confdir(confdir)
    if ca_key_path(confdir).exists() and not force:
        raise CAError(f"a CA already exists in {confdir} (use --force to replace it, or 'warden ca rotate')")
    return _generate_into(confdir, key_type)


def _read_rotation(confdir: Path) -> dict[str, Any]:
    path = confdir / ROTATION_FILE
    if not path.exists():
        return {"previous": []}
    data: dict[str, Any] = json.loads(path.read_text())
    data.setdefault("previous", [])
    return data


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def rotate_ca(confdir: Path, overlap_days: int,
              key_type: str = DEFAULT_KEY_TYPE) -> tuple[x509.Certificate, x509.Certificate]:
    """Replace the CA; keep the old public cert trusted for ``overlap_days``. Returns (old, new)."""
    _check_key_type(key_type)  # before the previous cert is moved aside
    if overlap_days < 0:
        raise CAError("--overlap-days must be >= 0")
    if not ca_key_path(confdir).exists():
        raise CAError(f"no CA in {confdir}; run 'warden ca init' first")
    old = load_cert(ca_cert_path(confdir))
    fp = fingerprint(old)
    prev_dir = confdir / PREVIOUS_DIR
    prev_dir.mkdir(exist_ok=True)
    kept = prev_dir / f"ca-{fp[:16]}.pem"
    # Public cert only: the old key is overwritten by _generate_into below.
    kept.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    os.chmod(kept, 0o644)

    rotated_at = _now()
    overlap_until = rotated_at + datetime.timedelta(days=overlap_days)
    data = _read_rotation(confdir)
    # Drop entries whose overlap has ended so the file does not grow forever.
    data["previous"] = [p for p in data["previous"] if _parse_ts(p["overlap_until"]) > rotated_at]
    data["previous"].append(
        {
            "cert": f"{PREVIOUS_DIR}/{kept.name}",
            "fingerprint_sha256": fp,
            "subject": old.subject.rfc4514_string(),
            "rotated_at": rotated_at.isoformat(),
            "overlap_until": overlap_until.isoformat(),
        }
    )
    new = _generate_into(confdir, key_type)
    data["current_fingerprint_sha256"] = fingerprint(new)
    _write_json_atomic(confdir / ROTATION_FILE, data)
    return old, new


def _parse_ts(value: str) -> datetime.datetime:
    ts = datetime.datetime.fromisoformat(value)
    return ts if ts.tzinfo else ts.replace(tzinfo=datetime.UTC)


def previous_certs_in_overlap(confdir: Path, now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """Previous CA certs still inside their overlap window and not expired."""
    now = now or _now()
    out: list[x509.Certificate] = []
    for entry in _read_rotation(confdir)["previous"]:
        if _parse_ts(entry["overlap_until"]) <= now:
            continue
        path = confdir / entry["cert"]
        if not path.exists():
            continue
        cert = load_cert(path)
        if cert.not_valid_after_utc <= now:
            continue
        out.append(cert)
    return out


# Where distributions keep the system trust store as one PEM file (first existing wins):
# Debian/Ubuntu, RHEL/Fedora, openSUSE, Alpine/macOS/BSD.
SYSTEM_ROOT_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


def system_roots_file(explicit: str | None = None) -> Path:
    """The system's CA bundle file: `explicit`, else OpenSSL's compiled-in file, else a known path."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CAError(f"--system-roots {explicit}: no such file")
        return path
    candidates = [ssl.get_default_verify_paths().openssl_cafile, *SYSTEM_ROOT_FILES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise CAError("no system trust store found (looked at " + ", ".join(c for c in candidates if c)
                  + "); name the file: --system-roots=/path/to/ca-bundle.pem")


def read_extra_certs(path: Path) -> list[x509.Certificate]:
    """The certificates in a PEM file given with --extra-ca. Only certificates are taken:
    a file that also holds a private key is refused, so a key can never ride along."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CAError(f"--extra-ca {path}: {e.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise CAError(f"--extra-ca {path} contains a private key; give the CA certificate only")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(f"--extra-ca {path}: no PEM certificate found (DER? convert with "
                      "`openssl x509 -inform der -in FILE -out FILE.pem`)") from None
    return certs


def _pem_roots(path: Path, what: str) -> bytes:
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise CAError(f"{what} {path} contains a private key; refusing to copy it into a bundle")
    return data.rstrip(b"\n") + b"\n"


def build_bundle(confdir: Path, include_public_roots: bool = True, extra_cas: list[Path] | None = None,
                 system_roots: Path | None = None) -> bytes:
    """Public roots (certifi, or the system store) + extra CAs + current Warden CA +
    previous CA(s) in overlap."""
    if not ca_cert_path(confdir).exists():
        raise CAError(f"no CA in {confdir}; run 'warden ca init' first")
    current = load_cert(ca_cert_path(confdir))
    parts: list[bytes] = []
    if system_roots is not None:
        # The system store holds what certifi lacks: an organisation's internal roots,
        # which passed-through internal hosts present.
        parts.append(f"# System trust store {system_roots}\n".encode())
        parts.append(_pem_roots(system_roots, "system trust store"))
    elif include_public_roots:
        # Agents talk to passthrough hosts with the origin's real certificate,
        # so the bundle must still trust the public Web PKI, not only Warden.
        parts.append(Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n")
    for extra in extra_cas or []:
        for cert in read_extra_certs(extra):
            parts.append(f"# Extra CA from {extra}: {cert.subject.rfc4514_string()}\n".encode())
            parts.append(cert.public_bytes(serialization.Encoding.PEM))
    parts.append(f"# Warden interception CA (current) {current.subject.rfc4514_string()}\n".encode())
    # Re-serialise from the parsed cert rather than copying files: guarantees
    # only a CERTIFICATE block can end up in the output.
    parts.append(current.public_bytes(serialization.Encoding.PEM))
    for prev in previous_certs_in_overlap(confdir):
        parts.append(
            f"# Warden interception CA (previous, rotation overlap) {prev.subject.rfc4514_string()}\n".encode()
        )
        parts.append(prev.public_bytes(serialization.Encoding.PEM))
    bundle = b"".join(parts)
    if b"PRIVATE KEY" in bundle:  # defence in depth; cannot happen by construction
        raise CAError("refusing to write a bundle that contains a private key")
    return bundle


def write_bundle(confdir: Path, out: Path, include_public_roots: bool = True, extra_cas: list[Path] | None = None,
                 system_roots: Path | None = None) -> Path:
    data = build_bundle(confdir, include_public_roots, extra_cas, system_roots)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)  # public material; agents running as other users must read it
    os.replace(tmp, out)  # atomic: an agent never reads a half-written bundle
    return out


# ---------------------------------------------------------------- CLI glue


def _cmd_init(args: argparse.Namespace) -> int:
    confdir = Path(args.confdir)
    if args.exist_ok and ca_key_path(confdir).exists() and not args.force:
        print(f"CA already present in {confdir}; leaving it unchanged")
        return 0
    try:
        cert = init_ca(confdir, force=args.force, key_type=args.key_type)
    except CAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"created {key_type_of(cert)} CA {cert.subject.rfc4514_string()} sha256={fingerprint(cert)} in {confdir}")
    print(f"distribute {ca_cert_path(confdir)} or the output of 'warden ca bundle' to agents")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    confdir = Path(args.confdir)
    out = Path(args.out) if args.out else confdir / BUNDLE_NAME
    try:
        if args.warden_only and args.system_roots is not None:
            raise CAError("--warden-only and --system-roots exclude each other")
        roots = system_roots_file(args.system_roots or None) if args.system_roots is not None else None
        extras = [Path(p) for p in args.extra_ca or []]
        write_bundle(confdir, out, include_public_roots=not args.warden_only, extra_cas=extras, system_roots=roots)
        if roots is not None:
            print(f"roots: system store {roots}")
        for extra in extras:
            print(f"extra CA: {extra}")
    except CAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    confdir = Path(args.confdir)
    try:
        old, new = rotate_ca(confdir, args.overlap_days, key_type=args.key_type)
    except CAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"rotated CA: old sha256={fingerprint(old)} new sha256={fingerprint(new)}")
    print(
        "next: 1) 'warden ca bundle' and ship the bundle to agents (it trusts old and new for "
        f"{args.overlap_days} days); 2) restart Warden so it signs with the new CA; "
        "3) agents that re-read the bundle keep working; after the overlap regenerate the bundle"
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ca init|bundle|rotate`` on the owner's top-level subparsers."""
    ca = subparsers.add_parser("ca", help="manage the interception CA and the client trust bundle")
    sub = ca.add_subparsers(dest="ca_command", metavar="{init,bundle,rotate}")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--confdir",
            default=DEFAULT_CONFDIR,
            help=f"mitmproxy confdir holding the CA (default: {DEFAULT_CONFDIR}/)",
        )

    def key_type(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--key-type",
            choices=KEY_TYPES,
            default=DEFAULT_KEY_TYPE,
            help=f"CA (and so leaf certificate) key: ecdsa = P-256, cheaper handshakes; rsa = 2048 bit "
            f"(default: {DEFAULT_KEY_TYPE})",
        )

    p_init = sub.add_parser("init", help="create the interception CA (refuses to overwrite)")
    common(p_init)
    key_type(p_init)
    p_init.add_argument("--force", action="store_true", help="replace an existing CA (agents must re-trust)")
    p_init.add_argument(
        "--exist-ok",
        action="store_true",
        help="exit 0 without changes if a CA exists (idempotent init containers)",
    )
    p_init.set_defaults(func=_cmd_init)

    p_bundle = sub.add_parser("bundle", help="write the client trust bundle (public roots + Warden CA)")
    common(p_bundle)
    p_bundle.add_argument("--out", help=f"output path (default: <confdir>/{BUNDLE_NAME})")
    p_bundle.add_argument(
        "--warden-only",
        action="store_true",
        help="only Warden's CA cert(s), no public roots (for NODE_EXTRA_CA_CERTS-style 'extra' variables)",
    )
    p_bundle.add_argument(
        "--extra-ca",
        action="append",
        metavar="FILE",
        help="also trust the CA certificate(s) in this PEM file, e.g. an internal CA that signs passed-through "
        "hosts (repeatable)",
    )
    p_bundle.add_argument(
        "--system-roots",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="use the system trust store instead of certifi's roots (default file: OpenSSL's, else "
        "/etc/ssl/certs/ca-certificates.crt and other distributions' paths)",
    )
    p_bundle.set_defaults(func=_cmd_bundle)

    p_rotate = sub.add_parser("rotate", help="new CA; keep the previous cert in the bundle during an overlap")
    common(p_rotate)
    key_type(p_rotate)
    p_rotate.add_argument(
        "--overlap-days",
        type=int,
        default=DEFAULT_OVERLAP_DAYS,
        help=f"days the previous CA stays in the bundle (default: {DEFAULT_OVERLAP_DAYS})",
    )
    p_rotate.set_defaults(func=_cmd_rotate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warden")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
