"""Issue 12 item 1: rule files, the hosts file and secret files reload under traffic, within 2 s,
each change audited with a new policy version; SIGHUP always audited."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .control_helpers import Load, named_origin, proxied_get, wait_until
from .harness import Origin, echo_handler, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKEN = "reload-token-123"
OLD_SECRET = "old-secret-value-AAAA1111"
NEW_SECRET = "new-secret-value-BBBB2222"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _reloads(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "reload"]


def test_rotated_secret_is_injected_and_guarded_within_2s(tmp_path: Path, origin_ca, origin_ca_file: Path,
                                                         shared_confdir: Path, plain_origin: Origin) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "GH_TOKEN").write_text(OLD_SECRET + "\n")
    with run_origin(echo_handler, ca=origin_ca) as tls:
        ports = [tls.port, plain_origin.port]
        rules = {
            "agents": [{"id": "a", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {
                "allow": [{"host": "cred.test", "ports": ports}, {"host": "leak.test", "ports": ports},
                          {"host": "allowed.test", "ports": ports}, {"cidr": "127.0.0.1/32", "ports": ports}],
                "credentials": [{"id": "gh", "host": "cred.test", "ports": ports,
                                 "inject": {"Authorization": "Bearer ${secret:GH_TOKEN}"},
                                 "redact_response": False}]}},
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")), "secrets_dir": str(secrets),
                         "tls_intercept": "always"},
        }
        w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents={"a": TOKEN})
        try:
            url = f"https://cred.test:{tls.port}/x"

            def injected() -> str:
                r = proxied_get(w, "a", url, verify=str(w.ca_cert))
                assert r.status_code == 200, r.text
                return r.json()["headers"].get("Authorization", "")

            assert injected() == f"Bearer {OLD_SECRET}"
            first = w.audit_records(lambda rs: any(r.get("event") == "startup" for r in rs))
            old_version = next(r for r in first if r.get("event") == "startup")["policy_version"]
            with Load(w, "a", f"http://allowed.test:{plain_origin.port}/load") as load:
                _atomic_write(secrets / "GH_TOKEN", NEW_SECRET + "\n")
                started = time.monotonic()
                assert wait_until(lambda: injected() == f"Bearer {NEW_SECRET}", timeout=5)
                took = time.monotonic() - started
            assert took < 2.0, f"rotation took {took:.2f}s"
            assert load.ok > 0 and not load.failed, load.failed
            # the new value is leak-guarded: sending it elsewhere is refused
            leak = proxied_get(w, "a", f"https://leak.test:{tls.port}/", verify=str(w.ca_cert),
                               headers={"X-Token": NEW_SECRET})
            assert leak.status_code == 403 and leak.headers["X-Warden-Reason"] == "secret_leak"
            records = w.audit_records(lambda rs: bool(_reloads(rs)))
            reload = _reloads(records)[-1]
            assert reload["result"] == "success" and reload["previous_version"] == old_version
            assert reload["policy_version"] != old_version
        finally:
            w.stop()
    text = w.audit_path.read_text() + w.output()
    assert NEW_SECRET not in text and OLD_SECRET not in text


def test_hosts_file_edit_applies_within_2s_and_is_audited(tmp_path: Path) -> None:
    with named_origin("first") as first, named_origin("second", "127.0.0.2", first.server_address[1]):
        port = first.server_address[1]
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 api.test allowed.test\n")
        rules = {"agents": [{"id": "a", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
                 "policies": {"p": {"allow": [{"host": "api.test", "ports": [port]},
                                              {"host": "allowed.test", "ports": [port]},
                                              {"cidr": "127.0.0.0/8", "ports": [port]}]}},
                 "settings": {"hosts_file": str(hosts)}}
        w = start_warden(tmp_path, rules, agents={"a": TOKEN})
        try:
            def served_by() -> str:
                return str(proxied_get(w, "a", f"http://api.test:{port}/").json()["server"])

            assert served_by() == "first"
            with Load(w, "a", f"http://allowed.test:{port}/load") as load:
                hosts.write_text("127.0.0.2 api.test\n127.0.0.1 allowed.test\n")  # in place, as an editor would
                started = time.monotonic()
                assert wait_until(lambda: served_by() == "second", timeout=5)
                took = time.monotonic() - started
            assert took < 2.0, f"hosts file change took {took:.2f}s"
            assert load.ok > 0 and not load.failed, load.failed
            records = w.audit_records(lambda rs: bool(_reloads(rs)))
            reload = _reloads(records)[-1]
            assert reload["result"] == "success" and reload["policy_version"] != reload["previous_version"]

            # SIGHUP with nothing changed: still audited, as "unchanged"
            w.proc.send_signal(signal.SIGHUP)
            records = w.audit_records(lambda rs: any(r.get("result") == "unchanged" for r in _reloads(rs)))
            unchanged = [r for r in _reloads(records) if r.get("result") == "unchanged"]
            assert unchanged and unchanged[0]["trigger"] == "signal"
            assert unchanged[0]["policy_version"] == reload["policy_version"]
            # SIGUSR1/SIGUSR2 do not stop it
            w.proc.send_signal(signal.SIGUSR1)
            w.proc.send_signal(signal.SIGUSR2)
            assert served_by() == "second"
            assert w.proc.poll() is None
        finally:
            w.stop()
