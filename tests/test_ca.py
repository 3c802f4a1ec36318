"""CA lifecycle (cli/ca.py) against real files and a real mitmdump.

The end-to-end tests prove the point of the CA: a stock mitmdump pointed at
the confdir we created signs intercepted hosts with *our* CA, and an agent
that trusts only our bundle accepts it — including across a rotation.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID
from egresswarden.cli import ca

REPO = Path(__file__).resolve().parents[1]

VENV_BIN = Path(sys.executable).parent
MITMDUMP = VENV_BIN / "mitmdump"
STARTUP_TIMEOUT_S = 20.0
IO_TIMEOUT_S = 10.0


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process: exercises argparse wiring and exit codes for real."""
    return subprocess.run(
        [sys.executable, "-m", "egresswarden.cli.ca", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def pem_fingerprints(path: Path) -> list[str]:
    """SHA-256 of each certificate block.

    Not parsed with cryptography on purpose: certifi ships a legacy root with a
    negative serial that newer cryptography versions warn about (or reject).
    """
    return [
        hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group().decode())).hexdigest()
        for m in PEM_BLOCK.finditer(path.read_bytes())
    ]


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# ---------------------------------------------------------------- files


def test_init_layout_modes_and_refuse_overwrite(tmp_path: Path) -> None:
    confdir = tmp_path / "certs"
    r = run_cli("ca", "init", "--confdir", str(confdir))
    assert r.returncode == 0, r.stderr
    for name in ca.STORE_FILES:
        assert (confdir / name).is_file(), name
    # Private key material: owner-only.
    for name in ca.SECRET_FILES:
        assert stat.S_IMODE((confdir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(confdir.stat().st_mode) == 0o700
    # mitmproxy reads key + cert from mitmproxy-ca.pem; the public file has no key.
    assert b"PRIVATE KEY" in (confdir / "mitmproxy-ca.pem").read_bytes()
    assert b"PRIVATE KEY" not in (confdir / "mitmproxy-ca-cert.pem").read_bytes()
    cert = ca.load_cert(ca.ca_cert_path(confdir))
    assert cn(cert).startswith("Warden interception CA")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    before = (confdir / "mitmproxy-ca.pem").read_bytes()
    r = run_cli("ca", "init", "--confdir", str(confdir))
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == before, "refused init must not touch the CA"

    r = run_cli("ca", "init", "--confdir", str(confdir), "--exist-ok")
    assert r.returncode == 0
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == before

    r = run_cli("ca", "init", "--confdir", str(confdir), "--force")
    assert r.returncode == 0
    assert (confdir / "mitmproxy-ca.pem").read_bytes() != before
    assert not list(confdir.glob(".ca-staging-*")), "staging dir must be cleaned up"


def test_bundle_has_public_roots_and_ca_but_no_private_key(tmp_path: Path) -> None:
    confdir = tmp_path / "certs"
    assert run_cli("ca", "bundle", "--confdir", str(confdir)).returncode == 1  # no CA yet
    assert ca.main(["ca", "init", "--confdir", str(confdir)]) == 0
    out = tmp_path / "shared" / "bundle.pem"
    r = run_cli("ca", "bundle", "--confdir", str(confdir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    raw = out.read_bytes()
    assert b"PRIVATE KEY" not in raw
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    fps = pem_fingerprints(out)
    assert ca.fingerprint(ca.load_cert(ca.ca_cert_path(confdir))) in fps
    import certifi

    assert len(fps) == len(pem_fingerprints(Path(certifi.where()))) + 1
    # Default output location and the --warden-only variant.
    assert ca.main(["ca", "bundle", "--confdir", str(confdir)]) == 0
    assert (confdir / ca.BUNDLE_NAME).is_file()
    only = tmp_path / "only.pem"
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(only), "--warden-only"]) == 0
    assert len(pem_fingerprints(only)) == 1


def test_rotation_overlap_contents(tmp_path: Path) -> None:
    confdir = tmp_path / "certs"
    assert run_cli("ca", "rotate", "--confdir", str(confdir)).returncode == 1  # nothing to rotate
    assert ca.main(["ca", "init", "--confdir", str(confdir)]) == 0
    old = ca.load_cert(ca.ca_cert_path(confdir))
    old_key = (confdir / "mitmproxy-ca.pem").read_bytes()

    r = run_cli("ca", "rotate", "--confdir", str(confdir), "--overlap-days", "7")
    assert r.returncode == 0, r.stderr
    new = ca.load_cert(ca.ca_cert_path(confdir))
    assert ca.fingerprint(new) != ca.fingerprint(old)
    assert cn(new) != cn(old), "distinct subjects keep issuer lookup unambiguous during overlap"
    assert (confdir / "mitmproxy-ca.pem").read_bytes() != old_key
    for name in ca.SECRET_FILES:
        assert stat.S_IMODE((confdir / name).stat().st_mode) == 0o600

    # The previous *public* cert is kept; its key is gone from confdir entirely.
    meta = json.loads((confdir / ca.ROTATION_FILE).read_text())
    assert meta["current_fingerprint_sha256"] == ca.fingerprint(new)
    (entry,) = meta["previous"]
    assert entry["fingerprint_sha256"] == ca.fingerprint(old)
    until = datetime.datetime.fromisoformat(entry["overlap_until"])
    rotated = datetime.datetime.fromisoformat(entry["rotated_at"])
    assert until - rotated == datetime.timedelta(days=7)
    old_key_body = old_key.split(b"-----END RSA PRIVATE KEY-----")[0]
    for f in confdir.rglob("*"):
        if f.is_file() and f.suffix == ".pem":
            assert old_key_body not in f.read_bytes(), f"old private key survived in {f}"

    bundle = tmp_path / "b.pem"
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(bundle)]) == 0
    fps = set(pem_fingerprints(bundle))
    assert {ca.fingerprint(old), ca.fingerprint(new)} <= fps
    assert b"PRIVATE KEY" not in bundle.read_bytes()

    # Once the overlap has ended the old CA drops out of the bundle.
    entry["overlap_until"] = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)).isoformat()
    (confdir / ca.ROTATION_FILE).write_text(json.dumps(meta))
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(bundle)]) == 0
    fps = set(pem_fingerprints(bundle))
    assert ca.fingerprint(new) in fps and ca.fingerprint(old) not in fps

    # --overlap-days 0: the previous CA is never in the bundle; expired entries are pruned.
    assert ca.main(["ca", "rotate", "--confdir", str(confdir), "--overlap-days", "0"]) == 0
    newest = ca.load_cert(ca.ca_cert_path(confdir))
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(bundle)]) == 0
    fps = set(pem_fingerprints(bundle))
    assert ca.fingerprint(newest) in fps and ca.fingerprint(new) not in fps
    meta = json.loads((confdir / ca.ROTATION_FILE).read_text())
    assert [e["fingerprint_sha256"] for e in meta["previous"]] == [ca.fingerprint(new)]


