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
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from .bypass_helpers import connect_raw, events_after, proxy_auth, read_until_closed, wait_until
from .harness import (
    ORIGIN_NAMES,
    WARDEN,
    Origin,
    Warden,
    curl,
    free_port,
    hosts_file,
    run_origin,
    sha256_hex,
    start_warden,
)

pytestmark = pytest.mark.e2e
AGENTS = {"greedy": "tok-greedy", "other": "tok-other"}
LIMIT = 3


def rules(work: Path, tls: int, plain: int, per_agent: int = LIMIT) -> dict[str, Any]:
    return {
        "agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": ["p"]} for a, t in AGENTS.items()],
        "policies": {"p": {"allow": [
            {"id": "pass", "host": "allowed.test", "ports": [tls], "addresses": ["127.0.0.1/32"]},
            {"id": "inspect", "host": "api.test", "ports": [tls], "methods": ["GET"], "addresses": ["127.0.0.1/32"]},
            {"id": "plain", "host": "api.test", "ports": [plain], "addresses": ["127.0.0.1/32"]},
        ]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts", ORIGIN_NAMES)),
                     "limits": {"max_connections_per_agent": per_agent}},
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


def _limited(work: Path, tls: Origin, plain: Origin, origin_ca_file: Path, confdir: Path, path: str) -> Warden:
    work.mkdir()
    return start_warden(work, rules(work, tls.port, plain.port, per_agent=100), upstream_ca=origin_ca_file,
                        confdir=confdir,
                        agents=AGENTS, extra_args=["--set", "warden_max_connections=4", "--set",
                                                   f"warden_fast_connect={'true' if path == 'fast' else 'false'}"])


def _audited_closures(w: Warden) -> tuple[int, int]:
    """(refused, evicted) over the connections_refused records so far, checking each record."""
    refused = evicted = 0
    for r in w.audit_records():
        if r.get("event") != "connections_refused":
            continue
        assert r["limit"] == "process" and r["max_connections"] == 4 and r["window_ms"] >= 0, r
        assert r["refused"] == sum(c["refused"] for c in r["clients"]), r
        assert r["evicted"] == sum(c["evicted"] for c in r["clients"]), r
        assert {c["client_ip"] for c in r["clients"]} == {"127.0.0.1"}, r
        refused, evicted = refused + r["refused"], evicted + r["evicted"]
    return refused, evicted


def _refused_at_accept(w: Warden) -> bytes:
    extra = socket.create_connection(("127.0.0.1", w.port), timeout=5)
    with extra:
        extra.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")  # read and dropped
        return read_until_closed(extra, timeout=5)


def test_past_the_process_limit_a_connection_is_answered_503_before_it_is_read(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Four identified tunnels fill a limit of four: the fifth connection gets the 503. On
    mitmproxy's own listener, connections that have sent nothing fill it just the same."""
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        for path in ("fast", "slow"):
            w = _limited(tmp_path / path, tls, plain, origin_ca_file, shared_confdir, path)
            try:
                assert metric(w, "warden_max_connections") == 4
                assert wait_until(lambda w=w: metric(w, "warden_client_connections") == 0), path
                with ExitStack() as held:
                    for _ in range(4):
                        sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")
                        held.enter_context(sock)
                        assert status == 200, (path, head)
                    assert wait_until(lambda w=w: metric(w, "warden_client_connections") == 4), path
                    answer = _refused_at_accept(w)
                    assert answer.startswith(b"HTTP/1.1 503 ") and b"connection_limit" in answer, (path, answer)
                    assert b"warden_max_connections" in answer and b"Retry-After: 1" in answer
                    if path == "slow":  # mitmproxy's listener: connections that say nothing count the same
                        held.close()
                        assert wait_until(lambda w=w: metric(w, "warden_client_connections") == 0), path
                        for _ in range(4):
                            held.enter_context(socket.create_connection(("127.0.0.1", w.port), timeout=5))
                        assert wait_until(lambda w=w: metric(w, "warden_client_connections") == 4), path
                        assert _refused_at_accept(w).startswith(b"HTTP/1.1 503 ")
                refused = 2 if path == "slow" else 1
                assert metric(w, "warden_connections_refused_total", '{limit="process"}') == refused, path
                # audited, one record per second at most, with the count per client address
                assert wait_until(lambda w=w, n=refused: _audited_closures(w) == (n, 0)), (path, _audited_closures(w))
                sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")  # room again
                sock.close()
                assert status == 200, (path, head)
            finally:
                w.stop()


def test_a_burst_of_refusals_is_audited_in_one_record_and_none_is_lost_at_shutdown(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        w = _limited(tmp_path / "fast", tls, plain, origin_ca_file, shared_confdir, "fast")
        try:
            assert wait_until(lambda: metric(w, "warden_client_connections") == 0)
            with ExitStack() as held:
                for _ in range(4):
                    sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")
                    held.enter_context(sock)
                    assert status == 200, head
                assert wait_until(lambda: metric(w, "warden_client_connections") == 4)
                for _ in range(5):
                    assert _refused_at_accept(w).startswith(b"HTTP/1.1 503 ")
                assert w.stop() == 0  # inside the record's window: written at shutdown
        finally:
            w.stop()
        records = [r for r in w.audit_records() if r.get("event") == "connections_refused"]
        # one window (two if the burst straddled a second), and nothing lost at shutdown
        assert sum(r["refused"] for r in records) == 5 and len(records) <= 2, records
        assert w.audit_records()[-1]["event"] == "shutdown"
        shown = subprocess.run([WARDEN, "log", str(w.audit_path)], capture_output=True, text=True, timeout=30)
        assert "at accept, evicted 0 (warden_max_connections 4) from 127.0.0.1" in shown.stdout, shown


def test_at_the_process_limit_the_oldest_connection_without_a_head_makes_room(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """An agent could dodge its own limit by never authenticating: connections that send no
    head fill the process limit. On the fast listener, the one that has waited longest (a
    second at least) is closed to make room for a new connection."""
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        w = _limited(tmp_path / "fast", tls, plain, origin_ca_file, shared_confdir, "fast")
        try:
            assert wait_until(lambda: metric(w, "warden_client_connections") == 0)  # start-up's port probe is gone
            with ExitStack() as held:
                idle = [held.enter_context(socket.create_connection(("127.0.0.1", w.port), timeout=5))
                        for _ in range(4)]
                assert wait_until(lambda: metric(w, "warden_client_connections") == 4)
                assert metric(w, "warden_connections_refused_total", '{limit="process"}') == 0
                time.sleep(1.2)  # past PENDING_MIN_AGE: the idle ones may now be evicted
                sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")
                held.enter_context(sock)
                assert status == 200, head
                idle[0].settimeout(5)
                assert idle[0].recv(100) == b""  # the oldest was closed, unanswered (a timeout raises)
                assert metric(w, "warden_front_door_connections_total", '{path="evicted"}') == 1
                assert metric(w, "warden_connections_refused_total", '{limit="process"}') == 0
                assert wait_until(lambda: _audited_closures(w) == (0, 1)), _audited_closures(w)
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


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_connections_no_agent_was_identified_on_make_room_at_the_process_limit(
        path: str, tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Red team 18: after one complete head answered 407, a connection lived for tcp_timeout, and
    a byte trickled now and then kept it for ever: such connections filled the process limit and
    every agent got 503. At the limit, the oldest connection no agent was identified on (a
    second old at least) is closed to make room, on both listeners."""
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        w = _limited(tmp_path / path, tls, plain, origin_ca_file, shared_confdir, path)
        try:
            assert wait_until(lambda: metric(w, "warden_client_connections") == 0)
            with ExitStack() as held:
                anonymous = []
                for _ in range(4):
                    sock = held.enter_context(socket.create_connection(("127.0.0.1", w.port), timeout=5))
                    sock.sendall(f"GET http://api.test:{plain.port}/ HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
                    assert sock.recv(65536).startswith(b"HTTP/1.1 407"), path
                    sock.sendall(b"G")  # the start of a next head, to be held open
                    anonymous.append(sock)
                assert wait_until(lambda: metric(w, "warden_client_connections") == 4), path
                time.sleep(1.2)
                sock, status, head = connect_raw(w, "other", f"allowed.test:{tls.port}")
                held.enter_context(sock)
                assert status == 200, (path, head)
                assert metric(w, "warden_front_door_connections_total", '{path="evicted"}') == 1, path
                assert wait_until(lambda: _audited_closures(w) == (0, 1)), (path, _audited_closures(w))
                started = time.monotonic()
                read_until_closed(anonymous[0], timeout=5)  # the rest of its 407, then the close
                assert time.monotonic() - started < 4, path  # closed, not timed out
        finally:
            w.stop()


def test_a_connection_refused_for_its_agents_limit_is_closed(env: tuple[Warden, Origin, Origin]) -> None:
    """Red team 18: a plain request refused 429 connection_limit left its keep-alive connection
    open, counted for no agent: enough of them filled the process limit."""
    w, tls, plain = env
    with ExitStack() as held:
        for _ in range(LIMIT):
            sock, status, head = connect_raw(w, "greedy", f"allowed.test:{tls.port}")
            held.enter_context(sock)
            assert status == 200, head
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
            sock.sendall(f"GET http://api.test:{plain.port}/x HTTP/1.1\r\nHost: api.test:{plain.port}\r\n"
                         f"Proxy-Authorization: {proxy_auth('greedy', AGENTS['greedy'])}\r\n\r\n".encode())
            answer = read_until_closed(sock, timeout=5)  # returns at the close, not at the timeout
        assert answer.startswith(b"HTTP/1.1 429") and b"Connection: close" in answer, answer


def test_upstream_connections_beyond_the_first_count_toward_the_agents_limit(
        tmp_path: Path, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Red team 18: one plain-HTTP keep-alive connection keeps an upstream connection for each
    host:port it used, so 10 client connections held 960 descriptors. Each upstream beyond the
    first of a client connection counts like a connection of its agent."""
    with ExitStack() as origins:
        ports = [origins.enter_context(run_origin()).port for _ in range(4)]
        rules = {
            "agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": ["p"]} for a, t in AGENTS.items()],
            "policies": {"p": {"allow": [{"id": "loop", "cidr": "127.0.0.1/32", "ports": ports}]}},
            "settings": {"limits": {"max_connections_per_agent": LIMIT}},
        }
        w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents=AGENTS)
        try:
            auth = proxy_auth("greedy", AGENTS["greedy"])
            statuses = []
            with socket.create_connection(("127.0.0.1", w.port), timeout=10) as sock:
                reader = sock.makefile("rb")
                for port in ports:
                    sock.sendall(f"GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                 f"Proxy-Authorization: {auth}\r\n\r\n".encode())
                    status = int(reader.readline().split()[1])  # one reader for the keep-alive connection
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    statuses.append((status, reader.read(length), metric(w, "warden_agent_connections", '{agent="greedy"}')))
                assert [s for s, *_ in statuses] == [200, 200, 200, 502], statuses
                assert b"max_connections_per_agent" in statuses[-1][1], statuses[-1]
                held = [count for *_, count in statuses]
                assert held[:3] == [1, 2, 3] and max(held) == LIMIT, held  # each upstream counted, never past
            assert wait_until(lambda: metric(w, "warden_agent_connections", '{agent="greedy"}') == 0)
        finally:
            w.stop()


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_a_connect_pipelined_behind_one_that_opened_no_tunnel_is_refused_and_counts_nothing(
        path: str, tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Red team 19: two CONNECTs and a FIN in one write. The first ended 502, client_disconnected
    ran, then the second CONNECT's hook counted the connection again (and mitmproxy's handler
    failed an assertion on it): nothing gave the count back, and after a few such connections
    the agent got 429 with no connection open. The second CONNECT is refused now, and a
    connection that is gone is never counted."""
    closed = free_port()  # nothing listens: the first CONNECT fails
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        limited = rules(tmp_path, tls.port, plain.port)
        limited["policies"]["p"]["allow"].append(
            {"id": "closed", "host": "api.test", "ports": [closed], "addresses": ["127.0.0.1/32"]})
        w = start_warden(tmp_path, limited, upstream_ca=origin_ca_file, confdir=shared_confdir, agents=AGENTS,
                         extra_args=["--set", f"warden_fast_connect={'true' if path == 'fast' else 'false'}"])
        try:
            auth = proxy_auth("greedy", AGENTS["greedy"]).encode()
            for end in (b"\n", b"\r\n"):  # a bare LF sends the heads to mitmproxy on the fast path too
                for _ in range(LIMIT + 2):
                    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as sock:
                        sock.sendall(f"CONNECT api.test:{closed} HTTP/1.1".encode() + end + b"Proxy-Authorization: "
                                     + auth + end + end + f"CONNECT allowed.test:{tls.port} HTTP/1.1".encode()
                                     + end + b"Proxy-Authorization: " + auth + end + end)
                        sock.shutdown(socket.SHUT_WR)
                        read_until_closed(sock, timeout=3)
            assert wait_until(lambda: metric(w, "warden_agent_connections", '{agent="greedy"}') == 0), \
                metric(w, "warden_agent_connections", '{agent="greedy"}')
            sock, status, head = connect_raw(w, "greedy", f"allowed.test:{tls.port}")
            sock.close()
            assert status == 200, head
            assert "has crashed" not in w.output(), w.output()[-2000:]
        finally:
            w.stop()
