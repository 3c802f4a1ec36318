"""Validated `RuleModel` -> immutable, indexed `RuleSet`."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

from .errors import RuleError, RuleProblem, RuleSetError, SecretError
from .hostnames import IPAddress
from .hostsfile import parse_hosts_file
from .index import CidrIndex, HostIndex
from .model import ANONYMOUS_AGENT, AgentMode, Credential, McpServer, Policy, Rule, RuleModel, TargetKind
from .ruleset import CompiledAgent, CompiledCredential, CompiledRule, PolicyIndex, RuleSet
from .secrets import Secret, render
from .validate import load_model


class _Compiler:
    def __init__(self, model: RuleModel) -> None:
        self.model = model
        self.problems: list[RuleProblem] = []
        self.secrets: list[Secret] = []
        self.credentials: dict[str, CompiledCredential] = {}

    def rule(self, rule: Rule | Credential) -> CompiledRule:
        return CompiledRule(rule.id, rule.policy, str(rule.target), rule.ports, rule.methods, rule.paths)

    def credential(self, cred: Credential) -> CompiledCredential | None:
        secrets_dir = self._secrets_dir()
        try:
            headers = tuple((name, *render(t, secrets_dir)) for name, t in cred.inject)
            query = tuple((name, *render(t, secrets_dir)) for name, t in cred.inject_query)
        except SecretError as e:
            self.problems.append(RuleProblem(cred.origin.file, cred.origin.line, f"credential {cred.id!r}: {e}",
                                             "export the variable or add the file to settings.secrets_dir"))
            return None
        used = tuple(s for _, _, secrets in headers + query for s in secrets)
        self.secrets.extend(used)
        return CompiledCredential(
            id=cred.id,
            policy=cred.policy,
            rule=self.rule(cred),
            headers=tuple((name, value) for name, value, _ in headers),
            query=tuple((name, value) for name, value, _ in query),
            strip=tuple(h.lower() for h in cred.strip),
            placeholder=cred.placeholder,
            redact_response=cred.redact_response,
            secrets=used,
            allow_secret_in_url=cred.allow_secret_in_url,
        )

    def _secrets_dir(self) -> str | None:
        d = self.model.settings.secrets_dir
        if d and not Path(d).is_absolute():
            d = str(Path(self.model.rules_dir) / d)
        return d

    def policy(self, policy: Policy) -> PolicyIndex:
        hosts: HostIndex[CompiledRule] = HostIndex()
        cidrs: CidrIndex[CompiledRule] = CidrIndex()
        for rule in policy.allow:
            compiled = self.rule(rule)
            if rule.target.kind is TargetKind.CIDR:
                assert rule.target.network is not None
                cidrs.add(rule.target.network, compiled)
            else:
                hosts.add(rule.target.kind, rule.target.value, compiled)
        creds: HostIndex[CompiledCredential] = HostIndex()
        for cred in policy.credentials:
            compiled_cred = self.credential(cred)
            if compiled_cred is not None:
                creds.add(cred.target.kind, cred.target.value, compiled_cred)
                self.credentials.setdefault(compiled_cred.id, compiled_cred)
        for index in (hosts, cidrs, creds):
            index.freeze()  # here, in the loading thread, not on the first decision
        return PolicyIndex(policy.name, hosts, cidrs, creds, tuple(h.lower() for h in policy.strip), policy.mcp)

    def hosts_file(self) -> dict[str, tuple[IPAddress, ...]]:
        path = self.model.settings.hosts_file
        if not path:
            return {}
        p = Path(path)
        if not p.is_absolute():
            p = Path(self.model.rules_dir) / p
        try:
            return parse_hosts_file(p)
        except RuleError as e:
            self.problems.append(e.problem)
            return {}

    def compile(self) -> RuleSet:
        model = self.model
        policies = {name: self.policy(p) for name, p in model.policies.items()}
        agents = {}
        source_agents: CidrIndex[CompiledAgent] = CidrIndex()
        for a in model.agents:
            indexes = tuple(policies[name] for name in a.policies)
            compiled = CompiledAgent(a.id, a.token_sha256, a.sources, indexes, a.mode is AgentMode.REPORT,
                                     any(p.cidrs for p in indexes))
            agents[a.id] = compiled
            if not a.token_sha256 and a.id != ANONYMOUS_AGENT:
                for net in a.sources:
                    source_agents.add(net, compiled)
        deny_hosts: HostIndex[CompiledRule] = HostIndex()
        deny_cidrs: CidrIndex[CompiledRule] = CidrIndex()
        for rule in model.deny:
            compiled_rule = self.rule(rule)
            if rule.target.kind is TargetKind.CIDR:
                assert rule.target.network is not None
                deny_cidrs.add(rule.target.network, compiled_rule)
            else:
                deny_hosts.add(rule.target.kind, rule.target.value, compiled_rule)
        for index in (source_agents, deny_hosts, deny_cidrs):
            index.freeze()
        servers: dict[tuple[str, int], list[McpServer]] = {}
        for server in model.mcp_servers:
            servers.setdefault((server.host, server.port), []).append(server)
        hosts = self.hosts_file()
        if self.problems:
            raise RuleSetError(self.problems)
        rule_count = sum(len(p.allow) for p in model.policies.values()) + len(model.deny)
        return RuleSet(
            version=model.version,
            model=model,
            settings=model.settings,
            agents=MappingProxyType(agents),
            source_agents=source_agents,
            anonymous=agents.get(ANONYMOUS_AGENT),
            deny_hosts=deny_hosts,
            deny_cidrs=deny_cidrs,
            hosts_file=MappingProxyType(hosts),
            mcp_servers=MappingProxyType({k: tuple(v) for k, v in servers.items()}),
            rule_count=rule_count,
            secrets=tuple(self.secrets),
            credentials_by_id=MappingProxyType(dict(self.credentials)),
        )


def compile_model(model: RuleModel) -> RuleSet:
    """Index a validated model. Raises RuleSetError (missing secrets, bad hosts file)."""
    return _Compiler(model).compile()


@contextmanager
def _bulk_allocation() -> Iterator[None]:
    """Pause the cyclic garbage collector while a rule set is built.

    Loading allocates hundreds of thousands of long-lived objects and no garbage cycles;
    with the collector on, each generation-2 pass rescans the growing heap, which doubled
    the load time of 100,000 rules (measured: 8.0 s -> 3.8 s).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # The new rule set lives until the next reload: move it (and everything else alive)
        # out of the collector's generations. Otherwise the first full collection after
        # re-enabling scans it all, on whatever thread allocates next, typically the event
        # loop: measured as a 118 ms stall during a 100,000-rule reload.
        gc.freeze()
        if enabled:
            gc.enable()


def load_ruleset(rules_dir: Path) -> RuleSet:
    """Load, validate and compile a rules directory (or a single file)."""
    with _bulk_allocation():
        return compile_model(load_model(Path(rules_dir)))
