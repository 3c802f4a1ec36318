"""Every stage the proxy runs for one request, computed without any network: a `Plan`.

`warden explain`, `warden test` and `warden replay` call `plan()`; the proxy's stages call
the same per-stage functions (`plan_connect`, `check_addresses`, `interception_for`,
`plan_request`, `credentials_for_request`, `mcp_server_for`, `decide_mcp`), so a test, a
replay and the live proxy cannot disagree about what one request does.

The order, as the proxy runs it (stages/policy.py, interception.py, credentials.py, mcp.py):

HTTPS (a CONNECT tunnel, then the requests inside it)
 1. connect     `decide` on agent + host + port (no method, no path). Denied: the end.
 2. addresses   an allowed name is resolved (hosts file, then DNS; an IP literal is its own
                address) and `decide_addresses` checks every address against the deny cidrs
                and the private-address guard, with the CONNECT decision as `prior`. Here,
                without network, the addresses are the ones given, an IP literal, or the
                rules' hosts file; otherwise the step is "not evaluated" and an allow is
                marked incomplete (`complete` False). A refused tunnel ends here; with
                `settings.explain_denials: in_band` and a reason in EXPLAINABLE it is
                accepted only to answer every request with the refusal (interception
                `explain`).
 2b. governed   an address that belongs to a declared MCP server or an exact credential host
                reached under another name or an IP literal (`governed_by_address`; offline
                the destinations' addresses come from the hosts file): the tunnel is
                intercepted and governed as that destination.
 3. interception  the tunnel is intercepted when the (address-checked) decision says so:
                method/path rules, credentials for the host, an MCP server on host:port, an
                L7 deny rule, `settings.tls_intercept: always`, a governed address; else passed through, and
                the proxy never sees the requests inside (no request stage, no credentials,
                no MCP). (A TLS SNI that differs from the CONNECT host also forces
                interception and a `sni_mismatch` denial: a client's doing, not a rule's.)
 4. request     inside an intercepted tunnel: `decide` on method and path (the Host header
                is assumed to name the CONNECT host; fronting is the client's doing too).
 5. credentials the agent's credentials bound to this request (`bound_credentials`: only
                intercepted TLS, matching host, port, method and canonical path) are injected.
 6. mcp         a declared MCP server whose endpoint path prefix (or legacy SSE POST path)
                covers the request's canonical path (by name, or the server a governed
                address belongs to) governs its JSON-RPC body
                (`decide_mcp`, each message on its own).

Plain HTTP: 1. request (`decide` with method and path), 2. addresses (prior: the request
decision), then no interception (`plain`), never credentials (a secret would cross the
network in clear text), and an MCP server if one is declared on that http host:port.
(HTTP Upgrade/WebSocket permission and the body plan depend on headers: not planned.)

`final` is the decision of the last stage that ran; a denial ends the sequence. Leak
scanning, body size limits and identity are not planned: their inputs (headers, bodies,
tokens) are not part of a URL.

JSON (`Plan.to_json()`, used by `warden explain --json`; keys are stable, new ones may be
added): agent, method, scheme, host, port, path, policy_version, complete,
stages: [{stage, evaluated, decision, reason, rule_id, rule_origin, message, note}],
addresses, address_source (literal | given | hosts_file | unknown),
interception: {mode (intercept | passthrough | plain | explain | null), why: [...],
raw_tcp (passthrough: true where the rule says raw_tcp, false when the tunnel carries TLS only; else null)},
credentials: [id...], mcp_server, final: {decision, reason, rule_id, rule_origin, message, stage}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from .decide import decide, decide_addresses
from .decision import Decision, Interception, Reason, Verdict, deny
from .derived import derived
from .facts import RequestFacts
from .hostnames import HostError, IPAddress, normalize_host, parse_ip
from .mcp import McpPolicies, MessageDecision, PinStore, decide_message, mcp_policies_for
from .model import McpServer
from .paths import PathError, canonical_path
from .ruleset import RuleSet, default_port


class StageName(StrEnum):
    CONNECT = "connect"
    ADDRESSES = "addresses"
    REQUEST = "request"
    MCP = "mcp"


class InterceptWhy(StrEnum):
    """Why a tunnel is intercepted (several may hold at once)."""

    METHOD_PATH_RULES = "method_path_rules"  # the only rules allowing host:port constrain method/path
    CREDENTIALS = "credentials"  # the agent has credentials for the host
    MCP_SERVER = "mcp_server"  # an MCP server is declared on host:port
    L7_DENY_RULE = "l7_deny_rule"  # a global deny rule with methods/paths covers the host
    TLS_INTERCEPT_ALWAYS = "tls_intercept_always"  # settings.tls_intercept: always
    GOVERNED_ADDRESS = "governed_address"  # an address of an MCP server or credential host, under another name


# Refusals `settings.explain_denials: in_band` explains inside an accepted tunnel (the proxy's
# stages/policy.py EXPLAINABLE): the agent is identified and the answer is policy.
EXPLAINABLE = frozenset({Reason.NO_MATCHING_RULE, Reason.PORT_NOT_ALLOWED, Reason.DENY_LISTED,
                         Reason.PRIVATE_ADDRESS, Reason.RESOLVE_FAILED})


class AddressSource(StrEnum):
    LITERAL = "literal"  # the host is an IP address
    GIVEN = "given"  # passed by the caller (a case file, an audit record's upstream_ip)
    HOSTS_FILE = "hosts_file"  # settings.hosts_file pins the name
    UNKNOWN = "unknown"  # would need DNS: the address check is not evaluated


@dataclass(frozen=True, slots=True)
class StageResult:
    """One stage: its decision, or None with a note saying why it did not run."""

    stage: StageName
    decision: Decision | None
    rule_origin: str | None = None  # "file:line" of the deciding rule
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "stage": self.stage.value,
            "evaluated": d is not None,
            "decision": d.verdict.value if d else None,
            "reason": d.reason.value if d else None,
            "rule_id": d.rule_id if d else None,
            "rule_origin": self.rule_origin,
            "message": d.message if d else None,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """What the proxy does with one request, stage by stage. Immutable."""

    agent: str
    method: str | None
    scheme: str
    host: str  # canonical when valid, else as given
    port: int
    path: str | None
    policy_version: str
    stages: tuple[StageResult, ...]
    final: StageResult  # the last stage that ran (its decision is never None)
    addresses: tuple[IPAddress, ...] = ()
    address_source: AddressSource = AddressSource.UNKNOWN
    interception: Interception | None = None  # None: refused before a tunnel existed
    intercept_why: tuple[InterceptWhy, ...] = ()
    credentials: tuple[str, ...] = ()
    mcp_server: str | None = None
    complete: bool = True  # False: an allow that still depends on an address check not run here
    raw_tcp: bool | None = None  # passthrough tunnels: may it carry bytes that are not TLS (None: no such tunnel)

    @property
    def decision(self) -> Decision:
        assert self.final.decision is not None
        return self.final.decision

    def stage(self, name: StageName) -> StageResult | None:
        return next((s for s in self.stages if s.stage is name), None)

    def to_json(self) -> dict[str, Any]:
        final = self.final.to_json()
        return {
            "agent": self.agent,
            "method": self.method,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "policy_version": self.policy_version,
            "complete": self.complete,
            "stages": [s.to_json() for s in self.stages],
            "addresses": [str(a) for a in self.addresses],
            "address_source": self.address_source.value,
            "interception": {"mode": self.interception.value if self.interception else None,
                             "why": [w.value for w in self.intercept_why],
                             "raw_tcp": self.raw_tcp},
            "credentials": list(self.credentials),
            "mcp_server": self.mcp_server,
            "final": {k: final[k] for k in ("decision", "reason", "rule_id", "rule_origin", "message")}
            | {"stage": final["stage"]},
        }


# -- rule origins (file:line), built once per RuleSet ------------------------------------------
@dataclass(frozen=True, slots=True)
class RuleOrigins:
    rules: Mapping[str, str]  # allow/deny rule id, and "<policy>/mcp/<server>" -> "file:line"
    credentials: Mapping[str, str]


@derived
def rule_origins(rules: RuleSet) -> RuleOrigins:
    """Where each rule id and credential id is defined (built once per RuleSet)."""
    m = rules.model
    by_rule: dict[str, str] = {}
    creds: dict[str, str] = {}
    for policy in m.policies.values():
        for r in policy.allow:
            by_rule.setdefault(r.id, str(r.origin))
        for c in policy.credentials:
            creds.setdefault(c.id, str(c.origin))
        for mcp_rule in policy.mcp:
            by_rule.setdefault(f"{policy.name}/mcp/{mcp_rule.server}", str(mcp_rule.origin))
    for r in m.deny:
        by_rule.setdefault(r.id, str(r.origin))
    return RuleOrigins(by_rule, creds)


def _result(rules: RuleSet, stage: StageName, decision: Decision) -> StageResult:
    origin = rule_origins(rules).rules.get(decision.rule_id) if decision.rule_id else None
    return StageResult(stage, decision, origin)


# -- the stages, one function each -------------------------------------------------------------
def plan_connect(rules: RuleSet, agent: str, host: str, port: int) -> Decision:
    """Stage 1 (https): the CONNECT decision on agent, host and port."""
    return decide(rules, RequestFacts(agent, host, port, "https"))


def plan_request(rules: RuleSet, agent: str, scheme: str, host: str, port: int, method: str, path: str) -> Decision:
    """The request decision: inside an intercepted tunnel (https) or a plain-HTTP request."""
    return decide(rules, RequestFacts(agent, host, port, scheme, method, path))


def plan_upgrade(rules: RuleSet, agent: str, host: str | None, upgrade: str | None, decision: Decision) -> Decision:
    """HTTP Upgrade on an allowed request: WebSocket where the deciding rule says `websocket: true`,
    nothing else. Used for the upgrade request and again when a reload re-decides an open WebSocket."""
    if upgrade is None or not decision.allowed:
        return decision
    if upgrade.strip().lower() != "websocket":
        return deny(Reason.UPGRADE_NOT_ALLOWED,
                    f"Upgrade to {upgrade[:40]!r} is not allowed: Warden only carries HTTP it can decide",
                    rules.version, decision.rule_id)
    rule = rules.allow_rule(decision.rule_id) if decision.rule_id else None
    if rule is None or not rule.websocket:
        return deny(Reason.WEBSOCKET_NOT_ALLOWED,
                    f"WebSocket to {host} is not allowed for agent '{agent}' "
                    f"(the rule must say websocket: true)", rules.version, decision.rule_id)
    return decision


def plan_raw_tcp(rules: RuleSet, decision: Decision) -> bool:
    """May the passthrough tunnel `decision` allowed carry bytes that are not TLS? Only where its
    rule says `raw_tcp: true`: otherwise the tunnel must begin with a ClientHello that names the
    host, since bytes Warden does not read may carry one it never checked (red team 14: a
    front that strips a prefix header, e.g. HAProxy's NetScaler CIP, then reads the SNI)."""
    rule = rules.allow_rule(decision.rule_id) if decision.allowed and decision.rule_id else None
    return rule is not None and rule.raw_tcp


def known_addresses(rules: RuleSet, host: str,
                    given: Sequence[IPAddress] | None = None) -> tuple[tuple[IPAddress, ...], AddressSource]:
    """The addresses the proxy would check, as far as they are known without DNS."""
    ip = parse_ip(host)
    if ip is not None:
        return (ip,), AddressSource.LITERAL
    if given:
        return tuple(given), AddressSource.GIVEN
    pinned = rules.hosts_file.get(host)
    if pinned:
        return tuple(pinned), AddressSource.HOSTS_FILE
    return (), AddressSource.UNKNOWN


def check_addresses(rules: RuleSet, agent: str, scheme: str, host: str, port: int,
                    addresses: Sequence[IPAddress], prior: Decision) -> Decision:
    """Stage 2: the address check, one call to the engine's `decide_addresses`."""
    return decide_addresses(rules, RequestFacts(agent, host, port, scheme), addresses, prior)


def interception_for(rules: RuleSet, agent: str, host: str, port: int, tunnel: Decision,
                     governed: Governed | None = None) -> tuple[Interception, tuple[InterceptWhy, ...]]:
    """Stage 3: passthrough or intercept for an allowed tunnel, and why.

    The choice is the engine's (`tunnel.intercept`); the reasons restate the conditions
    `decide` tests, so that `explain` can say which rule or setting forced it."""
    if not tunnel.intercept:
        return Interception.PASSTHROUGH, ()
    why: list[InterceptWhy] = []
    ip = parse_ip(host)
    deny_index = rules.deny_cidrs if ip is not None else rules.deny_hosts
    key: Any = ip if ip is not None else host
    if any(r.has_l7 and (r.ports is None or port in r.ports) for r in deny_index.lookup(key)):
        why.append(InterceptWhy.L7_DENY_RULE)
    if rules.settings.tls_intercept == "always":
        why.append(InterceptWhy.TLS_INTERCEPT_ALWAYS)
    compiled = rules.agents.get(agent)
    if compiled is not None and tunnel.verdict is Verdict.ALLOW:
        if ip is not None:
            candidates = [r for p in compiled.policies if p.cidrs for r in p.cidrs.lookup(ip)]
        else:
            candidates = [r for p in compiled.policies if p.hosts for r in p.hosts.lookup(host)]
        usable = [r for r in candidates if r.port_ok(port, "https")]
        if usable and all(r.has_l7 for r in usable):
            why.append(InterceptWhy.METHOD_PATH_RULES)
        if rules.credentials_for(compiled, host):
            why.append(InterceptWhy.CREDENTIALS)
        if rules.mcp_servers_at(host, port):
            why.append(InterceptWhy.MCP_SERVER)
    if governed is not None:
        why.append(InterceptWhy.GOVERNED_ADDRESS)
    return Interception.INTERCEPT, tuple(why)


@dataclass(frozen=True, slots=True)
class Governed:
    """A destination whose traffic Warden governs beyond host rules, found at an address."""

    host: str
    what: str
    mcp_server: str | None = None


def governed_destinations(rules: RuleSet) -> dict[tuple[str, int], Governed]:
    """Declared MCP servers and exact-host credential destinations, by (host, port): the list
    runtime.resolver.GovernedAddresses resolves for the proxy (offline: `governed_by_address`)."""
    out: dict[tuple[str, int], Governed] = {}
    for (host, port), servers in rules.mcp_servers.items():
        out[(host, port)] = Governed(host, f"MCP server {servers[0].id}", servers[0].id)
    for cred in rules.credentials_by_id.values():
        target = cred.rule.target
        if target.startswith("*."):
            continue
        for port in cred.rule.ports or (443,):
            out.setdefault((target, port), Governed(target, f"credential {cred.id}"))
    return out


def governs(governed: Governed, host: str) -> bool:
    """Does reaching `governed`'s address as `host` make the connection governed as it?

    An MCP server: under any other name or an IP literal (its catalog must apply whatever the
    agent calls it). A credential host: only under an IP literal. A credential is bound to its
    name (never injected elsewhere), so another name sharing the address (other sites on the
    same CDN address, github.com beside api.github.com) is just another destination and keeps
    its passthrough; an IP literal is intercepted so the leak guard sees what is sent there."""
    if governed.host == host:
        return False
    return governed.mcp_server is not None or parse_ip(host) is not None


def governed_by_address(rules: RuleSet, host: str, port: int, addresses: Sequence[IPAddress]) -> Governed | None:
    """Stage 2b: the governed destination one of `addresses` belongs to, reached under another
    name or an IP literal (then the tunnel is intercepted and governed as that destination).
    Offline, a destination's own addresses are known only from the hosts file or an IP literal."""
    if not addresses:
        return None
    for (dest, dest_port), governed in governed_destinations(rules).items():
        if dest_port != port or not governs(governed, host):
            continue
        ip = parse_ip(dest)
        owned = (ip,) if ip is not None else rules.hosts_file.get(dest, ())
        if any(a in owned for a in addresses):
            return governed
    return None


def credentials_for_request(rules: RuleSet, agent: str, host: str, port: int, scheme: str, method: str, path: str,
                            intercepted: bool) -> tuple[str, ...]:
    """Stage 5: ids of the credentials that would be injected into this request."""
    from .credentials import bound_credentials  # imports the Aho-Corasick module: only when asked

    compiled = rules.agents.get(agent)
    if compiled is None:
        return ()
    return tuple(c.id for c in bound_credentials(rules, compiled, host, port, scheme, method, path, intercepted))


def mcp_server_for(rules: RuleSet, host: str, port: int, path: str,
                   governed: Governed | None = None) -> McpServer | None:
    """Stage 6: the declared MCP server governing this request, matched on the canonical path
    (percent-decoded, as the decision matched it), so "/mc%70" is governed like "/mcp"; by name,
    else as the server whose address the connection reached (`governed`)."""
    if not rules.mcp_servers:
        return None
    try:
        canonical = canonical_path(path)
    except PathError:
        return None  # the decision already refused this path (invalid_path)
    policies = mcp_policies_for(rules)
    server = policies.server_for(host, port, canonical)
    if server is None and governed is not None and governed.mcp_server is not None:
        declared = next(s for s in rules.model.mcp_servers if s.id == governed.mcp_server)
        server = policies.server_for(declared.host, declared.port, canonical)
    return server


@derived
def _offline_pins(rules: RuleSet) -> PinStore:
    pins = PinStore()
    pins.set_rule_pins(rules.model.mcp_pins)
    return pins


def mcp_decider_for(rules: RuleSet) -> tuple[McpPolicies, PinStore]:
    """Compiled MCP policies and a pin store seeded with the rules' `mcp_pins`. Offline there
    are no observed tool definitions, so no tool counts as changed."""
    return mcp_policies_for(rules), _offline_pins(rules)


def decide_mcp(policies: McpPolicies, pins: PinStore, agent: str, server: McpServer,
               message: dict[str, Any]) -> MessageDecision:
    """One JSON-RPC message to a declared server, with report mode applied as the proxy does
    (header mismatches always enforce)."""
    md = decide_message(policies, pins, agent, server, message)
    if not md.allowed and policies.report_mode(agent) and md.decision.reason is not Reason.MCP_HEADER_MISMATCH:
        md.decision = md.decision.with_verdict(Verdict.REPORT)
    return md


# -- the whole sequence --------------------------------------------------------------------------
def split_url(url: str) -> tuple[str, str, int, str]:
    """"https://h:1/p?q" -> (scheme, host, port, path-with-query). A URL without a scheme is
    https. Raises ValueError for an unusable URL (bad port, unknown scheme, no host)."""
    if "://" not in url:
        url = f"https://{url}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r} is not proxied (use http or https)")
    port = parts.port or default_port(scheme)  # raises ValueError for a bad port
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"no host in {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


