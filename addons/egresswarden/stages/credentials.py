"""Credentials stage: strip the agent's credentials, inject the real ones where bound, stop leaks.

Runs after Policy and BodyPlanner, before Mcp. Per request:

  requestheaders  decide which of the agent's credentials are bound to this request
                  (core.credentials.bound_credentials on the canonical target, plus the checks
                  in `_binding_holds`), strip the policy-level and bound credentials' `strip`
                  headers, scan host/URL/headers for any secret or placeholder not bound here
                  (deny `secret_leak`). A body the plan streams (STREAM_SCAN) goes through a
                  StreamScanner; its injection happens here, with the headers.
  request         scan the buffered body, raw and decoded (every coding, stacked codings too),
                  replace placeholders, inject.
  responseheaders redact echoed secrets in response headers; the response body plan streams a
                  large body through a StreamRedactor (bounded memory, secrets split across
                  chunks still found).
  response        redact the buffered response body.

A credential is injected only on intercepted HTTPS whose client leg is TLS and whose upstream
leg will be TLS with certificate verification (mitmproxy verifies upstream certificates; the
master refuses `ssl_insecure`): never into plain HTTP or cleartext inside a tunnel, where the
secret would cross the network readable. Secrets never reach logs, exception texts, refusal
bodies or audit records: messages name the credential id and the encoding only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import http

from egresswarden.core.bodyplan import BodyPlan, DecodeLimit, UnsupportedCoding, decode_for_scan
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
    target_text,
)
from egresswarden.core.decision import Decision, Interception, Reason, deny
from egresswarden.core.hostnames import HostError, authority_names, normalize_host, parse_ip
from egresswarden.core.ruleset import CompiledCredential, RuleSet
from egresswarden.runtime.budget import DecodeMeter
from egresswarden.runtime.context import Connections, FlowRecord, TunnelMode, record_of
from egresswarden.runtime.failsafe import guarded_stream, refusal_response

logger = logging.getLogger("warden")

DECODE_LIMIT_FACTOR = 16  # a buffered body may decode to at most 16x the buffer limit for scanning


@dataclass
class CredentialState:
    """Per-flow credential state (never logged: holds compiled credentials, whose repr hides secrets)."""

    rules: RuleSet
    scanner: Scanner
    bound: list[CompiledCredential] = field(default_factory=list)
    bound_ids: frozenset[str] = frozenset()
    injected: bool = False
    stream: StreamScanner | None = None
    leak_recorded: bool = False

    def redact_ids(self) -> frozenset[str]:
        return frozenset(c.id for c in self.bound if c.redact_response)


def _rewrite_values(headers: http.Headers, rewrite: Callable[[str], str]) -> None:
    """Apply `rewrite` to every header value, in one pass over the fields.

    Not `for name in headers.keys(): headers.get_all(name)`: each mitmproxy lookup scans every
    field, so that loop is quadratic in the header count (10,000 headers on a credential host
    held the event loop, and every other agent, for 19 s). Values are decoded and encoded the
    way mitmproxy's own accessors do (UTF-8, surrogateescape), so untouched ones stay byte-exact."""
    fields = headers.fields
    out = []
    changed = False
    for name, raw in fields:
        value = raw.decode("utf-8", "surrogateescape")
        new = rewrite(value)
        if new != value:
            changed = True
            raw = new.encode("utf-8", "surrogateescape")
        out.append((name, raw))
    if changed:
        headers.fields = tuple(out)


def _redact_fields(fields: http.Headers, ctx: CredentialState) -> None:
    """Echoed secrets of redact_response credentials replaced in response headers or trailers."""
    only = ctx.redact_ids()
    if only:
        _rewrite_values(fields, lambda value: ctx.scanner.redact_str(value, only)[0])


