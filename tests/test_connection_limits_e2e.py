"""Connection limits (runtime/connlimits.py), on real `warden run` processes, both paths.

One agent in a loop, or a flood of connections that never send a head, must not take every
descriptor of the process: past `settings.limits.max_connections_per_agent` the agent's next
CONNECT or plain-HTTP connection is refused 429 `connection_limit` (audited) while other
agents go on; past `warden_max_connections` a new connection is answered 503 and closed
before it is read; `warden run` raises its soft RLIMIT_NOFILE to the hard limit.
"""

from __future__ import annotations

import re
import resource
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from .bypass_helpers import connect_raw, events_after, read_until_closed, wait_until
from .harness import ORIGIN_NAMES, Origin, Warden, curl, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
AGENTS = {"greedy": "tok-greedy", "other": "tok-other"}
LIMIT = 3


def rules(work: Path, tls: int, plain: int) -> dict[str, Any]:
    return {
        "agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": ["p"]} for a, t in AGENTS.items()],
        "policies": {"p": {"allow": [
            {"id": "pass", "host": "allowed.test", "ports": [tls], "addresses": ["127.0.0.1/32"]},
            {"id": "inspect", "host": "api.test", "ports": [tls], "methods": ["GET"], "addresses": ["127.0.0.1/32"]},
            {"id": "plain", "host": "api.test", "ports": [plain], "addresses": ["127.0.0.1/32"]},
        ]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts", ORIGIN_NAMES)),
                     "limits": {"max_connections_per_agent": LIMIT}},
    }


def metric(w: Warden, name: str, labels: str = "") -> float:
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", w.metrics_text(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module", params=["fast", "slow"])
def env(request: pytest.FixtureRequest, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Warden, Origin, Origin]]:
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        work = tmp_path_factory.mktemp(f"connlimits-{request.param}")
        w = start_warden(work, rules(work, tls.port, plain.port), upstream_ca=origin_ca_file, confdir=shared_confdir,
                         agents=AGENTS,
                         extra_args=["--set", f"warden_fast_connect={'true' if request.param == 'fast' else 'false'}"])
        try:
            yield w, tls, plain
        finally:
            w.stop()


def test_an_agent_past_its_connection_limit_is_refused_and_others_go_on(env: tuple[Warden, Origin, Origin]) -> None:
    w, tls, plain = env
    before = len(w.audit_records())
    with ExitStack() as held:
        # passthrough and intercepted tunnels count alike
        for host in ("allowed.test", "allowed.test", "api.test"):
            sock, status, head = connect_raw(w, "greedy", f"{host}:{tls.port}")
            held.enter_context(sock)
            assert status == 200, head
        assert wait_until(lambda: metric(w, "warden_agent_connections", '{agent="greedy"}') == LIMIT)
        sock, status, head = connect_raw(w, "greedy", f"allowed.test:{tls.port}")
        with sock:
            assert status == 429 and b"X-Warden-Reason: connection_limit" in head and b"Retry-After: 1" in head, head
            body = read_until_closed(sock, timeout=2)
        assert b"max_connections_per_agent" in body and b"retry" in body, body
        # a plain-HTTP request on a new connection counts too
        r = curl(["-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://api.test:{plain.port}/x"],
                 env={"http_proxy": w.proxy_url("greedy")})
        assert r.stdout == "429", (r.stdout, r.stderr)
        # another agent is not held back by the greedy one
        sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")
        sock.close()
        assert status == 200, head
        denials = [r for r in events_after(w, before, "connect") if r.get("reason") == "connection_limit"]
        assert denials and denials[0]["agent"] == "greedy" and denials[0]["decision"] == "deny", denials
    # the tunnels closed: the agent may connect again
    assert wait_until(lambda: metric(w, "warden_agent_connections", '{agent="greedy"}') == 0)
    sock, status, head = connect_raw(w, "greedy", f"allowed.test:{tls.port}")
    sock.close()
    assert status == 200, head
    assert metric(w, "warden_connections_refused_total", '{limit="agent"}') >= 2
    requests = [r for r in w.audit_records()[before:] if r.get("event") == "request" and r.get("status") == 429]
    assert requests and requests[0]["reason"] == "connection_limit", requests


def test_past_the_process_limit_a_connection_is_answered_503_before_it_is_read(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        for path in ("fast", "slow"):
            work = tmp_path / path
            work.mkdir()
            w = start_warden(work, rules(work, tls.port, plain.port), upstream_ca=origin_ca_file,
                             confdir=shared_confdir, agents=AGENTS,
                             extra_args=["--set", "warden_max_connections=4",
                                         "--set", f"warden_fast_connect={'true' if path == 'fast' else 'false'}"])
            try:
                assert metric(w, "warden_max_connections") == 4
                with ExitStack() as held:
                    idle = [held.enter_context(socket.create_connection(("127.0.0.1", w.port), timeout=5))
                            for _ in range(4)]  # connections that send nothing hold their place
                    assert wait_until(lambda w=w: metric(w, "warden_client_connections") == 4), path
                    extra = socket.create_connection(("127.0.0.1", w.port), timeout=5)
                    with extra:
                        extra.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")  # read and dropped
                        answer = read_until_closed(extra, timeout=5)
                    assert answer.startswith(b"HTTP/1.1 503 ") and b"connection_limit" in answer, (path, answer)
                    assert b"warden_max_connections" in answer
                    idle[0].close()
                    assert wait_until(lambda w=w: metric(w, "warden_client_connections") == 3), path
                    sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")
                    sock.close()
                    assert status == 200, (path, head)
                assert metric(w, "warden_connections_refused_total", '{limit="process"}') == 1, path
            finally:
                w.stop()


def test_warden_raises_its_descriptor_limit_and_derives_the_process_limit(
        tmp_path: Path, origin_ca_file: Path, shared_confdir: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE of at least 2048 (have {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # as systemd starts a service
    try:
        w = start_warden(tmp_path, rules(tmp_path, 1, 2), upstream_ca=origin_ca_file, confdir=shared_confdir,
                         agents=AGENTS)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{w.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3] == str(min(hard, 1 << 20)), line
        assert metric(w, "warden_max_connections") == (min(hard, 1 << 20) * 3 // 4 - 512) // 2
    finally:
        w.stop()
