"""End to end: an upstream's informational (1xx) responses are not taken for its final answer
(runtime/http1_informational.py).

A raw HTTP/1.1 origin on 127.0.0.1 answers with 1xx heads before its final response; an agent
speaks raw HTTP/1.1 through a real `warden run` and must get the final response, and the audit
record must carry its status.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .harness import Warden, hosts_file, sha256_hex, start_warden

FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
ANSWERS = {
    b"/hints": [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                FINAL],
    # one byte at a time: a 1xx head that is not complete yet must not be read as anything
    b"/trickle": [bytes([b]) for b in b"HTTP/1.1 102 Processing\r\n\r\n"] + [FINAL],
    b"/many": [b"HTTP/1.1 102 Processing\r\n\r\n"] * 17 + [FINAL],
    # spellings mitmproxy's parser reads as 1xx (red team 23: a strict pattern let them through)
    b"/odd": [b"HTTP/1.1  100 Continue\r\n\r\n", b"HTTP/1.1\t102\r\n\r\n", b"HTTP/1.2 100 X\r\n\r\n",
              b"HTTP/1.1 +103 Hints\n\n", FINAL],
}


def _serve(conn: socket.socket) -> None:
    conn.settimeout(10)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ")[1]
            for part in ANSWERS.get(path, [FINAL]):
                conn.sendall(part)
                if len(part) == 1:
                    time.sleep(0.01)
    except OSError:
        pass
    finally:
        conn.close()


@pytest.fixture(scope="module")
def origin_port() -> Iterator[int]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(5)
    sock.close()


@pytest.fixture(scope="module")
def warden(origin_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warden]:
    work = tmp_path_factory.mktemp("informational")
    rules = {
        "agents": [{"id": "a1", "token_sha256": [sha256_hex("tok-a1")], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"host": "api.test", "ports": [origin_port]},
                                     {"cidr": "127.0.0.1/32", "ports": [origin_port]}]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts", ["api.test"]))},
    }
    w = start_warden(work, rules, agents={"a1": "tok-a1"})
    yield w
    w.stop()


def _exchange(w: Warden, port: int, paths: list[str]) -> bytes:
    """Send the requests on one keep-alive connection; read until every answer arrived."""
    auth = base64.b64encode(b"a1:tok-a1").decode()
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        out = b""
        for answered, path in enumerate(paths, 1):
            s.sendall(f"GET http://api.test:{port}{path} HTTP/1.1\r\nHost: api.test:{port}\r\n"
                      f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            while out.count(b"hello") < answered:
                data = s.recv(65536)
                if not data:
                    return out  # closed: a 502 ends here
                out += data
    return out


def _requests(w: Warden, n: int) -> list[dict]:
    records = w.audit_records(lambda rs: sum(r.get("event") == "request" for r in rs) >= n)
    return [r for r in records if r.get("event") == "request"]


def test_the_agent_gets_the_final_response_and_the_record_its_status(warden, origin_port):
    before = len(_requests(warden, 0))
    out = _exchange(warden, origin_port, ["/hints", "/trickle", "/hints", "/odd"])
    assert out.count(b"HTTP/1.1 200 OK") == 4 and out.count(b"hello") == 4
    assert b" 100 " not in out and b" 102 " not in out and b" 103 " not in out and b"\t102" not in out
    assert [r["status"] for r in _requests(warden, before + 4)[before:]] == [200, 200, 200, 200]


def test_endless_informational_responses_end_in_a_502(warden, origin_port):
    before = len(_requests(warden, 0))
    out = _exchange(warden, origin_port, ["/many"])
    assert out.startswith(b"HTTP/1.1 502")
    assert b"informational" in out  # the agent reads why
    (record,) = _requests(warden, before + 1)[before:]
    assert record["status"] is None and "informational" in record["error"]  # as every upstream protocol error
