"""WARDEN_EVENT_LOOP (runtime/eventloop.py): asyncio by default, uvloop on request, with
mitmproxy's eager task factory working on both (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme
from egresswarden.runtime import eventloop

from .bypass_helpers import connect_raw, read_until_closed
from .harness import curl, hosts_file, run_origin, sha256_hex, start_warden


@pytest.fixture
def restore_policy() -> Iterator[None]:
    yield
    asyncio.set_event_loop_policy(None)


def test_default_is_asyncio_and_bad_values_are_refused(restore_policy: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.install() == "asyncio"
    with pytest.raises(eventloop.EventLoopError, match="use one of"):
        eventloop.install("libev")


def test_uvloop_runs_mitmproxys_eager_task_factory(restore_policy: None) -> None:
    pytest.importorskip("uvloop")
    assert eventloop.install("uvloop") == "uvloop"

    async def main() -> tuple[str, list[str]]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # what mitmproxy's Master.run does
        order: list[str] = []

        async def step() -> None:
            order.append("task ran")

        task = asyncio.create_task(step())
        order.append("create_task returned")
        await task
        return type(loop).__module__, order

    module, order = asyncio.run(main())
    assert module == eventloop.__name__
    assert order == ["task ran", "create_task returned"], "tasks must still start eagerly"


@pytest.mark.e2e
def test_warden_on_uvloop_passes_through_and_intercepts(tmp_path: Path, origin_ca: trustme.CA,
                                                        origin_ca_file: Path) -> None:
    pytest.importorskip("uvloop")
    with run_origin(ca=origin_ca) as tls:
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex("t0k")], "policies": ["main"]}],
            "policies": {"main": {"allow": [
                {"id": "pass", "host": "allowed.test", "ports": [tls.port]},
                {"id": "api", "host": "api.test", "ports": [tls.port], "paths": ["/ok/**"]},
                {"id": "loopback", "cidr": "127.0.0.1/32", "ports": [tls.port]},
            ]}},
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))},
        }
        w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, env={eventloop.ENV: "uvloop"},
                         agents={"coder": "t0k"})
        try:
            env = {"https_proxy": w.proxy_url("coder")}
            r = curl(["--cacert", str(origin_ca_file), "-w", "\n%{http_code}", f"https://allowed.test:{tls.port}/x"],
                     env=env)
            assert r.stdout.endswith("200"), r.stderr
            r = curl(["--cacert", str(w.ca_cert), "-w", "\n%{http_code}", f"https://api.test:{tls.port}/ok/1"], env=env)
            assert r.stdout.endswith("200"), r.stderr
            r = curl(["--cacert", str(w.ca_cert), "-w", "\n%{http_code}", f"https://api.test:{tls.port}/no"], env=env)
            assert r.stdout.endswith("403")
            closed = [x for x in w.audit_records(lambda rs: any(x.get("event") == "tunnel_close" for x in rs))
                      if x.get("event") == "tunnel_close" and x.get("host") == "allowed.test"]
            assert closed and closed[0]["bytes_up"] > 0 and closed[0]["bytes_down"] > 0
        finally:
            w.stop()
        assert "TypeError" not in w.output() and "eager_start" not in w.output()


@pytest.mark.e2e
def test_unknown_event_loop_refuses_to_start(tmp_path: Path) -> None:
    rules = {"agents": [{"id": "a", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "x.test"}]}}}
    w = start_warden(tmp_path, rules, env={eventloop.ENV: "libev"}, expect_start=False)
    assert w.proc.wait(60) == 2
    assert "WARDEN_EVENT_LOOP='libev'" in w.output()


def test_on_uvloop_a_server_that_speaks_first_is_refused_in_a_tls_only_tunnel(
        tmp_path: Path, origin_ca_file: Path) -> None:
    """Red team 17: on uvloop the upstream's first bytes can arrive while the fast path is still
    deciding (before the task resumes from create_connection); they were then relayed without
    the raw_tcp check, in up to a third of the tunnels (four clients at once make it likelier).
    Every one must be refused now, and nothing the client sends may reach the server."""
    pytest.importorskip("uvloop")
    rounds = 80
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    server.settimeout(30)
    got: list[bytes] = []

    def one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2)
            conn.sendall(b"SSH-2.0-greeter\r\n")  # at once, before anything is read
            got.append(conn.recv(100))

    def serve() -> None:
        with contextlib.suppress(OSError):
            for _ in range(4 * rounds):  # a refused tunnel is handed to mitmproxy, which connects again
                conn, _ = server.accept()
                threading.Thread(target=one, args=(conn,), daemon=True).start()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    rules = {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex("t0k")], "policies": ["main"]}],
        "policies": {"main": {"allow": [
            {"id": "tls-only", "host": "allowed.test", "ports": [port], "addresses": ["127.0.0.1/32"]}]}},
        "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))},
    }
    w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, env={eventloop.ENV: "uvloop"},
                     agents={"coder": "t0k"})

    def tunnel(_: int) -> bool:
        sock, status, _ = connect_raw(w, "coder", f"allowed.test:{port}")
        with sock:
            assert status == 200
            sock.sendall(b"SSH-2.0-client\r\n")
            return b"SSH-2.0-greeter" in read_until_closed(sock, timeout=5)
    try:
        with ThreadPoolExecutor(4) as pool:
            greeted = sum(pool.map(tunnel, range(rounds)))
        assert greeted == 0, f"{greeted} of {rounds} tunnels carried the server's greeting"
        refused = [r for r in w.audit_records(lambda rs: sum(r.get("event") == "tunnel_refused" for r in rs) >= rounds)
                   if r.get("event") == "tunnel_refused"]
        assert len(refused) == rounds and all("raw_tcp: true" in r["message"] for r in refused)
    finally:
        w.stop()
        server.close()
        thread.join(10)
    assert not any(got), [g for g in got if g][:3]  # the client's bytes never reached the server