class Credentials:
    def __init__(self, connections: Connections, decode_meter: DecodeMeter | None = None) -> None:
        self.connections = connections
        self.decode_meter = decode_meter or DecodeMeter()

    # -- helpers ---------------------------------------------------------------------------
    def _binding_holds(self, flow: http.HTTPFlow, record: FlowRecord) -> bool:
        """Defence in depth: both legs TLS, and CONNECT host, SNI, every authority and the pinned
        address agree."""
        state = self.connections.peek(flow.client_conn)
        tunnel = state.tunnel if state is not None else None
        if tunnel is None or tunnel.mode is not TunnelMode.INTERCEPT or record.interception is not Interception.INTERCEPT:
            return False
        if not flow.client_conn.tls_established or not flow.server_conn.tls or flow.request.scheme != "https":
            return False  # cleartext on either leg: the secret would be readable on the wire
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
        for authority in (flow.request.authority, flow.request.host_header):
            if authority and not authority_names(authority, tunnel.host, tunnel.port):
                return False
        peer = flow.server_conn.peername or flow.server_conn.address
        if peer:
            ip = parse_ip(str(peer[0]))
            if ip is not None and ip != tunnel.address:
                return False
        return True

    @staticmethod
    def _deny(flow: http.HTTPFlow, record: FlowRecord, decision: Decision) -> None:
        record.decision = decision
        flow.response = refusal_response(decision, record.agent)

    def _deny_leak(self, flow: http.HTTPFlow, record: FlowRecord, rules: RuleSet, leak: Leak,
                   respond: bool = True) -> None:
        decision = deny(Reason.SECRET_LEAK, leak.message(), rules.version, leak.credentials[0])
        record.decision = decision
        record.add_event("secret_leak")
        logger.warning("warden: secret_leak agent=%s host=%s credential=%s where=%s encoding=%s",
                       record.agent, record.host, ",".join(leak.credentials), leak.where, leak.encoding)
        if respond:
            flow.response = refusal_response(decision, record.agent)

    def _inject(self, flow: http.HTTPFlow, record: FlowRecord, ctx: CredentialState) -> None:
        if not ctx.bound or ctx.injected:
            return
        req = flow.request
        _rewrite_values(req.headers, lambda value: replace_placeholders(value, ctx.bound))
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
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        rules = record.rules
        if rules is None or record.agent is None or record.target is None:
            raise RuntimeError("credentials stage reached without a decided target")  # fail closed
        agent = rules.agent(record.agent)
        if agent is None:
            raise RuntimeError("credentials stage reached for an unknown agent")
        scanner = scanner_for(rules)
        ctx = record.creds = CredentialState(rules, scanner)
        target = record.target
        if self._binding_holds(flow, record) and target.canonical_path is not None:
            ctx.bound = bound_credentials(rules, agent, target.host, target.port, "https", flow.request.method,
                                          flow.request.path, True)
            ctx.bound_ids = frozenset(c.id for c in ctx.bound)
        for name in strip_names(agent, ctx.bound):
            if name in flow.request.headers:
                del flow.request.headers[name]
        # Placeholders of bound credentials are replaced in headers; in the URL only where the
        # credential allows secrets in URLs; anywhere else (method, host, body) they are leaks.
        leak = scanner.find_leak(headers_text(flow.request.headers.items(multi=True)), ctx.bound_ids, "headers")
        if leak is None:
            leak = scanner.find_leak(target_text(flow.request.method, record.host or flow.request.host,
                                                 flow.request.path), ctx.bound_ids, "method or URL",
                                     placeholders_bound=any(c.allow_secret_in_url for c in ctx.bound))
        if leak is not None:
            self._deny_leak(flow, record, rules, leak)
            return
        if record.body is BodyPlan.STREAM_SCAN:
            stream = ctx.stream = StreamScanner(scanner, ctx.bound_ids)

            def scan_chunk(chunk: bytes) -> bytes | list[bytes]:
                out = stream.feed(chunk)
                if stream.leak is not None and not ctx.leak_recorded:
                    ctx.leak_recorded = True
                    self._deny_leak(flow, record, rules, stream.leak, respond=False)
                record.bytes_up += len(chunk)
                return out if out else []  # an empty bytes chunk would end a chunked HTTP/1 body early
            flow.request.stream = guarded_stream(scan_chunk, record, "request leak scan")
            self._inject(flow, record, ctx)  # headers leave with the start of the stream
        elif record.body is not BodyPlan.BUFFER or scanner.automaton is None:
            self._inject(flow, record, ctx)  # nothing in the body to scan

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        ctx = record.creds
        if ctx is not None and flow.request.trailers and self._trailer_leak(flow, record, ctx):
            return
        if ctx is None or record.body is not BodyPlan.BUFFER:
            return
        body = flow.request.raw_content or b""
        if body and ctx.scanner.automaton is not None:
            leak = ctx.scanner.find_disguised_leak(body, ctx.bound_ids, "body")
            encoding = flow.request.headers.get("content-encoding")
            if leak is None and encoding:
                settings = ctx.rules.settings
                limit = settings.body_scan_max_buffered_bytes * DECODE_LIMIT_FACTOR
                rate, agent = settings.decoded_bytes_per_second_per_agent, record.agent or ""
                if not self.decode_meter.admit(agent, rate, limit):
                    self._deny(flow, record, deny(
                        Reason.SCAN_LIMIT,
                        f"agent '{agent}' has sent more compressed request bodies than Warden decodes for one agent "
                        f"({rate} decoded bytes per second); send them uncompressed, or fewer at once",
                        ctx.rules.version))
                    assert flow.response is not None  # _deny answered (with Retry-After: a 429)
                    return
                try:
                    decoded = decode_for_scan(body, encoding, limit)
                except UnsupportedCoding as e:
                    self._deny(flow, record, deny(Reason.UNSUPPORTED_ENCODING,
                                                  f"Content-Encoding {str(e)!r} cannot be decoded, so the body "
                                                  f"cannot be checked for secrets", ctx.rules.version))
                    return
                except DecodeLimit:
                    self.decode_meter.charge(agent, limit, rate, limit)  # decoded that far before giving up
                    self._deny(flow, record, deny(Reason.BODY_TOO_LARGE,
                                                  f"the decoded body exceeds {limit} bytes and cannot be checked "
                                                  f"for secrets", ctx.rules.version))
                    return
                except ValueError as e:
                    self._deny(flow, record, deny(Reason.UNSUPPORTED_ENCODING,
                                                  f"the body could not be decoded ({e}), so it cannot be checked "
                                                  f"for secrets", ctx.rules.version))
                    return
                self.decode_meter.charge(agent, len(decoded), rate, limit)
                # The views cost far more per byte than the automaton; a small compressed body
                # must not buy up to 16x max_buffered_bytes of that work: beyond the buffer limit
                # the decoded body is scanned for the plain spellings only.
                leak = ctx.scanner.find_disguised_leak(decoded, ctx.bound_ids, "body") \
                    if len(decoded) <= ctx.rules.settings.body_scan_max_buffered_bytes else \
                    ctx.scanner.find_leak(decoded, ctx.bound_ids, "body", placeholders_bound=False)
            if leak is not None:
                self._deny_leak(flow, record, ctx.rules, leak)
                return
        self._inject(flow, record, ctx)

    def _trailer_leak(self, flow: http.HTTPFlow, record: FlowRecord, ctx: CredentialState) -> bool:
        """Trailer fields (HTTP/2; HTTP/1 ones are refused earlier, runtime/http1_trailers.py)
        are headers sent after the body: scanned like headers, but a placeholder there is a leak
        (placeholders are replaced only in headers). mitmproxy sends them upstream only after
        this hook, so a leak never leaves: buffered, the request is refused here; streamed (the
        body is already upstream), the trailers are dropped and the agent gets the refusal
        instead of the upstream's answer."""
        trailers = flow.request.trailers
        assert trailers is not None
        leak = ctx.scanner.find_leak(headers_text(trailers.items(multi=True)), ctx.bound_ids, "trailers",
                                     placeholders_bound=False)
        if leak is None:
            return False
        flow.request.trailers = None
        if record.body is BodyPlan.BUFFER:
            self._deny_leak(flow, record, ctx.rules, leak)
        elif not ctx.leak_recorded:
            ctx.leak_recorded = True
            self._deny_leak(flow, record, ctx.rules, leak, respond=False)
        return True

    def _streamed_leak(self, flow: http.HTTPFlow, record: FlowRecord) -> bool:
        """A leak found in a streamed request body: the agent gets the refusal, not the upstream's answer."""
        ctx = record.creds
        if ctx is None or not ctx.leak_recorded:
            return False
        assert record.decision is not None
        flow.response = refusal_response(record.decision, record.agent)
        return True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        if self._streamed_leak(flow, record) or flow.response is None:
            return
        ctx = record.creds
        if ctx is None or not ctx.injected:
            return
        only = ctx.redact_ids()
        if not only:
            return
        resp = flow.response
        _redact_fields(resp.headers, ctx)
        if record.response_body is BodyPlan.STREAM_SCAN:
            redactor = StreamRedactor(ctx.scanner, only)
            # Redaction changes the length, and a chunk may be held back (empty output): send the
            # body to the agent close-delimited (HTTP/1) or as DATA frames (HTTP/2). With chunked
            # framing an empty chunk from a stream callable would end the body early. mitmproxy
            # already chose how to read the upstream body, so this only affects the agent side.
            for name in ("content-length", "transfer-encoding"):
                if name in resp.headers:
                    del resp.headers[name]

            def redact_chunk(chunk: bytes) -> bytes:
                record.bytes_down += len(chunk)
                return redactor.feed(chunk)
            resp.stream = guarded_stream(redact_chunk, record, "response redaction")  # the Mcp stage (later) wraps this callable for MCP responses

    def response(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        if self._streamed_leak(flow, record):
            return
        ctx = record.creds
        if ctx is not None and ctx.injected and flow.response is not None and flow.response.trailers:
            _redact_fields(flow.response.trailers, ctx)  # sent to the agent after this hook, streamed or not
        if ctx is None or not ctx.injected or flow.response is None or record.response_body is not BodyPlan.BUFFER:
            return
        only = ctx.redact_ids()
        if not only or not flow.response.raw_content:
            return
        raw = flow.response.raw_content
        try:
            content = decode_for_scan(raw, flow.response.headers.get("content-encoding"),
                                      ctx.rules.settings.body_scan_max_buffered_bytes * DECODE_LIMIT_FACTOR)
        except (UnsupportedCoding, DecodeLimit, ValueError):
            self._deny(flow, record, deny(Reason.UNSUPPORTED_ENCODING,
                                          "the upstream's response could not be decoded to redact secrets",
                                          ctx.rules.version))
            return
        redacted, n = ctx.scanner.redact(content, only)
        if n:
            flow.response.content = redacted
