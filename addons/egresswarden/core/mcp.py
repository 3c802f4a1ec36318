"""MCP policy: decides JSON-RPC messages sent to declared MCP servers and filters what they answer.

Pure functions and data over a `RuleSet` (no mitmproxy imports), so the addon, the CLI and
the benchmark share one implementation.

- `McpPolicies.build(rules)` compiles, once per RuleSet, every agent's merged MCP rules per
  server: tool catalog, deny list, argument validators (jsonschema, compiled once), resource
  URI globs, prompt names, which tools may have argument values logged.
- `parse_messages(body)` -> a single message or batch, or None when the body is not JSON-RPC
  (such requests are left to the ordinary allow rules).
- `decide_message(...)` -> `MessageDecision` for one message.
- `filter_result(...)` removes what an agent may not see from tools/prompts/resources lists.
- `PinStore` keeps the canonical hash of every tool definition seen per server (seeded by
  `mcp_pins` from the rules, learned ones kept by a `PinBackend`) and blocks tools whose
  definition changed, or, with `settings.mcp_unpinned: refuse`, tools that have no pin.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import jsonschema

from .decision import Decision, Reason, Verdict, deny
from .derived import derived
from .model import McpServer
from .ruleset import RuleSet

MODERN_VERSION = "2026-07-28"
PROTOCOL_META_KEY = "io.modelcontextprotocol/protocolVersion"

# Methods any agent may use, even without an mcp rule for the server (handshake and liveness).
HANDSHAKE_METHODS = frozenset({"initialize", "ping", "server/discover"})
# Methods an agent with an mcp rule for the server may use without further checks.
PLAIN_METHODS = frozenset({
    "tools/list", "resources/list", "resources/templates/list", "prompts/list", "logging/setLevel",
    "subscriptions/listen", "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
})

JSONRPC_METHOD_NOT_FOUND = -32601
JSONRPC_INVALID_PARAMS = -32602
JSONRPC_HEADER_MISMATCH = -32020


def short(value: Any, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- URI globs --------------------------------------------------------------------------------
def compile_uri_glob(glob: str) -> re.Pattern[str]:
    """"**" matches anything, "*" anything but "/", "?" one character but "/"."""
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


# -- canonical tool hash ----------------------------------------------------------------------
PINNED_FIELDS = ("name", "description", "inputSchema", "outputSchema", "annotations")


def tool_hash(tool: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the fields that define what a tool does."""
    canonical = json.dumps({k: tool.get(k) for k in PINNED_FIELDS}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# -- compiled per-agent policy ----------------------------------------------------------------
@dataclass(slots=True)
class ServerPolicy:
    """One agent's merged MCP rules for one server."""

    server: str
    rule_id: str
    all_tools: bool = False
    tools: set[str] = field(default_factory=set)
    deny_tools: set[str] = field(default_factory=set)
    validators: dict[str, list[Any]] = field(default_factory=dict)
    resources: list[re.Pattern[str]] = field(default_factory=list)
    resource_globs: list[str] = field(default_factory=list)
    prompts: set[str] = field(default_factory=set)
    log_values: set[str] = field(default_factory=set)

    def tool_visible(self, name: str) -> bool:
        return name not in self.deny_tools and (self.all_tools or name in self.tools)

    def resource_ok(self, uri: str) -> bool:
        return any(p.fullmatch(uri) for p in self.resources)


@dataclass(frozen=True, slots=True)
class AgentMcp:
    agent: str
    report_mode: bool
    servers: dict[str, ServerPolicy]  # server id -> merged policy


class McpPolicies:
    """Everything compiled from one RuleSet; build once per RuleSet."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.version = rules.version
        self.agents: dict[str, AgentMcp] = {}
        validator_cache: dict[str, Any] = {}
        for agent in rules.agents.values():
            servers: dict[str, ServerPolicy] = {}
            for policy in agent.policies:
                for rule in policy.mcp:
                    sp = servers.get(rule.server)
                    if sp is None:
                        sp = servers[rule.server] = ServerPolicy(rule.server, f"{policy.name}/mcp/{rule.server}")
                    sp.all_tools |= "*" in rule.tools
                    sp.tools |= {t for t in rule.tools if t != "*"}
                    sp.deny_tools |= set(rule.deny_tools)
                    for tool, schema in rule.arguments:
                        key = json.dumps(schema, sort_keys=True)
                        validator = validator_cache.get(key)
                        if validator is None:
                            validator = jsonschema.validators.validator_for(schema)(schema)
                            validator_cache[key] = validator
                        sp.validators.setdefault(tool, []).append(validator)
                    for glob in rule.resources or ():
                        sp.resources.append(compile_uri_glob(glob))
                        sp.resource_globs.append(glob)
                    sp.prompts |= set(rule.prompts or ())
                    sp.log_values |= set(rule.log_argument_values)
            self.agents[agent.id] = AgentMcp(agent.id, agent.report_mode, servers)

    def server_for(self, host: str, port: int, canonical_path: str) -> McpServer | None:
        """The declared MCP server whose endpoint (or legacy SSE POST path) this request targets.

        `canonical_path` is the percent-decoded path without query (`core.paths.canonical_path`),
        the same one the policy decision matched: `/%6dcp` is `/mcp` here too."""
        bare = canonical_path
        for server in self.rules.mcp_servers_at(host, port):
            for prefix in (server.path_prefix, server.legacy_sse_messages_path):
                if not prefix:
                    continue
                p = prefix.rstrip("/") or "/"
                if p == "/" or bare == p or bare.startswith(p + "/"):
                    return server
        return None

    def policy(self, agent: str, server: str) -> ServerPolicy | None:
        a = self.agents.get(agent)
        return a.servers.get(server) if a else None

    def report_mode(self, agent: str) -> bool:
        a = self.agents.get(agent)
        return bool(a and a.report_mode)

    def agent_servers(self, agent: str) -> list[str]:
        a = self.agents.get(agent)
        return sorted(a.servers) if a else []


# -- pins ---------------------------------------------------------------------------------------
@derived
def mcp_policies_for(rules: RuleSet) -> McpPolicies:
    """The compiled MCP policies of a RuleSet (built with it; see core.derived)."""
    return McpPolicies(rules)


class PinStatus(StrEnum):
    """What `PinStore.observe_status` concluded about one tool definition."""

    PINNED = "pinned"  # matches its pin (from the rules or learned earlier)
    LEARNED = "learned"  # first sight in learn mode: this definition is now the pin
    CHANGED = "changed"  # differs from its pin: a rug pull until an operator re-pins it
    UNPINNED = "unpinned"  # no pin, and settings.mcp_unpinned is refuse (or the store failed)


UNPINNED_MODES = ("learn", "refuse")


class PinBackend(Protocol):
    """Where learned pins live. `MemoryPins` here; `runtime.pinstore.SqlitePins` on disk."""

    def learned(self, server: str, tool: str) -> str | None:
        """The learned pin of server/tool, or None."""
        ...

    def learn(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> str:
        """Make `digest` the pin of server/tool unless one exists (atomically); return the pin now stored."""
        ...

    def remember(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> None:
        """Keep a definition seen (for `warden mcp pin` diffs); best effort."""
        ...

    def definition(self, digest: str) -> dict[str, Any] | None:
        """A kept definition by its hash, or None (rule pins from `mcp_pins` are hashes only)."""
        ...


class MemoryPins:
    """Learned pins in this process only (lost on restart): the backend when no store is configured."""

    def __init__(self) -> None:
        self.pins: dict[tuple[str, str], str] = {}
        self.definitions: dict[str, dict[str, Any]] = {}

    def learned(self, server: str, tool: str) -> str | None:
        return self.pins.get((server, tool))

    def learn(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> str:
        self.remember(server, tool, digest, definition)
        return self.pins.setdefault((server, tool), digest)

    def remember(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> None:
        if len(self.definitions) < 10_000:
            self.definitions.setdefault(digest, definition)

    def definition(self, digest: str) -> dict[str, Any] | None:
        return self.definitions.get(digest)


def pinned_definition(tool: dict[str, Any]) -> dict[str, Any]:
    """The fields of a tool definition that pins cover (what `tool_hash` hashes)."""
    return {k: tool.get(k) for k in PINNED_FIELDS}


class PinStore:
    """Tool definition pins per server: from rules (`mcp_pins`, always first) or learned.

    Learned pins come from a `PinBackend` (durable with `runtime.pinstore`); a learned pin
    never changes once written, so it is cached here after the first read. A tool whose
    latest seen definition differs from its pin is blocked until the pin is updated (rules
    reload with the new hash). With `unpinned="refuse"` nothing is learned: a tool without
    a rule pin is hidden and refused. A backend that fails counts as "no pin" and is never
    learned from (fail closed); `errors` counts such failures. Thread-safe: SSE filters may
    run off the loop.
    """

    def __init__(self, backend: PinBackend | None = None, unpinned: str = "learn") -> None:
        self._lock = threading.Lock()
        self.backend: PinBackend = backend if backend is not None else MemoryPins()
        self.unpinned_mode = unpinned
        self.learned: dict[str, dict[str, str]] = {}  # cache of the backend's pins
        self.observed: dict[str, dict[str, str]] = {}
        self.rule_pins: dict[str, dict[str, str]] = {}
        self.errors = 0
        self.last_error: str | None = None

    def set_rule_pins(self, pins: dict[str, dict[str, str]]) -> None:
        with self._lock:
            self.rule_pins = {s: dict(t) for s, t in (pins or {}).items()}

    def set_unpinned(self, mode: str) -> None:
        self.unpinned_mode = mode if mode in UNPINNED_MODES else "refuse"

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = f"{exc.__class__.__name__}: {short(exc, 200)}"

    def pin_of(self, server: str, tool: str) -> str | None:
        pinned = self.rule_pins.get(server, {}).get(tool)
        if pinned is not None:
            return pinned
        cached = self.learned.get(server, {}).get(tool)
        if cached is not None or self.unpinned_mode != "learn":
            return cached
        try:
            stored = self.backend.learned(server, tool)
        except Exception as exc:  # an unreadable store is "no pin known": nothing learned from it
            self._failed(exc)
            return None
        if stored is not None:
            self.learned.setdefault(server, {})[tool] = stored
        return stored

    def observe_status(self, server: str, tool: dict[str, Any]) -> PinStatus:
        """Record a tool definition from a tools/list and compare it with its pin."""
        name = tool.get("name")
        if not isinstance(name, str):
            return PinStatus.UNPINNED
        h = tool_hash(tool)
        with self._lock:
            previous = self.observed.setdefault(server, {}).get(name)
            self.observed[server][name] = h
            pinned = self.pin_of(server, name)
            if pinned is None and self.unpinned_mode == "learn":
                try:
                    pinned = self.backend.learn(server, name, h, pinned_definition(tool))
                except Exception as exc:
                    self._failed(exc)
                    return PinStatus.UNPINNED
                self.learned.setdefault(server, {})[name] = pinned
                if pinned == h:
                    return PinStatus.LEARNED
            elif previous != h:
                try:
                    self.backend.remember(server, name, h, pinned_definition(tool))
                except Exception as exc:  # only diffs need it; the decision does not
                    self._failed(exc)
            if pinned is None:
                return PinStatus.UNPINNED
            return PinStatus.PINNED if pinned == h else PinStatus.CHANGED

    def observe(self, server: str, tool: dict[str, Any]) -> bool:
        """True if the definition matches its pin (or was just learned)."""
        return self.observe_status(server, tool) in (PinStatus.PINNED, PinStatus.LEARNED)

    def changed_parts(self, server: str, tool: dict[str, Any]) -> tuple[str, ...]:
        """Which pinned fields of `tool` differ from its pinned definition (for alerts and the
        audit); ("unknown",) when the pinned definition was not kept (a hash from mcp_pins)."""
        name = tool.get("name")
        pinned = self.pin_of(server, name) if isinstance(name, str) else None
        try:
            before = self.backend.definition(pinned) if pinned is not None else None
        except Exception as exc:
            self._failed(exc)
            before = None
        if before is None:
            return ("unknown",)
        now = pinned_definition(tool)
        return tuple(k for k in PINNED_FIELDS if before.get(k) != now.get(k)) or ("unknown",)

    def changed(self, server: str, tool: str) -> bool:
        seen = self.observed.get(server, {}).get(tool)
        if seen is None:
            return False
        pinned = self.pin_of(server, tool)
        return pinned is not None and pinned != seen

    def unpinned(self, server: str, tool: str) -> bool:
        """True when the tool has no pin and may not be used without one."""
        if self.unpinned_mode == "learn" and self.observed.get(server, {}).get(tool) is None:
            return False  # learned on first sight: nothing seen yet, nothing to compare
        return self.pin_of(server, tool) is None

    def names(self, server: str) -> set[str]:
        return set(self.observed.get(server, {}))


# -- messages -----------------------------------------------------------------------------------
def parse_messages(body: bytes) -> tuple[list[dict[str, Any]], bool] | None:
    """(messages, is_batch) when the body is JSON-RPC 2.0, else None."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    batch = isinstance(data, list)
    items = data if batch else [data]
    if not items:
        return None
    for m in items:
        if not isinstance(m, dict) or m.get("jsonrpc") != "2.0":
            return None
        if "method" in m:
            if not isinstance(m["method"], str):
                return None
        elif "result" not in m and "error" not in m:
            return None
    return items, batch


def protocol_version(msg: dict[str, Any], header: str | None) -> str | None:
    params = msg.get("params")
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            value = meta.get(PROTOCOL_META_KEY)
            if isinstance(value, str):
                return value
    return header


def is_modern(version: str | None) -> bool:
    return version is not None and version >= MODERN_VERSION  # ISO dates compare as strings


def message_name(msg: dict[str, Any]) -> str | None:
    """params.name or params.uri: what Mcp-Name must carry."""
    params = msg.get("params")
    if isinstance(params, dict):
        for key in ("name", "uri"):
            value = params.get(key)
            if isinstance(value, str):
                return value
    return None


@dataclass(slots=True)
class MessageDecision:
    """The decision on one JSON-RPC message and what the audit record needs."""

    decision: Decision
    method: str | None
    tool: str | None = None
    resource: str | None = None
    prompt: str | None = None
    argument_keys: tuple[str, ...] | None = None
    argument_values: dict[str, Any] | None = None
    text: str = ""  # why, readable by the model
    error_code: int = JSONRPC_METHOD_NOT_FOUND
    event: str | None = None  # "tool_changed" | "mcp_deny" when alert-worthy

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def _allow(policy: ServerPolicy | None, version: str, what: str) -> Decision:
    return Decision(Verdict.ALLOW, Reason.ALLOWED, policy.rule_id if policy else None, what, version)


def check_headers(msg: dict[str, Any], mcp_method: str | None, mcp_name: str | None) -> str | None:
    """A problem text when Mcp-Method / Mcp-Name disagree with the body, else None."""
    if mcp_method is not None and mcp_method.strip() != msg.get("method"):
        return f"Mcp-Method header {short(mcp_method, 60)!r} does not match the body method {short(msg.get('method'), 60)!r}"
    if mcp_name is not None and mcp_name.strip() != (message_name(msg) or ""):
        return f"Mcp-Name header {short(mcp_name, 60)!r} does not match the body name {short(message_name(msg), 60)!r}"
    return None


def decide_message(policies: McpPolicies, pins: PinStore, agent: str, server: McpServer,
                   msg: dict[str, Any]) -> MessageDecision:
    """Decide one client->server JSON-RPC message (request or notification)."""
    version = policies.version
    method = msg.get("method")
    policy = policies.policy(agent, server.id)
    if method is None:  # a response to a server request (sampling, elicitation, roots)
        return MessageDecision(_allow(policy, version, "response to a server request"), None)
    if method in HANDSHAKE_METHODS or method.startswith("notifications/"):
        return MessageDecision(_allow(policy, version, f"{method} allowed"), method)
    if policy is None:
        d = deny(Reason.MCP_NO_POLICY, f"agent '{agent}' has no mcp rule for server '{server.id}'", version)
        return MessageDecision(d, method, text=f"Warden: agent '{agent}' may not use MCP server '{server.id}' "
                               f"(no mcp rule); only initialize/ping are allowed. Ask the operator for access.",
                               event="mcp_deny")
    raw_params = msg.get("params")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    if method in PLAIN_METHODS:
        return MessageDecision(_allow(policy, version, f"{method} allowed"), method)
    if method == "tools/call":
        return _decide_tool_call(policies, pins, policy, server, params, version)
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        uri = params.get("uri")
        if isinstance(uri, str) and policy.resource_ok(uri):
            return MessageDecision(_allow(policy, version, f"resource {uri} allowed"), method, resource=uri)
        allowed = ", ".join(policy.resource_globs) or "none"
        d = deny(Reason.MCP_RESOURCE_NOT_ALLOWED, f"resource {short(uri)!r} is not allowed", version, policy.rule_id)
        return MessageDecision(d, method, resource=short(uri, 500) if isinstance(uri, str) else None,
                               text=f"Warden: resource {short(uri)!r} on server '{server.id}' is not allowed for "
                               f"agent '{agent}'. Allowed resource patterns: {allowed}.",
                               error_code=JSONRPC_INVALID_PARAMS, event="mcp_deny")
    if method == "prompts/get":
        name = params.get("name")
        if isinstance(name, str) and name in policy.prompts:
            return MessageDecision(_allow(policy, version, f"prompt {name} allowed"), method, prompt=name)
        d = deny(Reason.MCP_PROMPT_NOT_ALLOWED, f"prompt {short(name)!r} is not allowed", version, policy.rule_id)
        return MessageDecision(d, method, prompt=short(name) if isinstance(name, str) else None,
                               text=f"Warden: prompt {short(name)!r} on server '{server.id}' is not allowed for "
                               f"agent '{agent}'. Allowed prompts: {', '.join(sorted(policy.prompts)) or 'none'}.",
                               error_code=JSONRPC_INVALID_PARAMS, event="mcp_deny")
    if method == "completion/complete":
        raw_ref = params.get("ref")
        ref: dict[str, Any] = raw_ref if isinstance(raw_ref, dict) else {}
        ok = (ref.get("type") == "ref/prompt" and ref.get("name") in policy.prompts) or (
            ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str) and policy.resource_ok(ref["uri"]))
        if ok:
            return MessageDecision(_allow(policy, version, "completion allowed"), method)
        d = deny(Reason.MCP_METHOD_NOT_ALLOWED, "completion for a prompt/resource the agent may not use", version,
                 policy.rule_id)
        return MessageDecision(d, method, text="Warden: completion refers to a prompt or resource this agent may "
                               "not use.", error_code=JSONRPC_INVALID_PARAMS, event="mcp_deny")
    d = deny(Reason.MCP_METHOD_NOT_ALLOWED, f"MCP method {short(method, 80)!r} is not allowed", version, policy.rule_id)
    return MessageDecision(d, short(method, 80), text=f"Warden: MCP method {short(method, 80)!r} is not allowed "
                           f"through Warden.", event="mcp_deny")


