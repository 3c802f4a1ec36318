"""Request bodies in Warden's memory, against a real `warden run` and an origin that logs every
byte it receives: the per-agent budget of buffered bodies
(settings.body_scan.max_buffered_bytes_per_agent, runtime/budget.py), and the body of a request
Warden has already refused, which is dropped as it arrives (runtime/refused_bodies.py).

An agent that sends many bodies but holds back each one's last byte makes Warden hold them
all in memory (each is read whole before it is decided). The budget bounds the sum per agent:
past it, 429 `buffer_limit` before a byte of the body is read; other agents are not affected;
what a finished, failed or abandoned request held is given back.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from egresswarden.record.metric_names import BUFFERED_REQUEST_BYTES

from .bypass_helpers import (
    H2Origin,
    LoggingOrigin,
    WsClient,
    audit_where,
    open_tunnel,
    peak_rss_kib,
    proxy_auth,
    read_response,
    request_bytes,
    run_h2_origin,
    run_logging_origin,
    run_ws_origin,
    wait_until,
    warden_pid,
)
from .control_helpers import reload_rules
from .harness import Warden, hosts_file, sha256_hex, start_warden

BUDGET = 4096
AGENTS = {"greedy": "tok-greedy", "other": "tok-other"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Warden, LoggingOrigin]]:
    work = tmp_path_factory.mktemp("buffer-budget")
    with run_logging_origin() as origin:
        rules = {
            "agents": [{"id": agent, "token_sha256": [sha256_hex(token)], "policies": ["p"]}
                       for agent, token in AGENTS.items()],
            "policies": {"p": {"allow": [{"id": "api", "host": "api.test", "ports": [origin.port],
                                          "addresses": ["127.0.0.1/32"]}]}},
            "settings": {"hosts_file": str(hosts_file(work / "hosts")),
                         "body_scan": {"max_buffered_bytes_per_agent": BUDGET}},
        }
        warden = start_warden(work, rules, agents=AGENTS)
        try:
            yield warden, origin
        finally:
            warden.stop()


def _post_head(warden: Warden, origin: LoggingOrigin, agent: str, path: str, length: int) -> socket.socket:
    """A plain-HTTP POST through Warden whose headers (and no body yet) are sent."""
    sock = socket.create_connection(("127.0.0.1", warden.port), timeout=15)
    sock.sendall((f"POST http://api.test:{origin.port}{path} HTTP/1.1\r\nHost: api.test:{origin.port}\r\n"
                  f"Proxy-Authorization: {proxy_auth(agent, AGENTS[agent])}\r\n"
                  f"Content-Length: {length}\r\n\r\n").encode())
    return sock


def _post(warden: Warden, origin: LoggingOrigin, agent: str, path: str, length: int) -> Any:
    with _post_head(warden, origin, agent, path, length) as sock:
        sock.sendall(b"b" * length)
        return read_response(sock, "POST")


def _held_open(warden: Warden, origin: LoggingOrigin, path: str, length: int) -> socket.socket:
    """A POST whose body lacks its last byte: Warden holds the rest in memory."""
    sock = _post_head(warden, origin, "greedy", path, length)
    sock.sendall(b"h" * (length - 1))
    return sock


def _arrived(origin: LoggingOrigin) -> list[str]:
    return [r.target for r in origin.requests]


def _held(warden: Warden, agent: str) -> float:
    """warden_buffered_request_bytes{agent} from /metrics (0 when absent)."""
    prefix = f'{BUFFERED_REQUEST_BYTES}{{agent="{agent}"}} '
    lines = [line for line in warden.metrics_text().splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


def test_past_the_budget_is_429_before_the_body_is_read_and_other_agents_go_on(
        env: tuple[Warden, LoggingOrigin]) -> None:
    warden, origin = env
    first = _held_open(warden, origin, "/held", 3000)
    try:
        # Warden holds the first body (the origin saw nothing of it): 3000 + 2000 > 4096.
        assert wait_until(lambda: _held(warden, "greedy") == 3000, 10)
        refused = _post(warden, origin, "greedy", "/second", 2000)
        assert refused.status == 429, refused
        assert refused.headers["x-warden-reason"] == "buffer_limit"
        assert refused.headers["retry-after"] == "1"
        assert "held by Warden (limit 4096 per agent)" in refused.text
        assert "This is temporary: retry" in refused.text
        # Another agent has its own budget.
        assert _post(warden, origin, "other", "/other", 2000).status == 200
        # A body that fits beside the held one passes.
        assert _post(warden, origin, "greedy", "/small", 1000).status == 200
        # Finishing the held body gives its share back.
        first.sendall(b"h")
        assert read_response(first, "POST").status == 200
    finally:
        first.close()
    assert wait_until(lambda: _held(warden, "greedy") == 0, 10)
    assert _post(warden, origin, "greedy", "/after", 2000).status == 200
    arrived = _arrived(origin)
    assert "/second" not in arrived
    assert {"/held", "/other", "/small", "/after"} <= set(arrived)
    record = audit_where(warden, lambda r: r.get("event") == "request" and r.get("path") == "/second")[0]
    assert record["reason"] == "buffer_limit" and record["status"] == 429


def test_an_abandoned_body_gives_its_share_back(env: tuple[Warden, LoggingOrigin]) -> None:
    warden, origin = env
    for _ in range(3):  # each abandoned body would otherwise stay counted: 3 x 3000 > 4096
        sock = _held_open(warden, origin, "/abandoned", 3000)
        assert wait_until(lambda: _held(warden, "greedy") == 3000, 10)
        sock.close()
        assert wait_until(lambda: _held(warden, "greedy") == 0, 10)
        assert _post(warden, origin, "greedy", "/next", 3000).status == 200
    assert "/abandoned" not in _arrived(origin)


def test_one_body_larger_than_the_budget_is_still_admitted(env: tuple[Warden, LoggingOrigin]) -> None:
    # The budget bounds what an agent holds at once; it never makes a single allowed body impossible.
    warden, origin = env
    assert _post(warden, origin, "greedy", "/big", 3 * BUDGET).status == 200
    assert "/big" in _arrived(origin)


@pytest.mark.parametrize("who", ["unauthenticated", "denied"])
def test_a_refused_requests_body_is_not_held_in_memory(env: tuple[Warden, LoggingOrigin], who: str) -> None:
    """Refused at its headers (407 without a token, 403 for a host no rule allows), a 128 MiB body
    is read and dropped: Warden's peak RSS does not grow with it (it grew by 410 MiB for 200 MiB)."""
    warden, _ = env
    pid = warden_pid(warden)
    before = peak_rss_kib(pid)
    size = 128 * 1024 * 1024
    auth = "" if who == "unauthenticated" else f"Proxy-Authorization: {proxy_auth('greedy', AGENTS['greedy'])}\r\n"
    with socket.create_connection(("127.0.0.1", warden.port), timeout=30) as sock:
        sock.sendall((f"POST http://nowhere.test/up HTTP/1.1\r\nHost: nowhere.test\r\n{auth}"
                      f"Content-Length: {size}\r\n\r\n").encode())
        chunk = b"z" * (1 << 20)
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)
        answer = read_response(sock, "POST")
    assert answer.status == (407 if who == "unauthenticated" else 403)
    grown_mib = (peak_rss_kib(pid) - before) / 1024
    assert grown_mib < 32, f"peak RSS grew by {grown_mib:.0f} MiB for a refused 128 MiB body"
    record = audit_where(warden, lambda r: r.get("host") == "nowhere.test" and r.get("status") == answer.status)[-1]
    assert record["bytes_up"] == size  # what the agent sent is still on record


