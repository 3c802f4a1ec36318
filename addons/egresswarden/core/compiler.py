"""Validated `RuleModel` -> immutable, indexed `RuleSet`.

The rule set's `version` covers everything it was built from: the rule files (`model.version`,
a content hash), the hosts file (content hash) and every secret it resolved, credentials and
alert-sink headers alike (a keyed digest, see `secrets.secrets_digest`: never a plain hash of a
value). Without a hosts file and secrets it equals `model.version`.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType

from . import credentials as _credentials  # noqa: F401 - registers its derived state
from . import mcp as _mcp  # noqa: F401 - registers its derived state
from .derived import build_all
from .errors import RuleError, RuleProblem, RuleSetError, SecretError
from .hostnames import IPAddress
from .hostsfile import parse_hosts_file
from .index import CidrIndex, HostIndex
from .model import (
    ANONYMOUS_AGENT,
    AgentMode,
    Credential,
    McpServer,
    Policy,
    Rule,
    RuleModel,
    Settings,
    TargetKind,
)
from .ruleset import CompiledAgent, CompiledCredential, CompiledRule, PolicyIndex, RuleSet
from .secrets import Secret, read_secret, render, secrets_digest
from .validate import SECRET_REF, load_model


class _Compiler:
    def __init__(self, model: RuleModel, read_secrets: bool = True) -> None:
        self.model = model
        self.read_secrets = read_secrets
        self.problems: list[RuleProblem] = []
        self.secrets: list[Secret] = []
        self.credentials: dict[str, CompiledCredential] = {}
        self.allow_rules: dict[str, CompiledRule] = {}
        self.hosts_digest: bytes | None = None

    def rule(self, rule: Rule | Credential) -> CompiledRule:
        if isinstance(rule, Rule):
            return CompiledRule(rule.id, rule.policy, str(rule.target), rule.ports, rule.methods, rule.paths,
                                rule.addresses, rule.websocket, rule.raw_tcp)
        return CompiledRule(rule.id, rule.policy, str(rule.target), rule.ports, rule.methods, rule.paths)

    def credential(self, cred: Credential) -> CompiledCredential | None:
        if not self.read_secrets:
            return self._offline_credential(cred)
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

    def _offline_credential(self, cred: Credential) -> CompiledCredential:
        """Without secret values: the templates stay as written (`${secret:NAME}`, whose
        syntax and NAME the validator checked) and no secret feeds the leak guard. For
        lint and policy tests only; the proxy always compiles with the values."""
        return CompiledCredential(
            id=cred.id, policy=cred.policy, rule=self.rule(cred), headers=cred.inject, query=cred.inject_query,
            strip=tuple(h.lower() for h in cred.strip), placeholder=cred.placeholder,
            redact_response=cred.redact_response, secrets=(), allow_secret_in_url=cred.allow_secret_in_url)

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
            self.allow_rules[compiled.id] = compiled
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
        with suppress(OSError):  # parse_hosts_file reports it with the path
            self.hosts_digest = hashlib.sha256(p.read_bytes()).digest()
        try:
            return parse_hosts_file(p)
        except RuleError as e:
            self.problems.append(e.problem)
            return {}

    def check_sandbox_env(self) -> None:
        """A sandbox profile's env may carry a credential's placeholder, never a real secret value."""
        for profile in self.model.sandbox_profiles.values():
            for key, value in profile.env:
                leaked = next((s for s in self.secrets if len(s.value) >= 8 and s.value in value), None)
                if leaked is not None and profile.origin is not None:
                    self.problems.append(RuleProblem(
                        profile.origin.file, profile.origin.line,
                        f"sandbox profile {profile.id!r}: env {key} holds the value of secret {leaked.name!r}",
                        "set the credential's placeholder instead; Warden injects the secret at the bound host"))

    def compile(self) -> RuleSet:
        model = self.model
        policies = {name: self.policy(p) for name, p in model.policies.items()}
        agents = {}
        source_agents: CidrIndex[CompiledAgent] = CidrIndex()
        for a in model.agents:
            indexes = tuple(policies[name] for name in a.policies)
            compiled = CompiledAgent(a.id, a.token_sha256, a.sources, indexes, a.mode is AgentMode.REPORT)
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
            if server.stdio is not None:  # local servers have no network address to match
                continue
            servers.setdefault((server.host, server.port), []).append(server)
        hosts = self.hosts_file()
        self.check_sandbox_env()
        if self.problems:
            raise RuleSetError(self.problems)
        rule_count = sum(len(p.allow) for p in model.policies.values()) + len(model.deny)
        return RuleSet(
            version=policy_version(model.version, self.hosts_digest, [*self.secrets, *self.alert_secrets()]),
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
            allow_rules_by_id=MappingProxyType(self.allow_rules),
        )


    def alert_secrets(self) -> list[Secret]:
        """Secrets in alert-sink headers and the audit signing key: not injected anywhere, but
        rotating one is a change."""
        out: list[Secret] = []
        for template in _other_secret_templates(self.model.settings):
            try:
                out.extend(render(template, self._secrets_dir())[1])
            except SecretError:
                continue  # the addon that uses it reports it (alerts disable the sink)
        return out


def _other_secret_templates(settings: Settings) -> list[str]:
    templates = [template for sink in settings.alerts for _, template in sink.headers]
    if settings.audit.signing_key:
        templates.append(settings.audit.signing_key)
    return templates


def policy_version(rules_version: str, hosts_digest: bytes | None, secrets: list[Secret]) -> str:
    """The version a decision carries: rule files + hosts file + (keyed) secrets, 12 hex digits."""
    if hosts_digest is None and not secrets:
        return rules_version
    digest = hashlib.sha256(f"warden-policy\0{rules_version}\0".encode())
    digest.update(hosts_digest or b"-")
    digest.update(secrets_digest(secrets) if secrets else b"-")
    return digest.hexdigest()[:12]


def current_version(rules: RuleSet, rules_version: str) -> str:
    """What `rules.version` would be if the rule set were loaded now from the same sources.

    `rules_version` is the content hash of the rule files as they are now. Used by the
    watcher's periodic content check: cheaper than a full load (no parsing or compiling).
    Raises OSError or SecretError when a source cannot be read (the caller reloads then).
    """
    settings = rules.settings
    base = Path(rules.model.rules_dir)
    hosts_digest = None
    if settings.hosts_file:
        p = Path(settings.hosts_file)
        hosts_digest = hashlib.sha256((p if p.is_absolute() else base / p).read_bytes()).digest()
    secrets_dir = settings.secrets_dir
    if secrets_dir and not Path(secrets_dir).is_absolute():
        secrets_dir = str(base / secrets_dir)
    secrets = [read_secret(s.name, secrets_dir) for s in rules.secrets]
    for template in _other_secret_templates(settings):
        for match in SECRET_REF.finditer(template):
            try:
                secrets.append(read_secret(match.group(1), secrets_dir))
            except SecretError:
                continue  # skipped at load too (see _Compiler.alert_secrets)
    return policy_version(rules_version, hosts_digest, secrets)


def compile_model(model: RuleModel, secrets: bool = True) -> RuleSet:
    """Index a validated model. Raises RuleSetError (missing secrets, bad hosts file).
    `secrets=False` reads no secret values (see `_Compiler._offline_credential`)."""
    return _Compiler(model, secrets).compile()


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


def load_ruleset(rules_dir: Path, secrets: bool = True) -> RuleSet:
    """Load, validate and compile a rules directory (or a single file).

    `secrets=False` (CI lint, policy tests): everything is checked except secret values,
    which are not read; such a rule set must never serve traffic."""
    with _bulk_allocation():
        rules = compile_model(load_model(Path(rules_dir)), secrets)
        build_all(rules)
        return rules
