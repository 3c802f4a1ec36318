"""Issue 15 item 3: `warden ca bundle --extra-ca FILE` and `--system-roots` (real CLI, real files).

The end-to-end proof that an extra CA makes a passed-through host work for real clients is in
test_firsthour_agent_env.py (its bundle trusts the origin's CA through --extra-ca only).
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import certifi
import pytest
import trustme
from cryptography import x509

from .harness import WARDEN


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WARDEN, "ca", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca") / "certs"
    assert run("init", "--confdir", str(d)).returncode == 0
    return d


def certs_in(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def count_certs(path: Path | str) -> int:
    # Counted, not parsed: public stores hold old roots whose serials cryptography warns about.
    return Path(path).read_bytes().count(b"-----BEGIN CERTIFICATE-----")


def test_extra_ca_files_are_added(confdir: Path, tmp_path: Path) -> None:
    internal, partner = trustme.CA(), trustme.CA()
    internal.cert_pem.write_to_path(str(tmp_path / "internal.pem"))
    partner.cert_pem.write_to_path(str(tmp_path / "partner.pem"))
    out = tmp_path / "bundle.pem"
    r = run("bundle", "--confdir", str(confdir), "--out", str(out), "--extra-ca", str(tmp_path / "internal.pem"),
            "--extra-ca", str(tmp_path / "partner.pem"))
    assert r.returncode == 0, r.stderr
    text = out.read_bytes()
    for ca in (internal, partner):
        assert ca.cert_pem.bytes().strip() in text
    assert count_certs(out) == count_certs(certifi.where()) + 3
    # OpenSSL loads the whole file (a bad block would make it fail here).
    ssl.create_default_context(cafile=str(out))


def test_system_roots_replace_certifi(confdir: Path, tmp_path: Path) -> None:
    system = tmp_path / "system.pem"
    own = trustme.CA()
    own.cert_pem.write_to_path(str(system))  # a "system store" holding one root nobody else has
    out = tmp_path / "bundle.pem"
    r = run("bundle", "--confdir", str(confdir), "--out", str(out), f"--system-roots={system}")
    assert r.returncode == 0, r.stderr
    assert f"roots: system store {system}" in r.stdout
    certs = certs_in(out)
    assert len(certs) == 2  # the system root and Warden's CA: certifi's roots are not there
    assert certs[0].subject == x509.load_pem_x509_certificate(own.cert_pem.bytes()).subject


def test_system_roots_default_finds_this_machines_store(confdir: Path, tmp_path: Path) -> None:
    if not Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        pytest.skip("no Debian-style system store on this machine")
    out = tmp_path / "bundle.pem"
    r = run("bundle", "--confdir", str(confdir), "--out", str(out), "--system-roots")
    assert r.returncode == 0, r.stderr
    assert count_certs(out) == count_certs("/etc/ssl/certs/ca-certificates.crt") + 1


@pytest.mark.parametrize("content,message", [
    pytest.param("key+cert", "contains a private key", id="file with a private key"),
    pytest.param("not pem", "no PEM certificate found", id="not a certificate"),
    pytest.param(None, "No such file", id="missing file"),
])
def test_bad_extra_ca_is_refused(confdir: Path, tmp_path: Path, content: str | None, message: str) -> None:
    extra = tmp_path / "extra.pem"
    if content == "key+cert":
        ca = trustme.CA()
        extra.write_bytes(ca.private_key_pem.bytes() + ca.cert_pem.bytes())
    elif content is not None:
        extra.write_text(content)
    out = tmp_path / "bundle.pem"
    r = run("bundle", "--confdir", str(confdir), "--out", str(out), "--extra-ca", str(extra))
    assert r.returncode == 1 and message in r.stderr and not out.exists()
    assert "PRIVATE KEY" not in r.stdout + r.stderr


def test_system_roots_missing_file_and_warden_only_conflict(confdir: Path, tmp_path: Path) -> None:
    r = run("bundle", "--confdir", str(confdir), "--out", str(tmp_path / "b.pem"), "--system-roots=/nonexistent.pem")
    assert r.returncode == 1 and "no such file" in r.stderr
    r = run("bundle", "--confdir", str(confdir), "--out", str(tmp_path / "b.pem"), "--system-roots", "--warden-only")
    assert r.returncode == 1 and "exclude each other" in r.stderr
