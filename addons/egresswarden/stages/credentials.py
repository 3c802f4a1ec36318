"""Credentials addon: strip the agent's credentials, inject the real ones where bound, stop leaks.

Runs after Policy (and MCP). Per request:

  requestheaders  decide which of the agent's credentials are bound to this request
                  (engine.credentials.bound_credentials + the tunnel checks below), strip the
                  policy-level and bound credentials' `strip` headers, scan host/URL/headers for
                  any secret or placeholder that is not bound here (deny `secret_leak`), and for
                  bodies larger than settings.body_scan_max_buffered_bytes (or of unknown size)
                  set a streaming scanner; streamed requests get their injection here.
  request         scan the buffered body (raw and decoded), replace placeholders, inject.
  responseheaders redact echoed secrets in response headers; stream large response bodies
                  through a redactor.
  response        redact the buffered response body.

Never injects into plain HTTP (the secret would cross the network in clear text): a
plain-HTTP request to a credential's host is treated as unbound, so a placeholder or secret
in it is a leak. Secrets never reach logs, exception texts, refusal bodies or audit records:
messages name the credential id and the encoding only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mitmproxy import http

from egresswarden.core.credentials import (
    Leak,
    Scanner,
    StreamRedactor,
    StreamScanner,
    bound_credentials,
    headers_text,
    injections,
    replace_placeholders,
    scanner_for,
    strip_names,
)
from egresswarden.core.decision import Interception, Reason, deny
from egresswarden.core.hostnames import HostError, normalize_host, parse_ip
from egresswarden.core.ruleset import CompiledCredential, RuleSet
from egresswarden.runtime.context import Connections, FlowRecord, record_of
from egresswarden.runtime.failsafe import fail_closed, refusal_response
from egresswarden.runtime.rulestore import RuleStore
from egresswarden.stages.policy import _split_authority

logger = logging.getLogger("warden")

CONTEXT_KEY = "warden.credentials"
DEFAULT_MAX_BUFFERED = 1024 * 1024


@dataclass
class _Context:
    """Per-flow state (never logged: holds compiled credentials, whose repr hides secrets)."""

    rules: RuleSet
    scanner: Scanner
    bound: list[CompiledCredential] = field(default_factory=list)
    bound_ids: frozenset[str] = frozenset()
    streamed: bool = False
    injected: bool = False
    stream: StreamScanner | None = None
    leak_recorded: bool = False

    def redact_ids(self) -> frozenset[str]:
        return frozenset(c.id for c in self.bound if c.redact_response)


def _max_buffered(rules: RuleSet) -> int:
    value = getattr(rules.settings, "body_scan_max_buffered_bytes", None)
    return int(value) if value else DEFAULT_MAX_BUFFERED


class Credentials:
    def __init__(self, store: RuleStore, connections: Connections) -> None:
        self.store = store
        self.connections = connections

    # -- helpers ---------------------------------------------------------------------------
    def _tunnel_agrees(self, flow: http.HTTPFlow, record: FlowRecord) -> bool:
        """Defence in depth: CONNECT host, SNI, Host header and pinned address all agree."""
        state = self.connections.peek(flow.client_conn)
        tunnel = state.tunnel if state is not None else None
        if tunnel is None or not tunnel.intercept or record.interception is not Interception.INTERCEPT:
            return False
        if tunnel.sni_mismatch is not None or tunnel.address is None:
            return False
        if tunnel.host != record.host or tunnel.port != record.port or tunnel.agent != record.agent:
            return False
        sni = flow.client_conn.sni
        if sni is not None:
            try:
                if normalize_host(sni) != tunnel.host:
                    return False
            except HostError:
                return False
        header = flow.request.host_header
        if header is not None:
            try:
                host, port = _split_authority(header, tunnel.port)
                if normalize_host(host) != tunnel.host or port != tunnel.port:
                    return False
            except (ValueError, HostError):
                return False
        peer = flow.server_conn.peername or flow.server_conn.address
        if peer:
            ip = parse_ip(str(peer[0]))
            if ip is not None and ip != tunnel.address:
                return False
        return True

    def _deny_leak(self, flow: http.HTTPFlow, record: FlowRecord, rules: RuleSet, leak: Leak,
                   respond: bool = True) -> None:
        decision = deny(Reason.SECRET_LEAK, leak.message(), rules.version, leak.credentials[0])
        record.decision = decision
        if record.path:  # the audit record must not carry the secret either
            record.path = scanner_for(rules).redact_str(record.path, force=True)[0]
        if "secret_leak" not in record.events:
            record.events.append("secret_leak")
        logger.warning("warden: secret_leak agent=%s host=%s credential=%s where=%s encoding=%s",
                       record.agent, record.host, ",".join(leak.credentials), leak.where, leak.encoding)
        if respond:
            flow.response = refusal_response(decision, record.agent)

    def _inject(self, flow: http.HTTPFlow, record: FlowRecord, ctx: _Context) -> None:
        if not ctx.bound or ctx.injected:
            return
        req = flow.request
        for name in list(req.headers.keys()):
            values = req.headers.get_all(name)
            replaced = [replace_placeholders(v, ctx.bound) for v in values]
            if replaced != values:
                req.headers.set_all(name, replaced)
        url_creds = [c for c in ctx.bound if c.allow_secret_in_url]
        if url_creds:
            path = replace_placeholders(req.path, url_creds)
            if path != req.path:
                req.path = path
        headers, query = injections(ctx.bound)
        for name, value in headers:
            req.headers[name] = value
        if query:
            q = req.query
            for name, value in query:
                q[name] = value
        # Ask for an unencoded response so an echoed secret can be recognised and redacted.
        if any(c.redact_response for c in ctx.bound):
            req.headers["Accept-Encoding"] = "identity"
        ctx.injected = True
        for cred in ctx.bound:
            if cred.id not in record.credentials:
                record.credentials.append(cred.id)

    # -- hooks -----------------------------------------------------------------------------
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        rules = self.store.current
        if rules is None or record.agent is None:
            return
        agent = rules.agent(record.agent)
        if agent is None:
            return
        scanner = scanner_for(rules)
        ctx = _Context(rules, scanner)
        intercepted = self._tunnel_agrees(flow, record)
        if intercepted and record.host and record.port:
            ctx.bound = bound_credentials(rules, agent, record.host, record.port, "https", flow.request.method,
                                          flow.request.path, True)
            ctx.bound_ids = frozenset(c.id for c in ctx.bound)
        flow.metadata[CONTEXT_KEY] = ctx
        strip = strip_names(agent, ctx.bound)
        for name in strip:
            if name in flow.request.headers:
                del flow.request.headers[name]
        leak = scanner.find_leak(headers_text(record.host or flow.request.host, flow.request.path,
                                              flow.request.headers.items(multi=True)), ctx.bound_ids,
                                 "URL or headers")
        if leak is not None:
            self._deny_leak(flow, record, rules, leak)
            return
        if scanner.automaton is None:
            if ctx.bound:
                self._inject(flow, record, ctx)  # nothing to scan: inject now
            return
        length = flow.request.headers.get("content-length")
        chunked = "chunked" in flow.request.headers.get("transfer-encoding", "").lower()
        # Unknown length (HTTP/1 chunked, HTTP/2 without content-length) or over the limit: stream.
        unknown = length is None and (chunked or flow.request.http_version.startswith("HTTP/2"))
        big = unknown or (length is not None and length.strip().isdigit() and int(length) > _max_buffered(rules))
        if big and flow.request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            self._deny_leak_unscannable(flow, record, rules)
            return
        if big:
            stream = StreamScanner(scanner, ctx.bound_ids)
            ctx.stream = stream

            def scan_chunk(chunk: bytes) -> bytes | list[bytes]:
                out = stream.feed(chunk)
                if stream.leak is not None and not ctx.leak_recorded:
                    ctx.leak_recorded = True
                    self._deny_leak(flow, record, rules, stream.leak, respond=False)
                return out if out else []  # an empty bytes chunk would end a chunked HTTP/1 body early
            flow.request.stream = scan_chunk
            ctx.streamed = True
            self._inject(flow, record, ctx)  # headers leave with the start of the stream

    def _deny_leak_unscannable(self, flow: http.HTTPFlow, record: FlowRecord, rules: RuleSet) -> None:
        decision = deny(Reason.BODY_TOO_LARGE,
                        "a compressed request body larger than the scan limit cannot be checked for secrets; "
                        "send it uncompressed", rules.version)
        record.decision = decision
        flow.response = refusal_response(decision, record.agent)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        ctx: _Context | None = flow.metadata.get(CONTEXT_KEY)
        if ctx is None or ctx.streamed:
            return
        record = record_of(flow)
        body = flow.request.raw_content or b""
        if body and ctx.scanner.automaton is not None:
            leak = ctx.scanner.find_leak(body, ctx.bound_ids, "body")
            if leak is None and flow.request.headers.get("content-encoding"):
                decoded = flow.request.get_content(strict=False) or b""
                if decoded != body:
                    leak = ctx.scanner.find_leak(decoded, ctx.bound_ids, "body")
            if leak is not None:
                self._deny_leak(flow, record, ctx.rules, leak)
                return
        self._inject(flow, record, ctx)

    def _streamed_leak(self, flow: http.HTTPFlow, ctx: _Context | None) -> bool:
        """A leak found in a streamed request body: the agent gets the refusal, not the upstream's answer."""
        if ctx is None or not ctx.leak_recorded:
            return False
        record = record_of(flow)
        assert record.decision is not None
        flow.response = refusal_response(record.decision, record.agent)
        return True

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx: _Context | None = flow.metadata.get(CONTEXT_KEY)
        if self._streamed_leak(flow, ctx):
            return
        if ctx is None or not ctx.injected or flow.response is None:
            return
        only = ctx.redact_ids()
        if not only:
            return
        resp = flow.response
        for name in list(resp.headers.keys()):
            values = resp.headers.get_all(name)
            redacted = [ctx.scanner.redact_str(v, only)[0] for v in values]
            if redacted != values:
                resp.headers.set_all(name, redacted)
        length = resp.headers.get("content-length")
        known_small = length is not None and length.strip().isdigit() and int(length) <= _max_buffered(ctx.rules)
        if not known_small and resp.headers.get("content-encoding", "identity").lower() in ("identity", ""):
            redactor = StreamRedactor(ctx.scanner, only)
            # Redaction changes the length, and a chunk may be held back (empty output): send the
            # body to the agent close-delimited (HTTP/1) or as DATA frames (HTTP/2). With chunked
            # framing an empty chunk from a stream callable would end the body early. mitmproxy
            # already chose how to read the upstream body, so this only affects the agent side.
            for name in ("content-length", "transfer-encoding"):
                if name in resp.headers:
                    del resp.headers[name]
            # The MCP addon (later in the chain) wraps this callable; it must return bytes.
            resp.stream = redactor.feed

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        ctx: _Context | None = flow.metadata.get(CONTEXT_KEY)
        if self._streamed_leak(flow, ctx):
            return
        if ctx is None or not ctx.injected or flow.response is None or flow.response.stream:
            return
        only = ctx.redact_ids()
        if not only or not flow.response.raw_content:
            return
        content = flow.response.get_content(strict=False) or b""
        redacted, n = ctx.scanner.redact(content, only)
        if n:
            flow.response.content = redacted