def test_schema_documents_the_key(tmp_path: Path) -> None:
    from egresswarden.core.loader import load_ruleset
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text("agents: []\nsettings:\n  body_scan:\n    max_buffered_bytes_per_agent: 12\n")
    with pytest.raises(Exception, match="r.yaml:4"):
        load_ruleset(rules)


def _intercepting_warden(tmp_path: Path, port: int, origin_ca_file: Path, confdir: Path, *,
                         body_scan: dict[str, int] | None = None, extra_args: list[str] | None = None) -> Warden:
    """Agent `greedy` allowed to api.test:`port` by a path rule (so the tunnel is intercepted and
    every HTTP/2 stream decided)."""
    settings: dict[str, Any] = {"hosts_file": str(hosts_file(tmp_path / "hosts"))}
    if body_scan:
        settings["body_scan"] = body_scan
    rules = {
        "agents": [{"id": "greedy", "token_sha256": [sha256_hex(AGENTS["greedy"])], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"id": "h2", "host": "api.test", "ports": [port], "paths": ["/**"],
                                      "addresses": ["127.0.0.1/32"]}]}},
        "settings": settings,
    }
    return start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=confdir,
                        agents={"greedy": AGENTS["greedy"]}, extra_args=extra_args)


def _read_statuses(sock: socket.socket, conn: h2.connection.H2Connection, wanted: set[int]) -> dict[int, str]:
    """The :status of each wanted stream's response (bounded wait)."""
    statuses: dict[int, str] = {}
    deadline = time.monotonic() + 15
    while not wanted <= statuses.keys() and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id in wanted:
                statuses[ev.stream_id] = dict(ev.headers)[":status"]
        sock.sendall(conn.data_to_send())
    return statuses