def test_add_cli_plugs_into_a_parent_parser(tmp_path: Path) -> None:
    """The owner's cli.py owns the top-level parser; add_cli must work with any."""
    import argparse

    parser = argparse.ArgumentParser(prog="warden")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run")  # stand-in for the owner's other subcommands
    ca.add_cli(sub)
    args = parser.parse_args(["ca", "init", "--confdir", str(tmp_path / "c")])
    assert args.func(args) == 0
    args = parser.parse_args(["ca", "rotate", "--confdir", str(tmp_path / "c"), "--overlap-days", "3"])
    assert args.overlap_days == 3 and args.func(args) == 0
    assert parser.parse_args(["ca", "bundle"]).confdir == "certs"


# ---------------------------------------------------------------- real mitmdump


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        body = b"hello from origin\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def localhost_origin(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """HTTPS origin on 127.0.0.1 with a trustme cert; yields (port, trustme CA file)."""
    origin_ca = trustme.CA()
    leaf = origin_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    ca_file = tmp_path / "origin-ca.pem"
    origin_ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield server.server_address[1], ca_file
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"mitmdump did not listen on {port} within {STARTUP_TIMEOUT_S}s")


class Mitmdump:
    """A real mitmdump on 127.0.0.1:<free port>; stopped by PID."""

    def __init__(self, confdir: Path, logdir: Path) -> None:
        self.port = _free_port()  # mitmdump does not report an ephemeral port, so pick one
        self.log = logdir / f"mitmdump-{self.port}.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [
                    str(MITMDUMP),
                    "--listen-host",
                    "127.0.0.1",
                    "--listen-port",
                    str(self.port),
                    "--set",
                    f"confdir={confdir}",
                    # The origin uses a trustme cert mitmdump does not know; we test the
                    # client side of interception here, not upstream verification.
                    "--set",
                    "ssl_insecure=true",
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_port(self.port, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def mitmdumps(tmp_path: Path) -> Iterator[list[Mitmdump]]:
    started: list[Mitmdump] = []
    try:
        yield started
    finally:
        for m in started:
            m.stop()


def fetch_via_proxy(
    proxy_port: int, origin_port: int, cafile: Path, proxy_auth: str | None = None
) -> tuple[bytes, x509.Certificate]:
    """CONNECT through the proxy, verify TLS against cafile only, GET /. Returns (body, served leaf)."""
    ctx = ssl.create_default_context(cafile=str(cafile))  # only this bundle: no system store
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=IO_TIMEOUT_S)
    try:
        auth = (
            f"Proxy-Authorization: Basic {base64.b64encode(proxy_auth.encode()).decode()}\r\n"
            if proxy_auth
            else ""
        )
        sock.sendall(
            f"CONNECT localhost:{origin_port} HTTP/1.1\r\nHost: localhost:{origin_port}\r\n{auth}\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        assert head.split(b"\r\n", 1)[0].split()[1] == b"200", head
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 1_000_000:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data, x509.load_der_x509_certificate(der)
    finally:
        sock.close()


@pytest.mark.e2e
def test_mitmdump_signs_with_our_ca(
    tmp_path: Path, localhost_origin: tuple[int, Path], mitmdumps: list[Mitmdump]
) -> None:
    origin_port, origin_ca_file = localhost_origin
    confdir = tmp_path / "certs"
    assert ca.main(["ca", "init", "--confdir", str(confdir)]) == 0
    bundle = tmp_path / "bundle.pem"
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(bundle)]) == 0
    our_ca = ca.load_cert(ca.ca_cert_path(confdir))

    m = Mitmdump(confdir, tmp_path)
    mitmdumps.append(m)
    body, leaf = fetch_via_proxy(m.port, origin_port, bundle)
    assert b"hello from origin" in body
    # The served leaf was minted by mitmdump with our CA (verification passed above
    # against the bundle; this pins *which* CA in the bundle it chained to).
    assert leaf.issuer == our_ca.subject
    leaf.verify_directly_issued_by(our_ca)
    # And it really was intercepted: trusting only the origin's CA must fail.
    with pytest.raises(ssl.SSLCertVerificationError):
        fetch_via_proxy(m.port, origin_port, origin_ca_file)
    # mitmdump must not have replaced our CA with one of its own.
    assert ca.fingerprint(ca.load_cert(ca.ca_cert_path(confdir))) == ca.fingerprint(our_ca)


@pytest.mark.e2e
def test_rotation_without_downtime(
    tmp_path: Path, localhost_origin: tuple[int, Path], mitmdumps: list[Mitmdump]
) -> None:
    """The documented procedure: rotate -> ship overlap bundle -> restart proxy."""
    origin_port, _ = localhost_origin
    confdir = tmp_path / "certs"
    assert ca.main(["ca", "init", "--confdir", str(confdir)]) == 0
    stale_bundle = tmp_path / "stale.pem"
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(stale_bundle)]) == 0
    old_ca = ca.load_cert(ca.ca_cert_path(confdir))

    running = Mitmdump(confdir, tmp_path)  # loaded the old CA at start-up
    mitmdumps.append(running)

    assert ca.main(["ca", "rotate", "--confdir", str(confdir), "--overlap-days", "2"]) == 0
    new_ca = ca.load_cert(ca.ca_cert_path(confdir))
    overlap_bundle = tmp_path / "overlap.pem"
    assert ca.main(["ca", "bundle", "--confdir", str(confdir), "--out", str(overlap_bundle)]) == 0

    # Step 2: agents with the new bundle still accept the not-yet-restarted proxy.
    _, leaf = fetch_via_proxy(running.port, origin_port, overlap_bundle)
    assert leaf.issuer == old_ca.subject

    # Step 3: restart; the proxy now signs with the new CA and the same bundle works.
    running.stop()
    restarted = Mitmdump(confdir, tmp_path)
    mitmdumps.append(restarted)
    body, leaf = fetch_via_proxy(restarted.port, origin_port, overlap_bundle)
    assert b"hello from origin" in body
    assert leaf.issuer == new_ca.subject
    # An agent that never refreshed its bundle is the failure mode the overlap avoids.
    with pytest.raises(ssl.SSLCertVerificationError):
        fetch_via_proxy(restarted.port, origin_port, stale_bundle)
    assert os.path.exists(confdir / ca.ROTATION_FILE)


@pytest.mark.e2e
def test_warden_cli_ca_and_warden_run_intercept_with_it(
    tmp_path: Path, localhost_origin: tuple[int, Path], mitmdumps: list[Mitmdump]
) -> None:
    """Same proof through the product: `warden ca init/bundle`, then `warden run --confdir`."""
    warden = str(VENV_BIN / "warden")
    origin_port, origin_ca_file = localhost_origin
    confdir, bundle = tmp_path / "certs", tmp_path / "bundle.pem"
    for argv in (
        ["ca", "init", "--confdir", str(confdir)],
        ["ca", "bundle", "--confdir", str(confdir), "--out", str(bundle)],
    ):
        r = subprocess.run([warden, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    our_ca = ca.load_cert(ca.ca_cert_path(confdir))

    token = "ca-test-token-" + os.urandom(8).hex()
    rules = tmp_path / "rules"
    rules.mkdir()
    rules_doc = {
        "agents": [
            {"id": "ca-test", "token_sha256": [hashlib.sha256(token.encode()).hexdigest()], "policies": ["p"]}
        ],
        "policies": {
            "p": {
                "allow": [
                    # methods => Warden must intercept TLS for this host (what we want to see)
                    {"host": "localhost", "ports": [origin_port], "methods": ["GET"]},
                    # localhost resolves to a private address: the SSRF guard needs a cidr allow
                    {"cidr": "127.0.0.0/8", "ports": [origin_port]},
                ]
            }
        },
    }
    (rules / "ca.yaml").write_text(json.dumps(rules_doc))
    port, metrics_port = _free_port(), _free_port()
    log = tmp_path / "warden.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                warden, "run", "--rules", str(rules), "--listen", f"127.0.0.1:{port}",
                "--metrics-listen", f"127.0.0.1:{metrics_port}", "--audit-log", str(tmp_path / "audit.jsonl"),
                "--confdir", str(confdir),
                # Upstream is the trustme origin: trust exactly its CA (no ssl_insecure needed).
                "--set", f"ssl_verify_upstream_trusted_ca={origin_ca_file}",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_port(port, proc, log)
        body, leaf = fetch_via_proxy(port, origin_port, bundle, proxy_auth=f"ca-test:{token}")
        assert b"hello from origin" in body, log.read_text(errors="replace")[-2000:]
        assert leaf.issuer == our_ca.subject
        leaf.verify_directly_issued_by(our_ca)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_key_type_is_the_leaf_key_type(tmp_path: Path, key_type: str) -> None:
    """mitmproxy gives every leaf the CA's key: an ECDSA CA means ECDSA handshakes (issue 17)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from mitmproxy.certs import CertStore

    confdir = tmp_path / "certs"
    args = ["ca", "init", "--confdir", str(confdir)] + (["--key-type", key_type] if key_type != "ecdsa" else [])
    r = run_cli(*args)
    assert r.returncode == 0 and f"created {key_type} CA" in r.stdout, r.stderr
    for name in ca.SECRET_FILES:
        assert stat.S_IMODE((confdir / name).stat().st_mode) == 0o600, name
    expected = ec.EllipticCurvePublicKey if key_type == "ecdsa" else rsa.RSAPublicKey
    assert isinstance(ca.load_cert(ca.ca_cert_path(confdir)).public_key(), expected)
    store = CertStore.from_files(confdir / "mitmproxy-ca.pem", confdir / "mitmproxy-dhparam.pem")
    leaf = store.get_cert("intercept.test", [x509.DNSName("intercept.test")]).cert.to_cryptography()
    assert isinstance(leaf.public_key(), expected)
    leaf.verify_directly_issued_by(ca.load_cert(ca.ca_cert_path(confdir)))
    # rotation may change the key type; an unknown one is refused before anything is written
    assert ca.main(["ca", "rotate", "--confdir", str(confdir), "--key-type", "rsa"]) == 0
    assert isinstance(ca.load_cert(ca.ca_cert_path(confdir)).public_key(), rsa.RSAPublicKey)
    with pytest.raises(ca.CAError):
        ca.init_ca(tmp_path / "other", key_type="dsa")
    assert not (tmp_path / "other").exists()
