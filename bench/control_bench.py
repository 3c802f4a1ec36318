#!/usr/bin/env python3
"""Control plane under load (issue 12): reload latency for rule files, the hosts file and a
secret file, and the time from a reload to the cut of a revoked passthrough tunnel.

    .venv/bin/python bench/control_bench.py [--changes 20]

One `warden run` (real subprocess, real TLS origin from trustme, plain HTTP origins on
127.0.0.1 and 127.0.0.2) and three load streams the whole time: two plain HTTP keep-alive
streams and one intercepted HTTPS stream with credential injection. For each kind of change
the script makes `--changes` changes, alternating atomic renames and in-place writes, and a
probe polls (every ~20 ms) until Warden's answer shows the change:

    rules    a deny rule for probe.test toggled: the probe's status flips 200 <-> 403
    hosts    probe.test re-pointed 127.0.0.1 <-> 127.0.0.2: the answering origin flips
    secret   secrets/TOKEN rewritten: the origin sees the new injected value
    revoke   the agent owning an open passthrough tunnel removed: the tunnel's socket closes
             (then the agent is restored and a new tunnel opened for the next round)

Reported: p50 and max seconds from the write to the observed effect, and failed load
requests (anything but 200). Uses the test harness (tests/harness.py) for the real parts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "addons"))

import requests  # noqa: E402
import trustme  # noqa: E402
import yaml  # noqa: E402

from tests.control_helpers import Load, named_origin, proxied_get, wait_until  # noqa: E402
from tests.harness import echo_handler, hosts_file, run_origin, sha256_hex, start_warden  # noqa: E402
from tests.test_control_revocation import Tunnel  # noqa: E402

TOKEN = "bench-token"
VICTIM = "gone"


def _write(path: Path, text: str, atomic: bool) -> None:
    if atomic:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        path.write_text(text)


def _stats(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.3f} s, max {max(values):.3f} s (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=20)
    args = ap.parse_args()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="control-bench-"))
    ca = trustme.CA()
    ca_file = work / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secrets = work / "secrets"
    secrets.mkdir()
    (secrets / "TOKEN").write_text("secret-0\n")
    results: dict[str, list[float]] = {}
    with named_origin("one") as one, named_origin("two", "127.0.0.2", one.server_address[1]), \
            run_origin(echo_handler, ca=ca) as tls:
        port = one.server_address[1]
        ports = [port, tls.port]
        hosts = work / "hosts"
        hosts_file(hosts)
        hosts.write_text(hosts.read_text() + "127.0.0.1 probe.test\n")
        allow = [{"host": h, "ports": ports} for h in ("allowed.test", "probe.test", "cred.test")]
        allow += [{"cidr": "127.0.0.0/8", "ports": ports}]
        agents = {"a": TOKEN, VICTIM: "gone-token-1"}
        rules = {"agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": ["p"]} for a, t in agents.items()],
                 "policies": {"p": {"allow": allow, "credentials": [
                     {"id": "tok", "host": "cred.test", "ports": [tls.port], "redact_response": False,
                      "inject": {"Authorization": "Bearer ${secret:TOKEN}"}}]}},
                 "deny": [], "settings": {"hosts_file": str(hosts), "secrets_dir": str(secrets)}}
        w = start_warden(work, rules, upstream_ca=ca_file, confdir=work / "certs", agents=agents)
        rules_file = w.rules_dir / "rules.yaml"
        try:
            probe = f"http://probe.test:{port}/"
            with Load(w, "a", f"http://allowed.test:{port}/load") as plain, \
                    Load(w, "a", f"https://cred.test:{tls.port}/load", streams=1, verify=str(w.ca_cert)) as tls_load:
                # rules
                times = []
                for i in range(args.changes):
                    deny = i % 2 == 0
                    rules["deny"] = [{"id": "probe", "host": "probe.test"}] if deny else []
                    t0 = time.monotonic()
                    _write(rules_file, yaml.safe_dump(rules), atomic=i % 2 == 0)
                    want = 403 if deny else 200
                    assert wait_until(lambda want=want: proxied_get(w, "a", probe).status_code == want, timeout=10)
                    times.append(time.monotonic() - t0)
                results["rule files"] = times
                # hosts file
                times = []
                base = hosts.read_text().replace("127.0.0.1 probe.test\n", "")
                for i in range(args.changes):
                    target = "127.0.0.2" if i % 2 == 0 else "127.0.0.1"
                    t0 = time.monotonic()
                    _write(hosts, base + f"{target} probe.test\n", atomic=i % 2 == 0)
                    name = "two" if target == "127.0.0.2" else "one"
                    assert wait_until(lambda name=name: proxied_get(w, "a", probe).json()["server"] == name, timeout=10)
                    times.append(time.monotonic() - t0)
                results["hosts file"] = times
                # secret
                times = []
                session = requests.Session()
                session.trust_env = False

                def injected() -> str:
                    r = session.get(f"https://cred.test:{tls.port}/probe", proxies={"https": w.proxy_url("a")},
                                    verify=str(w.ca_cert), timeout=10)
                    return str(r.json()["headers"].get("Authorization"))

                for i in range(1, args.changes + 1):
                    t0 = time.monotonic()
                    _write(secrets / "TOKEN", f"secret-{i}\n", atomic=i % 2 == 0)
                    assert wait_until(lambda i=i: injected() == f"Bearer secret-{i}", timeout=10)
                    times.append(time.monotonic() - t0)
                results["secret file"] = times
                # revocation
                times = []
                victim = next(a for a in rules["agents"] if a["id"] == VICTIM)
                for i in range(args.changes):
                    tunnel = Tunnel(w, VICTIM, "allowed.test", tls.port, ca_file)
                    tunnel.get()
                    rules["agents"] = [a for a in rules["agents"] if a["id"] != VICTIM]
                    t0 = time.monotonic()
                    _write(rules_file, yaml.safe_dump(rules), atomic=i % 2 == 0)
                    assert wait_until(tunnel.closed, timeout=10, interval=0.005)
                    times.append(time.monotonic() - t0)
                    tunnel.close()
                    rules["agents"].append(victim)
                    _write(rules_file, yaml.safe_dump(rules), atomic=True)
                    assert wait_until(lambda: _can_connect(w, tls.port, ca_file), timeout=10)
                results["revoke (write -> tunnel closed)"] = times
            failed = plain.failed + tls_load.failed
            served = plain.ok + tls_load.ok
        finally:
            w.stop()
    records = w.audit_records()
    revoke_ms = [r["revoke_ms"] for r in records if r.get("event") == "tunnel_revoked"]
    print("| change (under 3 load streams) | reload latency |")
    print("| --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {_stats(values)} |")
    if revoke_ms:
        print(f"| revoke (reload swap -> close, in Warden) | p50 {statistics.median(revoke_ms):.3f} ms, "
              f"max {max(revoke_ms):.3f} ms |")
    print(f"\nload: {served} requests served, {len(failed)} failed {failed[:5]}")


def _can_connect(w, port: int, ca_file: Path) -> bool:  # noqa: ANN001
    try:
        t = Tunnel(w, VICTIM, "allowed.test", port, ca_file)
    except AssertionError:
        return False
    t.close()
    return True


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
