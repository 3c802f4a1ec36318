"""Shared parts for the control-plane tests (issue 12): steady load, waiting, small origins."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from .harness import Warden


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until `predicate()` is truthy; return its value (or the last falsy one on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def reload_rules(warden: Any, rules: dict[str, Any], timeout: float = 15) -> None:
    """Write new rules into a running Warden and wait for its next successful `reload` record."""
    def successes() -> int:
        return sum(r.get("event") == "reload" and r.get("result") == "success" for r in warden.audit_records())
    before = successes()
    warden.write_rules(rules)
    assert wait_until(lambda: successes() > before, timeout=timeout)


def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}")


class Load:
    """Background requests through Warden until stopped: counts successes and failures."""

    def __init__(self, warden: Warden, agent: str, url: str, streams: int = 2, verify: str | bool = True) -> None:
        self.warden, self.agent, self.url, self.verify = warden, agent, url, verify
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(streams)]

    def _run(self) -> None:
        with requests.Session() as s:
            s.trust_env = False
            proxies = {"http": self.warden.proxy_url(self.agent), "https": self.warden.proxy_url(self.agent)}
            while not self._stop.is_set():
                try:
                    r = s.get(self.url, proxies=proxies, timeout=10, verify=self.verify)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"{r.status_code} {r.headers.get('X-Warden-Reason')}")
                except requests.RequestException as e:
                    self.failed.append(e.__class__.__name__)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        wait_until(lambda: self.ok > 0 or self.failed, timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


class _NamedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"server": self.server.name, "path": self.path,
                           "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def named_origin(name: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[ThreadingHTTPServer]:
    """A plain HTTP origin that says who it is (to prove which address a name resolved to)."""
    server = ThreadingHTTPServer((host, port), _NamedHandler)
    server.daemon_threads = True
    server.name = name  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def proxied_get(warden: Warden, agent: str, url: str, **kwargs: Any) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, proxies={"http": warden.proxy_url(agent), "https": warden.proxy_url(agent)},
                     timeout=15, **kwargs)


class _AlertHandler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def alert_receiver() -> Iterator[ThreadingHTTPServer]:
    """A webhook sink on 127.0.0.1 that keeps every payload in `.received`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AlertHandler)
    server.daemon_threads = True
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
