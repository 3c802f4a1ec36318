"""The launcher's side of the sandbox: admin-socket client and the outer bridge relay.

`AdminClient` is one connection to Warden's admin socket (see protocol.py); requests are
serialised with a lock, because the bridge announces each new proxy connection's source
port from its own thread while the main thread waits for the sandbox.

`Bridge` listens on a unix socket in the launcher's private directory (bind-mounted into
the sandbox as /run/warden/proxy.sock). For each connection from inside it opens a TCP
connection to Warden's proxy port, announces that connection's source port to Warden
(`conn`) and only then relays bytes, so Warden accepts the session token on it; `unconn`
when it closes. Concurrency is bounded; a refused announcement closes the connection.

Only processes inside the sandbox may use the bridge: each peer's pid (SO_PEERCRED) must be
in the sandbox's PID namespace (its inode from bwrap's --info-fd). Until that is known, and
for anyone else on the host who finds the socket in the launcher's private directory, the
connection is closed unanswered.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from typing import Any

from egresswarden.sandbox.inner import MAX_CONNECTIONS, relay_pair
from egresswarden.sandbox.protocol import MAX_REPLY_BYTES, Op


class AdminError(Exception):
    pass


class AdminClient:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise AdminError(f"cannot connect to Warden's admin socket {path}: {e.strerror or e}") from None
        self.reader = self.sock.makefile("rb")
        self.lock = threading.Lock()

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self.lock:
            try:
                self.sock.sendall(data)
                line = self.reader.readline(MAX_REPLY_BYTES)
            except OSError as e:
                raise AdminError(f"Warden's admin socket failed: {e}") from None
        if not line:
            raise AdminError("Warden closed the admin connection")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise AdminError("malformed reply from Warden")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


class Bridge:
    def __init__(self, socket_path: str, proxy: tuple[str, int], admin: AdminClient) -> None:
        self.proxy = proxy
        self.admin = admin
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        self.listener.listen(128)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.closed = False
        self.pid_namespace: int | None = None  # set once bwrap reported the sandbox's namespaces
        self.thread = threading.Thread(target=self._accept, name="warden-sandbox-bridge", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self._from_sandbox(conn) or not self.slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _from_sandbox(self, conn: socket.socket) -> bool:
        if self.pid_namespace is None:
            return False
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            return pid > 0 and os.stat(f"/proc/{pid}/ns/pid").st_ino == self.pid_namespace
        except OSError:
            return False

    def _handle(self, inside: socket.socket) -> None:
        port = 0
        try:
            try:
                upstream = socket.create_connection(self.proxy, timeout=10)
            except OSError:
                inside.close()
                return
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port = upstream.getsockname()[1]
            try:
                ok = self.admin.call({"op": Op.CONN, "port": port}).get("ok") is True
            except (AdminError, ValueError):
                ok = False
            if not ok:
                upstream.close()
                inside.close()
                port = 0
                return
            relay_pair(inside, upstream)
        finally:
            if port:
                with contextlib.suppress(AdminError, ValueError):
                    self.admin.call({"op": Op.UNCONN, "port": port})
            self.slots.release()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
