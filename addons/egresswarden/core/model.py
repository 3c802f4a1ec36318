"""The validated rule model: what the rule files mean, before indexing.

Every object remembers the file and line it came from (`Origin`), so that `warden check`,
`warden explain` and reload failures can point at the rule.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Origin:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class TargetKind(StrEnum):
    HOST = "host"  # exact host name
    WILDCARD = "wildcard"  # "*.example.com": any subdomain, not the apex
    DOMAIN = "domain"  # "example.com" and every subdomain
    CIDR = "cidr"  # IP literals and resolved addresses


@dataclass(frozen=True, slots=True)
class Target:
    kind: TargetKind
    value: str  # normalised host, wildcard base (without "*."), domain, or network text
    network: IPNetwork | None = None

    def __str__(self) -> str:
        return f"*.{self.value}" if self.kind is TargetKind.WILDCARD else self.value


@dataclass(frozen=True, slots=True)
class Rule:
    """An allow rule (inside a policy) or a global deny rule (policy None)."""

    id: str
    target: Target
    ports: frozenset[int] | None
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None
    policy: str | None
    origin: Origin
    # host/domain allow rules: private networks the name may resolve to (exempt from the SSRF guard)
    addresses: tuple[IPNetwork, ...] | None = None
    websocket: bool = False  # allow rules: WebSocket upgrades permitted on this host
    raw_tcp: bool = False  # allow rules: a passed-through tunnel may carry bytes that are not TLS
    accept_warnings: frozenset[str] = frozenset()  # lint codes the team accepts for this rule (core/lint.py)

    @property
    def has_l7(self) -> bool:
        return self.methods is not None or self.paths is not None


@dataclass(frozen=True, slots=True)
class Credential:
    id: str
    target: Target
    ports: frozenset[int] | None
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None
    inject: tuple[tuple[str, str], ...]  # (header, template)
    inject_query: tuple[tuple[str, str], ...]
    allow_secret_in_url: bool
    strip: tuple[str, ...]
    placeholder: str | None
    redact_response: bool
    policy: str
    origin: Origin
    accept_warnings: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class McpRule:
    server: str
    tools: frozenset[str]
    deny_tools: frozenset[str]
    arguments: tuple[tuple[str, Any], ...]  # (tool, JSON Schema)
    resources: tuple[str, ...] | None
    prompts: frozenset[str] | None
    log_argument_values: frozenset[str]
    policy: str
    origin: Origin
    accept_warnings: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    allow: tuple[Rule, ...]
    credentials: tuple[Credential, ...]
    strip: tuple[str, ...]
    mcp: tuple[McpRule, ...]
    origin: Origin


class AgentMode(StrEnum):
    ENFORCE = "enforce"
    REPORT = "report"


ANONYMOUS_AGENT = "anonymous"


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    token_sha256: tuple[bytes, ...]
    sources: tuple[IPNetwork, ...]
    policies: tuple[str, ...]
    mode: AgentMode
    origin: Origin
    sandbox_profile: str | None = None  # None: the profile named DEFAULT_SANDBOX_PROFILE


@dataclass(frozen=True, slots=True)
class AlertSink:
    id: str
    url: str
    headers: tuple[tuple[str, str], ...]  # (name, template)
    events: frozenset[str]
    dedup_window_seconds: float
    max_per_minute: int
    timeout_seconds: float
    max_retries: int
    ca_file: str | None


@dataclass(frozen=True, slots=True)
class AuditSettings:
    on_failure: str = "fail_closed"
    max_file_bytes: int = 100 * 1024 * 1024
    queue_size: int = 65536
    stdout: bool = False
    signing_key: str | None = None  # template, e.g. "${secret:AUDIT_SIGNING_KEY}"; rendered by the Audit addon
    checkpoint_records: int = 1000
    checkpoint_seconds: float = 5.0
    keep_query_values: frozenset[str] = frozenset()  # query names whose values are not redacted


@dataclass(frozen=True, slots=True)
class Settings:
    private_networks: str = "deny"
    hosts_file: str | None = None
    tls_intercept: str = "auto"
    secrets_dir: str | None = None
    resolve_timeout_seconds: float = 5.0
    body_scan_max_buffered_bytes: int = 1024 * 1024
    max_mcp_body_bytes: int = 8 * 1024 * 1024
    max_buffered_bytes_per_agent: int = 64 * 1024 * 1024  # request bodies held at once (runtime/budget.py)
    decoded_bytes_per_second_per_agent: int = 8 * 1024 * 1024  # decoding for the leak guard (runtime/budget.py)
    max_connections_per_agent: int = 1024  # open client connections per agent and process (runtime/connlimits.py)
    explain_denials: str = "in_band"
    audit: AuditSettings = field(default_factory=AuditSettings)
    alerts: tuple[AlertSink, ...] = ()
    mcp_unpinned: str = "learn"  # "learn" | "refuse": what happens to an MCP tool with no pin
    mcp_pin_store: str | None = None  # learned pins (SQLite); None: the per-user state directory


@dataclass(frozen=True, slots=True)
class StdioCommand:
    """How `warden mcp stdio` starts a local (stdio) MCP server."""

    command: str
    args: tuple[str, ...] = ()
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # (name, template); templates may hold ${secret:NAME}
    sandbox_profile: str | None = None


@dataclass(frozen=True, slots=True)
class McpServer:
    """A declared MCP server: an HTTP endpoint (url) or a local process (stdio; url "", port 0)."""

    id: str
    url: str
    scheme: str
    host: str
    port: int
    path_prefix: str
    credential: str | None
    legacy_sse_messages_path: str | None
    origin: Origin
    stdio: StdioCommand | None = None


DEFAULT_SANDBOX_PROFILE = "default"

# Where credentials live on a developer machine: denied in every profile unless it sets
# deny_defaults: false. "~/" is the invoking user's home, "./" the sandbox's workdir.
DEFAULT_SANDBOX_DENY: tuple[str, ...] = (
    "~/.ssh", "~/.aws", "~/.config/gcloud", "~/.azure", "~/.kube", "~/.docker/config.json", "~/.gnupg",
    "~/.netrc", "~/.git-credentials", "~/.npmrc", "~/.pypirc", "./**/.env",
)

# The built-in default profile's denied commands (a profile that sets deny_commands replaces them).
DEFAULT_SANDBOX_DENY_COMMANDS: tuple[str, ...] = (
    "ssh", "scp", "sftp", "nc", "ncat", "netcat", "socat", "telnet", "sudo", "su", "doas", "pkexec",
)


# Set by `warden sandbox` itself (bridge, CA trust, identity): a profile cannot override them.
SANDBOX_RESERVED_ENV: frozenset[str] = frozenset({
    "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy",
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS", "PIP_CERT",
    "NODE_USE_ENV_PROXY", "WARDEN_SANDBOX_ID", "WARDEN_AGENT", "HOME", "TMPDIR",
})


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    memory_mb: int | None = None
    max_processes: int | None = None
    cpu_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxProfile:
    """A `warden sandbox` profile: what the sandboxed agent sees, runs and may use."""

    id: str
    read_write: tuple[str, ...] = ()
    deny: tuple[str, ...] = DEFAULT_SANDBOX_DENY  # already includes the defaults unless deny_defaults: false
    env: tuple[tuple[str, str], ...] = ()
    env_inherit: tuple[str, ...] = ()
    deny_commands: tuple[str, ...] = DEFAULT_SANDBOX_DENY_COMMANDS
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    origin: Origin | None = None  # None: the built-in default


@dataclass(frozen=True, slots=True)
class RuleModel:
    """Everything the rule files say, validated and merged."""

    agents: tuple[Agent, ...]
    policies: dict[str, Policy]
    deny: tuple[Rule, ...]
    settings: Settings
    mcp_servers: tuple[McpServer, ...]
    mcp_pins: dict[str, dict[str, str]]
    files: tuple[str, ...]
    version: str
    rules_dir: str
    # Always holds DEFAULT_SANDBOX_PROFILE (built in unless the rule files define it).
    sandbox_profiles: dict[str, SandboxProfile] = field(default_factory=dict)
