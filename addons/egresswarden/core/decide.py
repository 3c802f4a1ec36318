"""`decide`: one function, one decision value.

Precedence, first match wins (each step returns early; anything unexpected is a deny):

 1. Unknown agent                                   -> deny  auth_failed
 2. Host that is not a valid name or IP literal     -> deny  invalid_host
 3. Path that is ambiguous (dot segments, encoded /) -> deny  invalid_path
 4. Global deny rule matching host (or the IP literal via cidr) and port, and, for rules with
    methods/paths, the request                     -> deny  deny_listed (never softened by report mode)
 5. The agent's allow rules for the host. A name is allowed only by host/domain rules; an IP
    literal only by cidr rules (a cidr rule never allows a name, so no name is ever resolved
    just to find out whether a cidr rule covers it: DNS is not an exfiltration channel):
      none matches the host   -> deny no_matching_rule
      none matches the port   -> deny port_not_allowed
      CONNECT stage           -> allow; intercept if the host needs per-request decisions
                                 (method/path rules, credentials, MCP server, L7 deny rules,
                                 settings.tls_intercept: always)
      request stage           -> allow on the first rule matching method and path, else deny
                                 method_not_allowed / path_not_allowed
 6. `decide_addresses`, once an allowed name is resolved (never before), for every address:
    on the global deny list -> deny deny_listed; private or internal (settings.private_networks:
    deny) and neither covered by one of the agent's cidr allow rules on this port nor listed in
    the `addresses:` of a host/domain rule that allows the name -> deny private_address.
    Step 6 always enforces, in report mode too, and it runs before anything a report-mode
    verdict could soften.

Report mode (agent.mode: report) turns the denials of steps 5-6 that come from the agent's
own policy into verdict `report`: allowed, logged with the reason it would have been denied.
Global deny rules, the SSRF guard, identity and fronting checks always enforce.
"""

from __future__ import annotations

from collections.abc import Sequence

from .decision import Decision, Reason, Verdict, deny
from .facts import RequestFacts
from .hostnames import HostError, IPAddress, normalize_host, parse_ip
from .netaddr import is_private_address
from .paths import PathError, canonical_path
from .ruleset import CompiledAgent, CompiledRule, RuleSet, default_port


def _policy_denial(agent: CompiledAgent, reason: Reason, message: str, version: str,
                   rule_id: str | None = None) -> Decision:
    if agent.report_mode:
        return Decision(Verdict.REPORT, reason, rule_id, f"report mode, would deny: {message}", version)
    return deny(reason, message, version, rule_id)


def _port_list(rules: Sequence[CompiledRule]) -> str:
    """The ports `rules` allow, as text for the agent: "443 (https) / 80 (http), 8443"."""
    listed = [str(p) for p in sorted({p for r in rules for p in (r.ports or ())})]
    if any(r.ports is None for r in rules):
        listed.insert(0, "443 (https) / 80 (http)")
    return ", ".join(listed)


def _allowed(rules: RuleSet, rule: CompiledRule, intercept: bool) -> Decision:
    # Memoised on the rule itself (see CompiledRule.allow_decision); the version check keeps
    # a rule object that outlived its rule set from answering with a stale version.
    decision = rule.allow_intercept_decision if intercept else rule.allow_decision
    if decision is None or decision.policy_version != rules.version:
        decision = Decision(Verdict.ALLOW, Reason.ALLOWED, rule.id, f"allowed by rule {rule.id}", rules.version,
                            intercept=intercept)
        # CompiledRule is frozen for everyone else; this cache is the one field decide fills.
        object.__setattr__(rule, "allow_intercept_decision" if intercept else "allow_decision", decision)
    return decision


def _deny_rule_matches(rule: CompiledRule, port: int) -> bool:
    # A deny rule without ports covers every port: deny beats allow, whatever the port.
    return rule.ports is None or port in rule.ports


def _describe(rules: Sequence[CompiledRule]) -> str:
    parts = []
    for r in rules[:5]:
        methods = ",".join(sorted(r.methods)) if r.methods else "any method"
        paths = " ".join(r.globs) if r.globs else "any path"
        parts.append(f"{methods} on {paths} (rule {r.id})")
    return "; ".join(parts)



