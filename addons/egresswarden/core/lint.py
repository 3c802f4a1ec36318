"""Warnings for rules that load but cannot work as written, or are broader than they look.

`lint(rules)` never fails a load: `warden check` prints the warnings (exit 0, or 1 with
`--strict`). Each is a `RuleProblem` with the file:line of the rule concerned.

* A credential no allow rule lets its agent reach: Warden injects credentials only into
  allowed requests, so the credential is dead weight (and often a forgotten allow rule).
* An MCP server whose host no allow rule lets its agents reach: every call is refused at
  CONNECT before MCP governance ever sees it.
* A wildcard or `domain:` allow rule (or credential) on a *private* public-suffix entry
  (`*.github.io`, `domain: s3.amazonaws.com`, `*.herokuapp.com`) or above one
  (`*.amazonaws.com`): ICANN suffixes are errors already; the PSL's private section lists
  names under which anyone can register a site, so such a rule allows (or sends the secret
  to) every stranger's site there.

A rule, credential or MCP entry may list the codes of warnings the team has looked at and
accepts (`accept_warnings: [private_suffix]`, say for `*.salesforce.com`): those are reported
as accepted and not counted by `--strict`. An acceptance whose warning no longer fires is a
warning itself, so acceptances do not outlive their reason. Codes: `private_suffix` (allow
rules, credentials), `never_injected` (credentials), `unreachable` (MCP entries).

Since 0.2 a cidr rule matches IP literals only, so reachability of a host name is decided
by host/domain rules alone and can be checked here. `cidr_name_warnings`/`cidr_notes` flag
rule sets written for the 0.1 meaning of cidr rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .errors import RuleProblem
from .hostnames import is_private_suffix, private_suffixes_below
from .model import AgentMode, Origin, Target, TargetKind
from .ruleset import CompiledAgent, RuleSet

HTTPS_PORT = 443


class LintCode(StrEnum):
    """The warnings a rule may accept (`accept_warnings:`; rules.schema.json lists which kind takes which)."""

    PRIVATE_SUFFIX = "private_suffix"
    NEVER_INJECTED = "never_injected"
    UNREACHABLE = "unreachable"


@dataclass
class LintReport:
    warnings: list[RuleProblem] = field(default_factory=list)
    accepted: list[RuleProblem] = field(default_factory=list)  # warnings the rule's accept_warnings names

    def settle(self, kind: str, ident: str, origin: Origin, accepts: frozenset[str],
               found: dict[LintCode, RuleProblem | None]) -> None:
        """One rule's warnings (`found`: code -> the warning, None where it did not fire):
        accepted or not, and a warning for each accepted code that did not fire."""
        for code, problem in found.items():
            if problem is None:
                continue
            if code in accepts:
                self.accepted.append(RuleProblem(problem.file, problem.line,
                                                 f"accepted ({code}, accept_warnings): {problem.message}"))
            else:
                self.warnings.append(RuleProblem(problem.file, problem.line, f"warning: {problem.message}",
                                                 problem.hint))
        fired = {code for code, problem in found.items() if problem is not None}
        for stale in sorted(accepts - fired):
            self.warnings.append(RuleProblem(
                origin.file, origin.line,
                f"warning: {kind} {ident!r} accepts the warning {stale} (accept_warnings), which it no longer raises",
                f"remove {stale} from its accept_warnings"))


def _reachable(agent: CompiledAgent, host: str, ports: frozenset[int] | None, default_port: int = HTTPS_PORT) -> bool:
    """Does some allow rule of the agent admit `host` on one of `ports` (default: the
    scheme's port, which is also what a rule without ports admits)?"""
    wanted = ports or frozenset({default_port})
    for policy in agent.policies:
        for rule in policy.hosts.lookup(host):
            if (default_port in wanted) if rule.ports is None else bool(rule.ports & wanted):
                return True
    return False


def _target_hosts(target: Target) -> str:
    return f"*.{target.value}" if target.kind is TargetKind.WILDCARD else target.value


def _suffix_warning(kind: str, ident: str, target: Target, origin: Origin) -> RuleProblem | None:
    if target.kind not in (TargetKind.WILDCARD, TargetKind.DOMAIN):
        return None
    below = private_suffixes_below(target.value)
    if is_private_suffix(target.value):
        what = "a public suffix"
    elif below is not None:  # `*.amazonaws.com`: s3.amazonaws.com and 522 more are suffixes below it
        what = f"above {below[0]} public suffix{'es' if below[0] > 1 else ''} (e.g. {below[1]})"
    else:
        return None
    shown = f"host: '*.{target.value}'" if target.kind is TargetKind.WILDCARD else f"domain: {target.value}"
    return RuleProblem(
        origin.file, origin.line,
        f"{kind} {ident!r} ({shown}) covers every site under {target.value}, {what} "
        "(private section of the Public Suffix List): its names belong to many unrelated owners",
        f"name the hosts you mean, e.g. host: <name>.{target.value}")


def lint(rules: RuleSet) -> LintReport:
    """Every warning for a loaded rule set (and every accepted one), in file:line order."""
    model = rules.model
    report = LintReport()
    enforced = [(a, rules.agents[a.id]) for a in model.agents if a.mode is AgentMode.ENFORCE and a.id in rules.agents]
    for name, policy in model.policies.items():
        users = [(a, c) for a, c in enforced if name in a.policies]
        for rule in policy.allow:
            report.settle("allow rule", rule.id, rule.origin, rule.accept_warnings, {
                LintCode.PRIVATE_SUFFIX: _suffix_warning("allow rule", rule.id, rule.target, rule.origin)})
        for cred in policy.credentials:
            stranded = [a.id for a, c in users if not _reachable(c, cred.target.value, cred.ports)]
            never_injected = RuleProblem(
                cred.origin.file, cred.origin.line,
                f"credential {cred.id!r} on {_target_hosts(cred.target)} is never injected for agent(s) "
                f"{', '.join(stranded)}: no allow rule of their policies admits {cred.target.value}",
                f"add an allow rule, e.g. - host: {cred.target.value}") if stranded else None
            report.settle("credential", cred.id, cred.origin, cred.accept_warnings, {
                LintCode.PRIVATE_SUFFIX: _suffix_warning("credential", cred.id, cred.target, cred.origin),
                LintCode.NEVER_INJECTED: never_injected})
        servers = {s.id: s for s in model.mcp_servers}
        for mcp in policy.mcp:
            server = servers.get(mcp.server)
            if server is None:
                continue
            default = 80 if server.scheme == "http" else HTTPS_PORT
            stranded = [a.id for a, c in users
                        if not _reachable(c, server.host, frozenset({server.port}), default)]
            unreachable = RuleProblem(
                mcp.origin.file, mcp.origin.line,
                f"MCP server {server.id!r} ({server.host}:{server.port}) is unreachable for agent(s) "
                f"{', '.join(stranded)}: no allow rule of their policies admits it, so every call is refused "
                "at CONNECT",
                f"add an allow rule, e.g. - host: {server.host}" + (f" with ports: [{server.port}]"
                                                                    if server.port != default else "")
            ) if stranded else None
            report.settle("MCP entry for", mcp.server, mcp.origin, mcp.accept_warnings,
                          {LintCode.UNREACHABLE: unreachable})
    report.warnings.sort(key=lambda p: (p.file, p.line))
    report.accepted.sort(key=lambda p: (p.file, p.line))
    return report


def cidr_name_warnings(rules: RuleSet) -> list[str]:
    """Rule sets that relied on the 0.1 meaning of `cidr` rules.

    Until 0.1 a cidr allow rule also allowed any host name that resolved into it, so Warden
    resolved every name an agent asked for (a DNS exfiltration channel). Since 0.2 a cidr
    rule matches IP literals only; a name needs a host/domain rule (with `addresses:` when it
    lives at a private address)."""
    out: list[str] = []
    model = rules.model
    for agent in model.agents:
        cidr_rules = [r for name in agent.policies for r in model.policies[name].allow
                      if r.target.kind is TargetKind.CIDR]
        if not cidr_rules:
            continue
        compiled = rules.agents[agent.id]
        for name, addresses in rules.hosts_file.items():
            if any(p.hosts and p.hosts.lookup(name) for p in compiled.policies):
                continue
            for rule in cidr_rules:
                net = rule.target.network
                if net is not None and any(ip.version == net.version and ip in net for ip in addresses):
                    out.append(
                        f"{rule.origin}: agent {agent.id!r} reaches {name} (hosts file: {addresses[0]}) only "
                        f"through cidr rule {rule.id!r}; since 0.2 a cidr rule matches IP literals only, so "
                        f"{name} is now refused: add a host rule for it (with addresses: [{net}] if private)")
                    break
    return out


def cidr_notes(rules: RuleSet) -> list[str]:
    """One note per agent with cidr rules (names resolved by DNS cannot be checked offline)."""
    model = rules.model
    out = []
    for agent in model.agents:
        first = next((r for name in agent.policies for r in model.policies[name].allow
                      if r.target.kind is TargetKind.CIDR), None)
        if first is not None:
            out.append(f"{first.origin}: agent {agent.id!r} has cidr rules; since 0.2 they match IP literals only, "
                       f"never host names (a name needs a host/domain rule)")
    return out