def test_one_http2_connection_cannot_hold_more_than_the_budget(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Many streams on one HTTP/2 connection, each body short of its last byte: the first is held,
    every stream after it that would pass the budget is answered 429 at once."""
    with run_h2_origin(origin_ca) as origin:
        warden = _intercepting_warden(tmp_path, origin.port, origin_ca_file, shared_confdir,
                                      body_scan={"max_buffered_bytes_per_agent": BUDGET})
        try:
            sock = open_tunnel(warden, "greedy", "api.test", origin.port, alpn=["h2"])
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            streams = []
            for i in range(10):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "POST"), (":authority", f"api.test:{origin.port}"),
                                        (":scheme", "https"), (":path", f"/s{i}"), ("content-length", "3000")])
                conn.send_data(sid, b"x" * 2999)  # never the last byte
                streams.append(sid)
            # A last, small, complete stream: mitmproxy runs one connection's hooks in order, so its
            # answer means Warden has decided every stream before it.
            probe = conn.get_next_available_stream_id()
            conn.send_headers(probe, [(":method", "POST"), (":authority", f"api.test:{origin.port}"),
                                      (":scheme", "https"), (":path", "/probe"), ("content-length", "10")])
            conn.send_data(probe, b"p" * 10, end_stream=True)
            sock.sendall(conn.data_to_send())
            sock.settimeout(10)
            assert _read_statuses(sock, conn, {probe}) == {probe: "200"}
            # One body held; the refused streams' bytes were dropped as they came.
            assert _held(warden, "greedy") == 3000
            for sid in streams:  # every body complete: the answers go out
                conn.send_data(sid, b"x", end_stream=True)
            sock.sendall(conn.data_to_send())
            statuses = _read_statuses(sock, conn, set(streams))
            assert sorted(statuses.values()) == ["200"] + ["429"] * (len(streams) - 1), statuses
            held_index = next(i for i, sid in enumerate(streams) if statuses[sid] == "200")
            assert wait_until(lambda: _held(warden, "greedy") == 0, 10)
            sock.close()
        finally:
            warden.stop()
    # the probe and the held stream, once whole; no refused one reached the origin
    assert sorted(h[":path"] for h, _ in origin.requests) == ["/probe", f"/s{held_index}"]
    assert len(audit_where(warden, lambda r: r.get("reason") == "buffer_limit")) == 9


class _WindowlessH2Origin(H2Origin):
    """A TLS HTTP/2 origin: GET /big/<MiB> answers that many MiB as fast as its window allows;
    POST /slow never grants window for the body (h2's initial 64 KiB, then nothing)."""

    def _connection(self, raw: socket.socket) -> None:
        raw.settimeout(20)
        with contextlib.suppress(Exception), raw, self.ctx.wrap_socket(raw, server_side=True) as conn:
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
            h2c.initiate_connection()
            conn.sendall(h2c.data_to_send())
            while not self.stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        path = dict(ev.headers)[":path"]
                        if path.startswith("/big/"):
                            self._send_big(conn, h2c, ev.stream_id, int(path.split("/")[2]) << 20)
                conn.sendall(h2c.data_to_send())

    def _send_big(self, conn: ssl.SSLSocket, h2c: h2.connection.H2Connection, stream_id: int, size: int) -> None:
        h2c.send_headers(stream_id, [(":status", "200"), ("content-length", str(size))])
        sent, chunk = 0, b"d" * 16384
        while sent < size and h2c.local_flow_control_window(stream_id) >= len(chunk):
            h2c.send_data(stream_id, chunk)
            sent += len(chunk)
            if sent % (1 << 20) == 0:
                conn.sendall(h2c.data_to_send())
        conn.sendall(h2c.data_to_send())


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_http2_data_a_peer_grants_no_window_for_is_cut_at_the_queue_limit(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path, direction: str) -> None:
    """HTTP/2 on both legs. download: the agent asks for 200 MiB and grants no window; upload: the
    agent sends 200 MiB the upstream grants no window for. mitmproxy would queue it all (+435 MiB
    for 400 MiB); Warden resets the stream once the limit (set to 16 MiB here) waits on one
    connection, and records why."""
    with run_h2_origin(origin_ca, _WindowlessH2Origin) as origin:
        warden = _intercepting_warden(tmp_path, origin.port, origin_ca_file, shared_confdir,
                                      extra_args=["--set", f"warden_h2_max_queued={16 * 1024 * 1024}"])
        try:
            pid = warden_pid(warden)
            before = peak_rss_kib(pid)
            sock = open_tunnel(warden, "greedy", "api.test", origin.port, alpn=["h2"])
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            authority = f"api.test:{origin.port}"
            if direction == "download":
                conn.send_headers(sid, [(":method", "GET"), (":authority", authority), (":scheme", "https"),
                                        (":path", "/big/200")], end_stream=True)
                sock.sendall(conn.data_to_send())  # and never a WINDOW_UPDATE
            else:
                conn.send_headers(sid, [(":method", "POST"), (":authority", authority), (":scheme", "https"),
                                        (":path", "/slow")])
                sock.sendall(conn.data_to_send())
                sock.settimeout(10)
                conn.receive_data(sock.recv(65536))  # Warden's SETTINGS: its (large) window
                chunk = b"u" * 16384
                for _ in range(200 * 64):  # 200 MiB, as far as Warden's window lets it
                    if conn.local_flow_control_window(sid) < len(chunk):
                        break
                    conn.send_data(sid, chunk)
                    sock.sendall(conn.data_to_send())
            records = warden.audit_records(
                lambda rs: any(r.get("event") == "request" and r.get("error") for r in rs), timeout=30)
            sock.close()
            grown_mib = (peak_rss_kib(pid) - before) / 1024
        finally:
            warden.stop()
    record = next(r for r in records if r.get("event") == "request" and r.get("error"))
    assert "granted no window" in record["error"] and "at most 16777216): stream reset" in record["error"], record
    moved = record["bytes_down"] if direction == "download" else record["bytes_up"]
    assert moved < 64 * 1024 * 1024, record
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_reset_http2_streams_give_their_memory_back_not_only_their_budget(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Fill the budget with half-sent 1 MiB bodies, reset them all, again and again on one
    connection: the bodies' memory must go with the streams (it waited for Python's cyclic GC,
    and RSS reached ~10x the budget while the gauge read 0)."""
    with run_h2_origin(origin_ca, _WindowlessH2Origin) as origin:
        warden = _intercepting_warden(tmp_path, origin.port, origin_ca_file, shared_confdir,
                                      body_scan={"max_buffered_bytes_per_agent": 16 * 1024 * 1024})
        try:
            pid = warden_pid(warden)
            sock = open_tunnel(warden, "greedy", "api.test", origin.port, alpn=["h2"])
            sock.settimeout(10)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            conn.receive_data(sock.recv(65536))  # Warden's SETTINGS: its window
            body = b"r" * (1024 * 1024 - 1)
            before = peak_rss_kib(pid)
            for _ in range(20):  # 20 x 16 MiB through a 16 MiB budget
                streams = []
                for _ in range(16):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, [(":method", "POST"), (":authority", f"api.test:{origin.port}"),
                                            (":scheme", "https"), (":path", "/held"),
                                            ("content-length", str(len(body) + 1))])
                    for at in range(0, len(body), 65536):
                        conn.send_data(sid, body[at:at + 65536])
                    streams.append(sid)
                sock.sendall(conn.data_to_send())
                assert wait_until(lambda: _held(warden, "greedy") == 16 * (len(body) + 1), 10)
                for sid in streams:
                    conn.reset_stream(sid)
                sock.sendall(conn.data_to_send())
                assert wait_until(lambda: _held(warden, "greedy") == 0, 10)
            grown_mib = (peak_rss_kib(pid) - before) / 1024
            sock.close()
        finally:
            warden.stop()
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB over 320 MiB of reset bodies (budget 16 MiB)"


def test_compressed_bodies_past_an_agents_decode_share_get_429_and_others_go_on(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """16 KB of gzip decoded to 16 MiB and was scanned on the event loop: one agent's stream of them
    stalled every other agent. Each agent now decodes at most its share per second."""
    agents = {"greedy": AGENTS["greedy"], "other": AGENTS["other"]}
    with run_logging_origin(ca=origin_ca) as origin:
        rules = {
            "agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": ["p"]} for a, t in agents.items()],
            "policies": {"p": {
                "allow": [{"id": "cred", "host": "cred.test", "ports": [origin.port], "addresses": ["127.0.0.1/32"]}],
                # a credential for the host: its request bodies are scanned by the leak guard
                "credentials": [{"id": "c", "host": "cred.test", "ports": [origin.port],
                                 "inject": {"Authorization": "Bearer ${secret:CRED}"}}],
            }},
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")),
                         "body_scan": {"max_buffered_bytes": 65536,  # decode limit 16x: 1 MiB
                                       "decoded_bytes_per_second_per_agent": 64 * 1024}},
        }
        warden = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              agents=agents, env={"CRED": "cred-secret-value-0123456789"})
        try:
            def post(agent: str, path: str, body: bytes, encoding: str | None) -> Any:
                sock = open_tunnel(warden, agent, "cred.test", origin.port)
                with sock:
                    headers = {"Content-Length": str(len(body))} | ({"Content-Encoding": encoding} if encoding else {})
                    sock.sendall(request_bytes("POST", path, f"cred.test:{origin.port}", headers, body))
                    return read_response(sock, "POST")

            bomb = gzip.compress(b"\0" * (600 * 1024))  # 600 KiB decoded from ~0.6 KB
            statuses = [post("greedy", f"/z{i}", bomb, "gzip").status for i in range(4)]
            # burst 1 MiB (the decode limit): two bodies, the second into debt that 64 KiB/s takes ~3 s to repay
            assert statuses == [200, 200, 429, 429], statuses
            refused = post("greedy", "/z-again", bomb, "gzip")
            assert refused.headers["x-warden-reason"] == "scan_limit" and refused.headers["retry-after"] == "1"
            assert "This is temporary: retry" in refused.text
            assert post("other", "/o", bomb, "gzip").status == 200  # another agent has its own share
            assert post("greedy", "/plain", b"p" * 60000, None).status == 200  # uncompressed: not metered
            assert wait_until(lambda: post("greedy", "/later", bomb, "gzip").status == 200, 15)  # repaid
        finally:
            warden.stop()
    arrived = {r.target for r in origin.requests}
    assert {"/z0", "/z1", "/o", "/plain", "/later"} <= arrived and not {"/z2", "/z3", "/z-again"} & arrived


def test_many_headers_on_a_credential_host_cost_linear_time(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """Placeholder replacement walked the headers with a per-name lookup, itself a scan of every
    field: 10,000 headers held the event loop (every agent) for 19 s. Compared with 1,000 headers in
    the same run, 10x the headers must cost about 10x, not 100x."""
    with run_logging_origin(ca=origin_ca) as origin:
        rules = {
            "agents": [{"id": "greedy", "token_sha256": [sha256_hex(AGENTS["greedy"])], "policies": ["p"]}],
            "policies": {"p": {
                "allow": [{"id": "cred", "host": "cred.test", "ports": [origin.port], "addresses": ["127.0.0.1/32"]}],
                "credentials": [{"id": "c", "host": "cred.test", "ports": [origin.port], "placeholder": "PLACEHOLDER-X1",
                                 "inject": {"Authorization": "Bearer ${secret:CRED}"}}],
            }},
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))},
        }
        # ~1 MB of head: above the default bound on one head (warden_max_head_bytes, 64 KiB)
        warden = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              agents={"greedy": AGENTS["greedy"]}, env={"CRED": "cred-secret-value-0123456789"},
                              extra_args=["--set", "warden_max_head_bytes=2000000"])
        try:
            def timed_get(n: int) -> float:
                headers = {f"X-Filler-{i}": "v" * 80 for i in range(n)} | {"X-Token": "PLACEHOLDER-X1"}
                sock = open_tunnel(warden, "greedy", "cred.test", origin.port, timeout=60)
                with sock:
                    started = time.monotonic()
                    sock.sendall(request_bytes("GET", f"/h{n}", f"cred.test:{origin.port}", headers))
                    assert read_response(sock).status == 200
                    return time.monotonic() - started
            small, large = timed_get(1000), timed_get(10000)
        finally:
            warden.stop()
    seen = {r.target: r for r in origin.requests}
    assert seen["/h10000"].header("x-token") == "cred-secret-value-0123456789"  # still replaced
    assert seen["/h10000"].header("x-filler-9999") == "v" * 80  # untouched headers byte-exact
    assert large < 30 * max(small, 0.02), f"1,000 headers {small:.3f} s, 10,000 headers {large:.3f} s"


def test_a_buffered_request_whose_rules_changed_while_it_uploaded_is_decided_again(tmp_path: Path) -> None:
    """Half-sent when a reload takes its path away, finished after: refused under the new rules
    (it used to reach the origin under the old decision, audited with the old policy version)."""
    def rules(paths: list[str]) -> dict[str, Any]:
        return {
            "agents": [{"id": "greedy", "token_sha256": [sha256_hex(AGENTS["greedy"])], "policies": ["p"]}],
            "policies": {"p": {"allow": [{"id": "api", "host": "api.test", "ports": [origin.port], "paths": paths,
                                          "addresses": ["127.0.0.1/32"]}]}},
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))},
        }
    with run_logging_origin() as origin:
        warden = start_warden(tmp_path, rules(["/ok/**", "/other/**"]), agents={"greedy": AGENTS["greedy"]})
        try:
            first = _held_open(warden, origin, "/ok/upload", 3000)
            assert wait_until(lambda: _held(warden, "greedy") == 3000, 10)
            old_version = warden.audit_records(lambda rs: any(r.get("event") == "startup" for r in rs))
            reload_rules(warden, rules(["/other/**"]))
            with first:
                first.sendall(b"h")
                answer = read_response(first, "POST")
            assert answer.status == 403 and answer.headers["x-warden-reason"] == "path_not_allowed"
            assert _post(warden, origin, "greedy", "/other/x", 10).status == 200  # the new rules in force
            record = audit_where(warden, lambda r: r.get("event") == "request" and r.get("path") == "/ok/upload")[0]
        finally:
            warden.stop()
    assert "/ok/upload" not in _arrived(origin)
    startup_version = next(r["policy_version"] for r in old_version if r.get("event") == "startup")
    assert record["decision"] == "deny" and record["policy_version"] != startup_version


def test_unfinished_websocket_messages_give_their_memory_back_when_the_socket_closes(
        tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path) -> None:
    """10 WebSockets each holding a 6 MiB message that never finishes, closed, three rounds: the
    fragments went with the layer only at the cyclic GC, so every round added to Warden's memory
    (red team 5: 116 -> 257 -> 380 MiB); now each round reuses what the last one freed."""
    from wsproto.events import AcceptConnection, TextMessage

    with run_ws_origin(origin_ca, "no-secret-here-0123456789") as ws:
        rules = {
            "agents": [{"id": "greedy", "token_sha256": [sha256_hex(AGENTS["greedy"])], "policies": ["p"]}],
            "policies": {"p": {"allow": [{"id": "ws", "host": "api.test", "ports": [ws.port], "websocket": True,
                                          "addresses": ["127.0.0.1/32"]}]}},
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")), "tls_intercept": "always"},
        }
        warden = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              agents={"greedy": AGENTS["greedy"]})
        try:
            pid = warden_pid(warden)
            peaks = []
            for _ in range(3):
                clients = []
                for _ in range(10):
                    sock = open_tunnel(warden, "greedy", "api.test", ws.port, timeout=30)
                    client = WsClient(sock, f"api.test:{ws.port}")
                    events = client.events(lambda evs: any(isinstance(e, AcceptConnection) for e in evs))
                    assert any(isinstance(e, AcceptConnection) for e in events)
                    for _ in range(96):  # 6 MiB in 64 KiB fragments, never the last one
                        client.send(TextMessage(data="y" * 65536, message_finished=False))
                    clients.append(client)
                for client in clients:
                    client.sock.close()
                assert wait_until(lambda: sum(r.get("event") == "websocket_close"
                                              for r in warden.audit_records()) >= 10 * (len(peaks) + 1), 15)
                peaks.append(peak_rss_kib(pid) / 1024)
        finally:
            warden.stop()
    assert peaks[2] - peaks[0] < 32, f"peak RSS after each round: {[round(p) for p in peaks]} MiB"