def decide(rules: RuleSet, facts: RequestFacts) -> Decision:
    """Decide a CONNECT (facts.method is None) or an HTTP request. See the module docstring."""
    version = rules.version
    agent = rules.agents.get(facts.agent)
    if agent is None:
        return deny(Reason.AUTH_FAILED, f"unknown agent {facts.agent[:64]!r}", version)
    try:
        host = normalize_host(facts.host)
    except HostError as e:
        return deny(Reason.INVALID_HOST, f"host {facts.host[:80]!r} rejected: {e}", version)
    path: str | None = None
    if facts.path is not None:
        try:
            path = canonical_path(facts.path)
        except PathError as e:
            return deny(Reason.INVALID_PATH, f"path rejected: {e}", version)
    method = facts.method.upper() if facts.method is not None else None
    ip = parse_ip(host)
    port = facts.port

    l7_deny = False
    # Hot path (issue 17): index `match()` returns stored tuples, `.size` instead of bool(),
    # port/method checks inline; same order and same answers as the CompiledRule methods.
    if ip is not None:
        deny_matches = rules.deny_cidrs.match(ip) if rules.deny_cidrs.size else ()
    else:
        deny_matches = rules.deny_hosts.match(host) if rules.deny_hosts.size else ()
    for rule in deny_matches:
        if not _deny_rule_matches(rule, port):
            continue
        if not rule.has_l7:
            return deny(Reason.DENY_LISTED, f"{host} is on the global deny list", version, rule.id)
        if method is None or path is None:
            l7_deny = True  # decided per request: the tunnel must be intercepted
        elif rule.method_ok(method) and rule.path_ok(path):
            return deny(Reason.DENY_LISTED, f"{method} {host}{path} is on the global deny list", version, rule.id)

    candidates: tuple[CompiledRule, ...] = ()
    for policy in agent.policies:
        found = policy.cidrs.match(ip) if ip is not None else policy.hosts.match(host)
        if found:
            candidates = candidates + found if candidates else found
    if not candidates:
        what = "IP address" if ip is not None else "host"
        return _policy_denial(agent, Reason.NO_MATCHING_RULE,
                              f"no rule allows agent '{agent.id}' to reach the {what} {host}", version)
    scheme_port = default_port(facts.scheme)
    usable = [r for r in candidates if (port == scheme_port if r.ports is None else port in r.ports)]
    if not usable:
        return _policy_denial(agent, Reason.PORT_NOT_ALLOWED,
                              f"{host} is allowed, but not on port {port}; allowed ports: {_port_list(candidates)}",
                              version, candidates[0].id)

    if method is None or path is None:
        unconstrained = None
        for r in usable:
            if r.methods is None and r.globs is None:
                unconstrained = r
                break
        intercept = (
            unconstrained is None
            or l7_deny
            or rules.settings.tls_intercept == "always"
            or rules.has_credentials_for(agent, host)
            or bool(rules.mcp_servers_at(host, port))
        )
        return _allowed(rules, unconstrained or usable[0], intercept)

    for rule in usable:
        if rule.method_ok(method) and rule.path_ok(path):
            return _allowed(rules, rule, False)
    path_matches = [r for r in usable if r.path_ok(path)]
    if path_matches:
        return _policy_denial(agent, Reason.METHOD_NOT_ALLOWED,
                              f"{method} is not allowed on {host}{path}; allowed here: {_describe(path_matches)}",
                              version, path_matches[0].id)
    return _policy_denial(agent, Reason.PATH_NOT_ALLOWED,
                          f"path {path} is not allowed on {host}; allowed: {_describe(usable)}", version, usable[0].id)


def decide_addresses(rules: RuleSet, facts: RequestFacts, addresses: Sequence[IPAddress], prior: Decision) -> Decision:
    """Step 6: check every address an allowed name (or IP literal) resolved to against the
    global deny cidrs and the private-address guard. `prior` is the name-stage decision and is
    returned unchanged when every address passes; a failure is a deny whatever the agent's mode.
    `facts.host` must be the normalised host."""
    version = rules.version
    agent = rules.agents.get(facts.agent)
    if agent is None:
        return deny(Reason.AUTH_FAILED, f"unknown agent {facts.agent[:64]!r}", version)
    if not addresses:
        return deny(Reason.RESOLVE_FAILED, f"{facts.host} did not resolve to any address", version)
    host = facts.host
    port = facts.port
    guard = rules.settings.private_networks == "deny"
    host_rules: list[CompiledRule] | None = None
    for ip in addresses:
        for rule in rules.deny_cidrs.lookup(ip):
            if _deny_rule_matches(rule, port) and not rule.has_l7:
                return deny(Reason.DENY_LISTED, f"{host} resolves to {ip}, which is on the global deny list",
                            version, rule.id)
        if not guard or not is_private_address(ip):
            continue
        if any(r.port_ok(port, facts.scheme) for p in agent.policies if p.cidrs for r in p.cidrs.lookup(ip)):
            continue  # a cidr allow rule on this port names this private network
        if host_rules is None:
            host_rules = [] if parse_ip(host) is not None else [
                r for p in agent.policies if p.hosts for r in p.hosts.lookup(host) if r.port_ok(port, facts.scheme)]
        if any(r.addresses_cover(ip) for r in host_rules):
            continue  # the host rule says this name may live at this private address
        return deny(Reason.PRIVATE_ADDRESS,
                    f"{host} resolves to {ip}, a private or internal address; Warden refuses those unless a "
                    f"cidr allow rule on port {port} or the host rule's addresses: list covers them", version)
    return prior
