"""Decision values: what the engine answers, and the one place reason codes are defined.

A `Decision` is immutable and carries everything audit, metrics and alerts need (verdict,
reason code, rule id, policy version), so those three read the same value and cannot
disagree. Reason codes are an enum, not free text: tests and metric labels depend on the
code, the human message may change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REPORT = "report"  # report mode: the policy would deny, the request is let through and logged


class Interception(StrEnum):
    PASSTHROUGH = "passthrough"  # CONNECT tunnel relayed without terminating TLS
    INTERCEPT = "intercept"  # TLS terminated with Warden's CA; every request decided
    PLAIN = "plain"  # plain-HTTP request through the proxy
    EXPLAIN = "explain"  # a refused CONNECT accepted only to answer its requests with the refusal
    CLEARTEXT = "cleartext"  # plain HTTP sent into a tunnel Warden intercepts: refused, never forwarded


class Reason(StrEnum):
    """Why a decision was made. `status` is the HTTP status a denial maps to."""

    ALLOWED = "allowed"
    NO_MATCHING_RULE = "no_matching_rule"
    PORT_NOT_ALLOWED = "port_not_allowed"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PATH_NOT_ALLOWED = "path_not_allowed"
    DENY_LISTED = "deny_listed"
    PRIVATE_ADDRESS = "private_address"
    RESOLVE_FAILED = "resolve_failed"
    INVALID_HOST = "invalid_host"
    INVALID_PATH = "invalid_path"
    AUTH_REQUIRED = "auth_required"
    AUTH_FAILED = "auth_failed"
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    SNI_MISMATCH = "sni_mismatch"
    HOST_MISMATCH = "host_mismatch"
    SECRET_LEAK = "secret_leak"
    MISSING_SECRET = "missing_secret"
    BODY_TOO_LARGE = "body_too_large"
    RULES_UNAVAILABLE = "rules_unavailable"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    INTERNAL_ERROR = "internal_error"
    MCP_TOOL_NOT_ALLOWED = "mcp_tool_not_allowed"
    MCP_TOOL_DENIED = "mcp_tool_denied"
    MCP_BAD_ARGUMENTS = "mcp_bad_arguments"
    MCP_TOOL_CHANGED = "mcp_tool_changed"
    MCP_METHOD_NOT_ALLOWED = "mcp_method_not_allowed"
    MCP_RESOURCE_NOT_ALLOWED = "mcp_resource_not_allowed"
    MCP_PROMPT_NOT_ALLOWED = "mcp_prompt_not_allowed"
    MCP_HEADER_MISMATCH = "mcp_header_mismatch"
    MCP_NO_POLICY = "mcp_no_policy"
    MCP_TOOL_UNPINNED = "mcp_tool_unpinned"
    MCP_SERVER_FAILED = "mcp_server_failed"
    MCP_INVALID_MESSAGE = "mcp_invalid_message"  # a body to an MCP endpoint that is not JSON-RPC
    LENGTH_REQUIRED = "length_required"  # a body of unknown length to an MCP endpoint (cannot be bounded)
    NOT_HTTP = "not_http"  # bytes in an intercepted tunnel that are not HTTP Warden parsed: connection closed
    CLEARTEXT_IN_TUNNEL = "cleartext_in_tunnel"  # plain HTTP inside a tunnel that must carry TLS
    UNSUPPORTED_ENCODING = "unsupported_encoding"  # a body coding Warden cannot decode, so cannot scan
    WEBSOCKET_NOT_ALLOWED = "websocket_not_allowed"
    UPGRADE_NOT_ALLOWED = "upgrade_not_allowed"  # HTTP Upgrade to anything but an allowed WebSocket
    INVALID_HEADER = "invalid_header"  # obs-fold, CR/LF in a value, a transfer coding other than chunked
    BUFFER_LIMIT = "buffer_limit"  # the agent's request bodies held in memory would exceed its budget
    SCAN_LIMIT = "scan_limit"  # the agent's compressed bodies cost more decoding than its share per second
    CONNECTION_LIMIT = "connection_limit"  # the agent (or the process) holds as many connections as it may
    REQUEST_OUTSIDE_TUNNEL = "request_outside_tunnel"  # a request behind a CONNECT that opened no tunnel

    @property
    def status(self) -> int:
        return _STATUS.get(self, 403)


_STATUS: dict[Reason, int] = {
    Reason.ALLOWED: 200,
    Reason.AUTH_REQUIRED: 407,
    Reason.AUTH_FAILED: 407,
    Reason.RESOLVE_FAILED: 502,
    Reason.INVALID_HOST: 400,
    Reason.INVALID_PATH: 400,
    Reason.BODY_TOO_LARGE: 413,
    Reason.BUFFER_LIMIT: 429,
    Reason.SCAN_LIMIT: 429,
    Reason.CONNECTION_LIMIT: 429,
    Reason.REQUEST_OUTSIDE_TUNNEL: 400,
    Reason.RULES_UNAVAILABLE: 503,
    Reason.AUDIT_UNAVAILABLE: 503,
    Reason.INTERNAL_ERROR: 500,
    Reason.MISSING_SECRET: 503,
    Reason.MCP_INVALID_MESSAGE: 400,
    Reason.INVALID_HEADER: 400,
    Reason.LENGTH_REQUIRED: 411,
    Reason.UNSUPPORTED_ENCODING: 415,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer for one CONNECT, request, address check or MCP message.

    `intercept` is meaningful for CONNECT-stage decisions: TLS must be terminated so that
    requests can be decided one by one (method/path rules, credentials, MCP, fronting).
    """

    verdict: Verdict
    reason: Reason
    rule_id: str | None
    message: str
    policy_version: str
    intercept: bool = False

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.DENY

    def with_verdict(self, verdict: Verdict) -> Decision:
        return replace(self, verdict=verdict)


def deny(reason: Reason, message: str, policy_version: str, rule_id: str | None = None) -> Decision:
    return Decision(Verdict.DENY, reason, rule_id, message, policy_version)


# Refusals that say nothing about the request itself: the same request can succeed later.
TRANSIENT = frozenset({Reason.RULES_UNAVAILABLE, Reason.AUDIT_UNAVAILABLE, Reason.BUFFER_LIMIT, Reason.SCAN_LIMIT,
                       Reason.CONNECTION_LIMIT})


def denial_text(decision: Decision, agent: str | None) -> str:
    """The short plain-text body an agent (and its model) reads when Warden refuses.

    Written to be acted on: what was refused, why, which rule, and what to do instead.
    """
    who = f"agent '{agent}'" if agent else "this client"
    rule = f" (rule {decision.rule_id})" if decision.rule_id else ""
    if decision.reason in TRANSIENT:
        advice = "This is temporary: retry the same request after a short wait."
    else:
        advice = ("Retrying unchanged will fail the same way; "
                  "ask the operator to change the rules if this access is needed.")
    return (
        f"Warden refused this request for {who}: {decision.reason.value}{rule}.\n"
        f"{decision.message}\n"
        f"policy version {decision.policy_version}. {advice}\n"
    )
