"""The compiled, immutable rule set that every decision reads.

A `RuleSet` is built once from a validated `RuleModel` (see `compiler.compile_model`) and
never changed: reload builds a new one and swaps a single reference, so a decision always
sees one consistent version of the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .decision import Decision
from .hostnames import IPAddress
from .index import CidrIndex, HostIndex
from .model import IPNetwork, McpRule, McpServer, RuleModel, Settings
from .paths import compile_glob
from .secrets import Secret


def default_port(scheme: str) -> int:
    return 80 if scheme == "http" else 443


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    policy: str | None
    target: str
    ports: frozenset[int] | None
    methods: frozenset[str] | None
    globs: tuple[str, ...] | None  # path globs as written; compiled lazily by compile_glob
    # host/domain allow rules: private networks the name may resolve to (`addresses:`)
    addresses: tuple[IPNetwork, ...] | None = None
    websocket: bool = False
    raw_tcp: bool = False  # a passthrough tunnel this rule allows may carry bytes that are not TLS
    # The allow decisions this rule gives (without / with interception), built on first use by
    # `decide`: a Decision is immutable and costs ~0.9 us to build, a third of a decision. Kept
    # on the rule rather than in a dict keyed by rule id because at 100,000 rules that dict
    # cost four CPU-cache misses per decision (issue 17). Not part of equality.
    allow_decision: Decision | None = field(default=None, init=False, compare=False, repr=False)
    allow_intercept_decision: Decision | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def has_l7(self) -> bool:
        return self.methods is not None or self.globs is not None

    def port_ok(self, port: int, scheme: str) -> bool:
        return port == default_port(scheme) if self.ports is None else port in self.ports

    def method_ok(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def path_ok(self, path: str) -> bool:
        return self.globs is None or any(compile_glob(g).fullmatch(path) for g in self.globs)

    def addresses_cover(self, ip: IPAddress) -> bool:
        return self.addresses is not None and any(ip in net for net in self.addresses if net.version == ip.version)


@dataclass(frozen=True, slots=True)
class CompiledCredential:
    """A credential with its secrets resolved. Its repr never shows a secret value."""

    id: str
    policy: str
    rule: CompiledRule  # where it applies (host/domain + ports/methods/paths)
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    strip: tuple[str, ...] = ()
    placeholder: str | None = None
    redact_response: bool = True
    secrets: tuple[Secret, ...] = ()
    allow_secret_in_url: bool = False

    def __repr__(self) -> str:
        return f"CompiledCredential(id={self.id!r}, target={self.rule.target!r})"


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    name: str
    hosts: HostIndex[CompiledRule]
    cidrs: CidrIndex[CompiledRule]
    credentials: HostIndex[CompiledCredential]
    strip: tuple[str, ...]
    mcp: tuple[McpRule, ...]


@dataclass(frozen=True, slots=True)
class CompiledAgent:
    id: str
    token_hashes: tuple[bytes, ...]
    sources: tuple[IPNetwork, ...]
    policies: tuple[PolicyIndex, ...]
    report_mode: bool

    def source_ok(self, ip: IPAddress | None) -> bool:
        if not self.sources:
            return True
        return ip is not None and any(ip in net for net in self.sources if net.version == ip.version)


@dataclass(frozen=True, slots=True)
class RuleSet:
    version: str
    model: RuleModel
    settings: Settings
    agents: Mapping[str, CompiledAgent]
    source_agents: CidrIndex[CompiledAgent]
    anonymous: CompiledAgent | None
    deny_hosts: HostIndex[CompiledRule]
    deny_cidrs: CidrIndex[CompiledRule]
    hosts_file: Mapping[str, tuple[IPAddress, ...]]
    mcp_servers: Mapping[tuple[str, int], tuple[McpServer, ...]]
    rule_count: int
    secrets: tuple[Secret, ...]
    credentials_by_id: Mapping[str, CompiledCredential] = MappingProxyType({})
    allow_rules_by_id: Mapping[str, CompiledRule] = MappingProxyType({})

    def allow_rule(self, rule_id: str) -> CompiledRule | None:
        return self.allow_rules_by_id.get(rule_id)

    def agent(self, agent_id: str) -> CompiledAgent | None:
        return self.agents.get(agent_id)

    def credentials_for(self, agent: CompiledAgent, host: str) -> list[CompiledCredential]:
        found: list[CompiledCredential] = []
        for policy in agent.policies:
            if policy.credentials.size:
                found.extend(policy.credentials.match(host))
        return found

    def has_credentials_for(self, agent: CompiledAgent, host: str) -> bool:
        """`bool(credentials_for(...))` without building the list (every CONNECT asks)."""
        for policy in agent.policies:  # noqa: SIM110 - a loop, not any(genexpr): no generator per call
            if policy.credentials.size and policy.credentials.match(host):
                return True
        return False

    def mcp_servers_at(self, host: str, port: int) -> tuple[McpServer, ...]:
        return self.mcp_servers.get((host, port), ())
