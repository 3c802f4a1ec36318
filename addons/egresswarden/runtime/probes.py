"""The metrics and health listener: a small HTTP server with bounded threads and timeouts.

`http.server.ThreadingHTTPServer` starts one thread per connection and waits forever for a
request line, so 50 idle connections held 52 threads. `ProbeServer` caps the handler threads
at `MAX_CONNECTIONS` (a connection over the cap is closed at once, counted in `refused`), and
every connection must deliver its request within `TIMEOUT_SECONDS`. One request per
connection (HTTP/1.0 style), which is what Prometheus and kubelet probes do anyway.

Endpoints (routes are given by the owner: the proxy's Metrics addon or the `--workers` supervisor):

    /metrics   Prometheus text
    /livez     200 while the process can make progress (its event loop turns); a failure
               means "restart me". Never depends on the audit log or the rules.
    /readyz    200 while traffic would be served: rules loaded and audit log writable.
               A failure means "send no traffic here", not "restart".
    /healthz   the same as /readyz (kept for existing probes and scripts)

Nothing here imports mitmproxy, so the supervisor starts fast.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_CONNECTIONS = 16
TIMEOUT_SECONDS = 3.0

Response = tuple[int, bytes, str]  # status, body, content type
Route = Callable[[], Response]


def json_response(status: int, report: dict[str, Any]) -> Response:
    return status, json.dumps(report).encode(), "application/json"


class _Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    timeout = TIMEOUT_SECONDS  # applied to the socket by StreamRequestHandler.setup

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            names = ", ".join(sorted(self.server.routes))
            status, body, ctype = 404, f"not found: try {names}\n".encode(), "text/plain"
        else:
            try:
                status, body, ctype = route()
            except Exception as e:  # a broken route answers 500, the listener lives on
                status, body, ctype = 500, f"internal error: {e.__class__.__name__}\n".encode(), "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: scrapes are not news
        pass


class ProbeServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: connections beyond it wait in the kernel,
    # neither served nor refused, until the scrape that follows them times out. With room for
    # a burst, each is accepted and then served or (over MAX_CONNECTIONS) closed and counted.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], routes: dict[str, Route]) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)
        self.routes = routes
        self.refused = 0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread: threading.Thread | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)  # over the cap: close now rather than queue a thread
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, name=name,
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
