"""Tiny addon for the *bare* mitmdump baseline (never loaded into Warden).

It gives bare mitmdump the two behaviours the benchmark needs without
touching /etc/hosts, and nothing more, so the baseline stays "bare":

* every ``*.test`` host resolves to 127.0.0.1, like a hosts file (Warden
  uses ``settings.hosts_file``; squid its ``hosts_file`` directive). This is
  done at name resolution, not by rewriting ``server.address`` in
  ``server_connect``: mitmproxy keys connection reuse and its per-address
  connection limit on the address, and rewriting it makes plain-HTTP
  keep-alive stall after 5 requests (seen with mitmproxy 12.3.1);
* ``CONNECT denied.test:*`` is answered with 403 (mitmproxy sends a response
  set in the ``http_connect`` hook instead of "200 Connection established"),
  which is the bare equivalent of Warden's deny rule.
"""

import socket
from typing import Any

from mitmproxy import http

DENIED_HOST = "denied.test"
_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    # asyncio.open_connection -> loop.getaddrinfo -> socket.getaddrinfo.
    if isinstance(host, str) and host.endswith(".test"):
        host = "127.0.0.1"
    return _real_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo


def http_connect(flow: http.HTTPFlow) -> None:
    if flow.request.host == DENIED_HOST:
        flow.response = http.Response.make(403, b"denied by bench baseline\n")
