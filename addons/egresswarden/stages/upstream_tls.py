"""TLS session resumption towards upstreams (`--set warden_upstream_tls_resumption`, on by default).

An intercepted tunnel per request (a CI job's `pip download`, `git` in a fresh process, any
client without keep-alive) pays a full TLS handshake on both legs. The upstream leg is the
dearer one: key exchange, the server's signature, chain and hostname verification. Measured
with pyOpenSSL against a local TLS 1.3 server: 1.35 ms of client CPU for a full handshake,
0.83 ms for a resumed one.

How a session may be reused, and why:

* **Key.** OpenSSL checks neither the hostname nor the chain again on resumption: a session
  from `a.test` resumes a handshake that asked for `b.test` if that server accepts the ticket
  (measured). So a session is offered only to a connection with the same SNI, the same
  upstream address and port, the same pyOpenSSL context (mitmproxy builds one per verification
  setting: trusted CA file and directory, TLS versions, ciphers, client certificate; the context
  object itself is part of the key, so a changed setting never reuses an old session), and the
  same agent: no TLS state is shared between agents, so an upstream cannot link two agents'
  connections through their sessions.
* **Only verified sessions.** A session is stored only from a connection whose handshake
  completed with the chain and hostname verified (mitmproxy verifies upstreams: VERIFY_PEER;
  Warden refuses `ssl_insecure`). A resumed session keeps its peer chain, so mitmproxy's
  `certificate_list` and everything that reads it see the original, verified chain.
* **Single use.** A session is taken out when it is offered; the connection's session goes
  back once, at its first response (TLS 1.3 tickets arrive after the handshake, before the
  response) or at its close. A server that refuses the ticket gets a full, verified
  handshake: resumption can only fail towards the normal path.
* **Fresh verification.** A session descends from the full handshake that verified it; one
  whose full handshake is older than MAX_VERIFIED_AGE is not offered, so each key's chain and
  hostname are verified in full at least that often.
* **Only intercepted tunnels.** The agent is the one of the tunnel's CONNECT; a plain proxy
  request for an `https://` URL is identified per request, so its upstream TLS is neither
  resumed nor kept.
* **Bounds.** At most SESSIONS_PER_KEY sessions per key, MAX_SESSIONS and MAX_SESSION_BYTES
  in all (the key stored into least recently goes first; a session's size is counted with
  its ticket and peer chain; a chain longer than MAX_CHAIN_CERTS or MAX_CHAIN_BYTES, or a
  session larger than MAX_SERIALIZED_SESSION_BYTES, is not kept);
  keys that can no longer be offered are dropped as the store is used; the store is emptied
  when an upstream TLS option changes.

mitmproxy's TlsConfig builds the upstream SSL.Connection in `tls_start_server`; Warden's
chain runs before it, so the session is set by a subclass of TlsConfig that takes its place
in the addon list (runtime/master.py). Under plain `mitmdump -s` there is no such subclass:
the option exists and nothing is resumed.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from mitmproxy import connection, ctx, http, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

from egresswarden.runtime.context import Connections, TunnelMode

MAX_SESSIONS = 8192  # all keys together
SESSIONS_PER_KEY = 16  # a burst of new connections to one upstream each needs its own session
# A session holds the peer's whole certificate chain (OpenSSL keeps it for resumption). A
# hostile server can pad a valid chain with certificates chain building ignores, up to the
# ~100 KB a client accepts (red team 22: 208 KiB per session, 1.7 GB at MAX_SESSIONS), so a
# session is kept only when its chain is small, and all sessions together within a budget.
MAX_CHAIN_CERTS = 6
MAX_CHAIN_BYTES = 24 * 1024  # DER; public web chains are 2-8 KB
# The session itself, its ticket included: a hostile TLS 1.3 server can pad its ticket to
# ~128 KB, which OpenSSL's client keeps (red team 23: 66 KB sessions counted as 3 KB).
MAX_SERIALIZED_SESSION_BYTES = 8 * 1024  # real tickets are 100-1,500 bytes
SESSION_OVERHEAD_BYTES = 2048  # the Python objects, OpenSSL's own structures
MAX_SESSION_BYTES = 32 * 1024 * 1024  # all held sessions together
MAX_VERIFIED_AGE = 600.0  # seconds: a chain and hostname are verified in full at least this often
MAX_PENDING = 65536  # upstream connections between their TLS start and their close

# Options whose change empties the cache (mitmproxy builds new contexts for them anyway).
TLS_OPTIONS = frozenset({
    "ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir",
    "client_certs", "tls_version_server_min", "tls_version_server_max", "ciphers_server",
    "tls_ecdh_curve_server", "warden_upstream_tls_resumption",
})

X509_V_OK = 0

SessionKey = tuple[object, str, str, int, str]  # (SSL context, SNI, address host, port, agent)


@dataclass(frozen=True)
class HeldSession:
    session: SSL.Session
    verified_at: float  # monotonic time of the full handshake this session descends from
    size: int = SESSION_OVERHEAD_BYTES  # what it holds in memory, its chain included (estimate)


class UpstreamSessions:
    """Resumable upstream TLS sessions, by SessionKey; counts full and resumed handshakes."""

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self._sessions: OrderedDict[SessionKey, deque[HeldSession]] = OrderedDict()
        self._held = 0
        self.held_bytes = 0
        self.enabled = True
        self.resumed = 0
        self.full = 0

    def take(self, key: SessionKey, now: float) -> HeldSession | None:
        """The newest session for key that was verified in full recently enough, taken out."""
        self._purge(now)
        held = self._sessions.get(key)
        found = None
        while held and found is None:
            candidate = held.pop()  # the newest
            self._forget(candidate)
            if now - candidate.verified_at < MAX_VERIFIED_AGE:
                found = candidate
            else:
                for older in held:  # older still
                    self._forget(older)
                held.clear()
        if held is not None and not held:
            del self._sessions[key]
        return found

    def put(self, key: SessionKey, session: HeldSession, now: float) -> None:
        self._purge(now)
        held = self._sessions.get(key)
        if held is None:
            held = self._sessions[key] = deque()
        else:
            self._sessions.move_to_end(key)
        if len(held) >= SESSIONS_PER_KEY:
            self._forget(held.popleft())  # the oldest
        held.append(session)
        self._held += 1
        self.held_bytes += session.size
        while self._held > MAX_SESSIONS or self.held_bytes > MAX_SESSION_BYTES:  # least recently stored key first
            self._drop_oldest_key()

    def _forget(self, session: HeldSession) -> None:
        self._held -= 1
        self.held_bytes -= session.size

    def _drop_oldest_key(self) -> None:
        _, dropped = self._sessions.popitem(last=False)
        for session in dropped:
            self._forget(session)

    def _purge(self, now: float) -> None:
        """Keys whose newest session can no longer be offered go, oldest stored first (a key
        stored into long ago is at the front): memory is not held for sessions nobody may use."""
        while self._sessions:
            newest = next(iter(self._sessions.values()))[-1]
            if now - newest.verified_at < MAX_VERIFIED_AGE:
                return
            self._drop_oldest_key()

    def clear(self) -> None:
        self._sessions.clear()
        self._held = 0
        self.held_bytes = 0

    def agent_of(self, client: connection.Client) -> str | None:
        """The agent of an intercepted tunnel's connection; None for anything else. A plain
        proxy request (`GET https://...` without CONNECT) is identified per request, so the
        connection names no agent its upstream TLS could be kept for (red team 22: such a
        request behind another agent's refused CONNECT resumed, and refilled, that agent's
        session); those connections resume nothing."""
        state = self.connections.peek(client)
        tunnel = state.tunnel if state is not None else None
        if tunnel is None or tunnel.mode is not TunnelMode.INTERCEPT:
            return None
        return tunnel.agent

    def __len__(self) -> int:
        return self._held

    def load(self, loader: Any) -> None:
        loader.add_option(
            "warden_upstream_tls_resumption", bool, True,
            "Resume TLS sessions towards upstreams (per agent, SNI, address and verification "
            "settings; only sessions whose chain and hostname were verified).")

    def configure(self, updated: set[str]) -> None:
        if updated & TLS_OPTIONS:
            self.clear()
            self.enabled = bool(ctx.options.warden_upstream_tls_resumption) and not ctx.options.ssl_insecure


@dataclass
class _Pending:
    key: SessionKey
    ssl_conn: SSL.Connection
    offered: HeldSession | None
    verified_at: float | None = None  # set once the handshake completed
    kept: bool = False  # its session was stored (once per connection: a ticket is used once)


class ResumingTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TlsConfig, plus an upstream session offered and kept (see the module doc)."""

    def __init__(self, sessions: UpstreamSessions) -> None:
        super().__init__()
        self.sessions = sessions
        self._pending: OrderedDict[str, _Pending] = OrderedDict()  # server connection id ->

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        provided = tls_start.ssl_conn is not None  # another addon's own context: not ours to resume
        super().tls_start_server(tls_start)
        ssl_conn = tls_start.ssl_conn
        if provided or ssl_conn is None or tls_start.is_dtls or not self.sessions.enabled:
            return
        key = self._key(tls_start, ssl_conn)
        if key is None:
            return
        offered = self.sessions.take(key, time.monotonic())
        if offered is not None:
            ssl_conn.set_session(offered.session)
        self._pending[tls_start.conn.id] = _Pending(key, ssl_conn, offered)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def _key(self, tls_start: tls.TlsData, ssl_conn: SSL.Connection) -> SessionKey | None:
        server = tls_start.conn
        agent = self.sessions.agent_of(tls_start.context.client)
        if not isinstance(server, connection.Server) or agent is None or server.address is None or not server.sni:
            return None
        return (ssl_conn.get_context(), str(server.sni), str(server.address[0]), int(server.address[1]), agent)

    def tls_established_server(self, data: tls.TlsData) -> None:
        if data.ssl_conn is None:
            return
        resumed = bool(SSL._lib.SSL_session_reused(data.ssl_conn._ssl))  # type: ignore[attr-defined]  # noqa: SLF001
        if resumed:
            self.sessions.resumed += 1
        else:
            self.sessions.full += 1
        pending = self._pending.get(data.conn.id)
        if pending is None:
            return
        if resumed and pending.offered is not None:
            pending.verified_at = pending.offered.verified_at
        elif not resumed:
            pending.verified_at = time.monotonic()
        # else: resumed a session Warden did not offer (none was set): never kept

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._pending.pop(data.conn.id, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # The first response is the earliest point where a TLS 1.3 ticket has surely been read
        # (servers send it right after the handshake); keeping it only at the close would make
        # the next one-shot connection, which often starts before that, miss it.
        if flow.server_conn.tls_established:
            pending = self._pending.get(flow.server_conn.id)
            if pending is not None:
                self._keep(pending, flow.server_conn)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        pending = self._pending.pop(data.server.id, None)
        if pending is None or pending.verified_at is None:
            return
        # mitmproxy closes upstream TLS without a close_notify, and OpenSSL marks the session of a
        # connection freed without one as not resumable (the rule of SSL 3 and TLS 1.0; TLS 1.1
        # dropped it: RFC 4346 7.2.1). A fatal alert still marks it, when it is sent or received.
        ssl_conn = pending.ssl_conn
        ssl_conn.set_shutdown(ssl_conn.get_shutdown() | SSL.SENT_SHUTDOWN)
        self._keep(pending, data.server)

    def _keep(self, pending: _Pending, server: connection.Server) -> None:
        """Store the connection's session, once, if its handshake completed and verified and
        its chain is small enough to hold."""
        if pending.kept or pending.verified_at is None or not self.sessions.enabled:
            return
        pending.kept = True  # decided once, either way
        ssl_conn = pending.ssl_conn
        if SSL._lib.SSL_get_verify_result(ssl_conn._ssl) != X509_V_OK:  # type: ignore[attr-defined]  # noqa: SLF001
            return
        chain = server.certificate_list
        if not chain or len(chain) > MAX_CHAIN_CERTS:
            return
        chain_bytes = sum(len(c.to_cryptography().public_bytes(serialization.Encoding.DER)) for c in chain)
        if chain_bytes > MAX_CHAIN_BYTES:
            return
        session = ssl_conn.get_session()
        native = getattr(session, "_session", None)  # pyOpenSSL's SSL_SESSION pointer
        if session is None or native is None:
            return
        session_bytes = int(SSL._lib.i2d_SSL_SESSION(native, SSL._ffi.NULL))  # type: ignore[attr-defined]  # noqa: SLF001
        if not 0 < session_bytes <= MAX_SERIALIZED_SESSION_BYTES:
            return
        held = HeldSession(session, pending.verified_at, SESSION_OVERHEAD_BYTES + session_bytes + chain_bytes)
        self.sessions.put(pending.key, held, time.monotonic())