def plan(rules: RuleSet, agent: str, scheme: str, host: str, port: int, method: str | None = None,
         path: str | None = None, addresses: Sequence[IPAddress] | None = None) -> Plan:
    """Run every stage for one request (see the module docstring for the order).

    For https, `method`/`path` None plans the tunnel only (CONNECT, addresses, interception).
    `addresses`: what the name resolved to; absent, the hosts file (or nothing) is used."""
    try:
        canonical = normalize_host(host)
    except HostError:
        canonical = host[:256]
    method = method.upper() if method is not None else None
    known, source = known_addresses(rules, canonical, addresses)
    base = Plan(agent, method, scheme, canonical, port, path, rules.version, (), StageResult(StageName.CONNECT, None),
                addresses=known, address_source=source)
    stages: list[StageResult] = []

    def address_stage(prior: Decision) -> Decision | None:
        if not known:
            stages.append(StageResult(StageName.ADDRESSES, None, note=(
                f"not evaluated: {canonical} would be resolved by DNS at run time; every address must be public, "
                f"or covered by a cidr allow rule or the host rule's addresses:")))
            return None
        checked = check_addresses(rules, agent, scheme, canonical, port, known, prior)
        stages.append(_result(rules, StageName.ADDRESSES, checked))
        return checked

    def done(**changes: Any) -> Plan:
        final = next(s for s in reversed(stages) if s.decision is not None)
        if final.decision is not None and not final.decision.allowed:
            changes["complete"] = True  # a denial stands whatever the name resolves to
        return replace(base, stages=tuple(stages), final=final, **changes)

    def refused_tunnel() -> Plan:
        # settings.explain_denials: in_band accepts a refused tunnel only to answer with the refusal.
        d = next(s.decision for s in reversed(stages) if s.decision is not None)
        explain = rules.settings.explain_denials == "in_band" and d is not None and d.reason in EXPLAINABLE
        return done(interception=Interception.EXPLAIN if explain else None)

    if scheme == "https":
        connect = plan_connect(rules, agent, host, port)
        stages.append(_result(rules, StageName.CONNECT, connect))
        if not connect.allowed:
            return refused_tunnel()
        checked = address_stage(connect)
        if checked is not None and not checked.allowed:
            return refused_tunnel()
        tunnel = checked or connect
        complete = checked is not None
        governed = governed_by_address(rules, canonical, port, known) if checked is not None else None
        if governed is not None:
            tunnel = replace(tunnel, intercept=True)
        mode, why = interception_for(rules, agent, canonical, port, tunnel, governed)
        raw = plan_raw_tcp(rules, tunnel) if mode is Interception.PASSTHROUGH else None
        if method is None or path is None:
            return done(interception=mode, intercept_why=why, complete=complete, raw_tcp=raw)
        if mode is Interception.PASSTHROUGH:
            stages.append(StageResult(StageName.REQUEST, None, note=(
                "not evaluated: the tunnel is passed through, so the proxy never sees the requests inside it")))
            return done(interception=mode, intercept_why=why, complete=complete, raw_tcp=raw)
        request = plan_request(rules, agent, "https", host, port, method, path)
        stages.append(_result(rules, StageName.REQUEST, request))
        if not request.allowed:
            return done(interception=mode, intercept_why=why, complete=complete)
        creds = credentials_for_request(rules, agent, canonical, port, "https", method, path, True)
        server = mcp_server_for(rules, canonical, port, path, governed)
        return done(interception=mode, intercept_why=why, credentials=creds,
                    mcp_server=server.id if server else None, complete=complete)

    if method is None or path is None:
        raise ValueError("a plain-HTTP plan needs a method and a path")
    request = plan_request(rules, agent, scheme, host, port, method, path)
    stages.append(_result(rules, StageName.REQUEST, request))
    if not request.allowed:
        return done()
    checked = address_stage(request)
    if checked is not None and not checked.allowed:
        return done()
    governed = governed_by_address(rules, canonical, port, known) if checked is not None else None
    server = mcp_server_for(rules, canonical, port, path, governed)
    return done(interception=Interception.PLAIN, mcp_server=server.id if server else None,
                complete=checked is not None)


def plan_url(rules: RuleSet, agent: str, method: str, url: str,
             addresses: Sequence[IPAddress] | None = None) -> Plan:
    """`plan` for a URL (see `split_url`)."""
    scheme, host, port, path = split_url(url)
    return plan(rules, agent, scheme, host, port, method, path, addresses)


def plan_mcp(rules: RuleSet, agent: str, server_id: str, message: dict[str, Any],
             addresses: Sequence[IPAddress] | None = None) -> Plan:
    """The HTTP POST that carries `message` to the declared server `server_id`, then the MCP
    decision on the message. Raises KeyError for an unknown server id."""
    server = next((s for s in rules.model.mcp_servers if s.id == server_id), None)
    if server is None:
        raise KeyError(server_id)
    http = plan_url(rules, agent, "POST", server.url, addresses)
    if not http.decision.allowed or http.mcp_server != server.id:
        return http  # refused before the MCP stage, or another server's prefix took the path
    policies, pins = mcp_decider_for(rules)
    md = decide_mcp(policies, pins, agent, server, message)
    mcp_stage = _result(rules, StageName.MCP, md.decision)
    return replace(http, stages=(*http.stages, mcp_stage), final=mcp_stage)