def _decide_tool_call(policies: McpPolicies, pins: PinStore, policy: ServerPolicy, server: McpServer,
                      params: dict[str, Any], version: str) -> MessageDecision:
    name = params.get("name")
    arguments = params.get("arguments")
    keys = tuple(sorted(str(k) for k in arguments)) if isinstance(arguments, dict) else ()
    tool = short(name, 256) if isinstance(name, str) else None
    values = arguments if isinstance(name, str) and name in policy.log_values and isinstance(arguments, dict) else None

    def answer(d: Decision, text: str = "", event: str | None = None) -> MessageDecision:
        return MessageDecision(d, "tools/call", tool=tool, argument_keys=keys, argument_values=values, text=text,
                               event=event)

    catalog = "all tools" if policy.all_tools else (", ".join(sorted(policy.tools - policy.deny_tools)) or "none")
    if not isinstance(name, str):
        d = deny(Reason.MCP_BAD_ARGUMENTS, "tools/call without a tool name", version, policy.rule_id)
        return answer(d, "Warden: tools/call needs params.name.", "mcp_deny")
    if name in policy.deny_tools:
        d = deny(Reason.MCP_TOOL_DENIED, f"tool {tool!r} is on the deny list", version, policy.rule_id)
        return answer(d, f"Warden refused tool '{tool}' on server '{server.id}': this tool is explicitly "
                      f"denied for this agent. Do not retry; use one of: {catalog}.", "mcp_deny")
    if not (policy.all_tools or name in policy.tools):
        d = deny(Reason.MCP_TOOL_NOT_ALLOWED, f"tool {tool!r} is not in the agent's catalog", version, policy.rule_id)
        return answer(d, f"Warden refused tool '{tool}' on server '{server.id}': it is not in this "
                      f"agent's tool catalog. Allowed tools: {catalog}.", "mcp_deny")
    if pins.changed(server.id, name):
        d = deny(Reason.MCP_TOOL_CHANGED, f"tool {tool!r} changed its definition since it was pinned", version,
                 policy.rule_id)
        return answer(d, f"Warden refused tool '{tool}' on server '{server.id}': the server changed this "
                      f"tool's definition after it was approved. It stays blocked until an operator "
                      f"re-pins it (`warden mcp pin`).", "tool_changed")
    if pins.unpinned(server.id, name):
        d = deny(Reason.MCP_TOOL_UNPINNED, f"tool {tool!r} has no approved definition (pin)", version,
                 policy.rule_id)
        return answer(d, f"Warden refused tool '{tool}' on server '{server.id}': its definition has not been "
                      f"approved yet. An operator approves it with `warden mcp pin`.", "mcp_deny")
    if arguments is not None and not isinstance(arguments, dict):
        d = deny(Reason.MCP_BAD_ARGUMENTS, "arguments must be an object", version, policy.rule_id)
        return answer(d, "Warden: tool arguments must be a JSON object.", "mcp_deny")
    for validator in policy.validators.get(name, ()):
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments or {}))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(arguments)"
            d = deny(Reason.MCP_BAD_ARGUMENTS, f"arguments for {tool!r} fail the rule's schema at {short(where, 80)} "
                     f"({error.validator})", version, policy.rule_id)
            # Never echo argument values (they may carry secrets); name the constraint instead.
            constraint = short(json.dumps(error.validator_value, ensure_ascii=False, default=str), 120)
            return answer(d, f"Warden refused tool '{tool}' on server '{server.id}': the arguments do not "
                          f"satisfy the operator's constraints at {short(where, 80)}: "
                          f"'{error.validator}' must hold ({constraint}). Fix the arguments and call again.",
                          "mcp_deny")
    return answer(_allow(policy, version, f"tool {tool} allowed"))


def denial_answer(msg: dict[str, Any], md: MessageDecision, modern: bool) -> dict[str, Any] | None:
    """Warden's JSON-RPC answer to a denied request (None for notifications)."""
    if "id" not in msg:
        return None
    if md.method == "tools/call" and md.decision.reason is not Reason.MCP_HEADER_MISMATCH:
        result: dict[str, Any] = {"content": [{"type": "text", "text": md.text}], "isError": True}
        if modern:
            result["resultType"] = "complete"
        return {"jsonrpc": "2.0", "id": msg["id"], "result": result}
    return {"jsonrpc": "2.0", "id": msg["id"],
            "error": {"code": md.error_code, "message": md.text or md.decision.message,
                      "data": {"reason": md.decision.reason.value}}}


# -- results --------------------------------------------------------------------------------------
@dataclass(slots=True)
class FilterReport:
    hidden: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    changed_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tool -> fields that changed
    unpinned: list[str] = field(default_factory=list)  # hidden: no pin and settings.mcp_unpinned: refuse
    collisions: list[str] = field(default_factory=list)
    modified: bool = False


def filter_result(policies: McpPolicies, pins: PinStore, agent: str, server: str, result: dict[str, Any],
                  report: FilterReport) -> dict[str, Any]:
    """Filter a tools/prompts/resources list result in place (by shape). Returns the result."""
    policy = policies.policy(agent, server)
    report_mode = policies.report_mode(agent)
    touched = False
    tools = result.get("tools")
    if isinstance(tools, list):
        touched = True
        kept = []
        others = [s for s in policies.agent_servers(agent) if s != server]
        for tool in tools:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                report.hidden.append("?")
                continue
            name = tool["name"]
            status = pins.observe_status(server, tool)
            if status is PinStatus.CHANGED or status is PinStatus.UNPINNED:
                if status is PinStatus.CHANGED:
                    report.changed.append(name)
                    report.changed_parts[name] = pins.changed_parts(server, tool)
                else:
                    report.unpinned.append(name)
                    report.hidden.append(name)
                if not report_mode:
                    continue
            if policy is None or not policy.tool_visible(name):
                report.hidden.append(name)
                if not report_mode:
                    continue
            kept.append(tool)
            for other in others:
                if name in pins.names(other):
                    report.collisions.append(f"{name}@{other}")
        if len(kept) != len(tools):
            result["tools"] = kept
    prompts = result.get("prompts")
    if isinstance(prompts, list) and not report_mode:
        touched = True
        kept = [p for p in prompts if isinstance(p, dict) and policy is not None and p.get("name") in policy.prompts]
        report.hidden += [str(p.get("name")) for p in prompts if isinstance(p, dict) and p not in kept]
        if len(kept) != len(prompts):
            result["prompts"] = kept
    resources = result.get("resources")
    if isinstance(resources, list) and not report_mode:
        touched = True
        kept = [r for r in resources if isinstance(r, dict) and isinstance(r.get("uri"), str) and policy is not None
                and policy.resource_ok(r["uri"])]
        if len(kept) != len(resources):
            result["resources"] = kept
            report.hidden += ["resource"] * (len(resources) - len(kept))
    if touched:
        if "cacheScope" in result or "ttlMs" in result:
            result["cacheScope"] = "private"
        report.modified = True
    return result


def filter_message(policies: McpPolicies, pins: PinStore, agent: str, server: str, msg: Any,
                   report: FilterReport) -> Any:
    """Filter one server->client JSON-RPC message (or batch)."""
    if isinstance(msg, list):
        return [filter_message(policies, pins, agent, server, m, report) for m in msg]
    if isinstance(msg, dict) and isinstance(msg.get("result"), dict):
        filter_result(policies, pins, agent, server, msg["result"], report)
    return msg
