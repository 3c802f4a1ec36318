"""Rule files -> validated `RuleModel`: JSON Schema first, then the checks a schema cannot express.

Every problem is reported with file and line, and where it helps, with the form to use
instead (smokescreen's ValidateDomainGlob does the same). All problems of all files are
collected before failing, so one `warden check` run shows everything to fix.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from .errors import RuleError, RuleProblem, RuleSetError
from .fastschema import compile_schema
from .hostnames import HostError, is_public_suffix, normalize_host, parse_ip, public_suffixes_below
from .model import (
    ANONYMOUS_AGENT,
    DEFAULT_SANDBOX_DENY,
    DEFAULT_SANDBOX_PROFILE,
    SANDBOX_RESERVED_ENV,
    Agent,
    AgentMode,
    AlertSink,
    AuditSettings,
    Credential,
    IPNetwork,
    McpRule,
    McpServer,
    Origin,
    Policy,
    Rule,
    RuleModel,
    SandboxLimits,
    SandboxProfile,
    Settings,
    StdioCommand,
    Target,
    TargetKind,
)
from .paths import GlobError, check_glob
from .yamlsource import LineMap, load_yaml

RULE_FILE_SUFFIXES = (".yaml", ".yml")
SECRET_REF = re.compile(r"\$\{secret:([A-Za-z_][A-Za-z0-9_]*)\}")
_ANY_REF = re.compile(r"\$\{")


@lru_cache(maxsize=1)
def rule_schema() -> dict[str, Any]:
    text = resources.files("egresswarden.core").joinpath("rules.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@lru_cache(maxsize=1)
def _fast_check() -> Callable[[Any], bool]:
    return compile_schema(rule_schema())


@lru_cache(maxsize=1)
def _schema_validator() -> jsonschema.protocols.Validator:
    schema = rule_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def rule_files(rules_dir: Path) -> list[Path]:
    """The YAML files of a rules directory (recursively), in a stable order."""
    if rules_dir.is_file():
        return [rules_dir]
    return sorted(p for p in rules_dir.rglob("*") if p.suffix in RULE_FILE_SUFFIXES and p.is_file())


class _Collector:
    """Collects problems so that one run reports all of them."""

    def __init__(self) -> None:
        self.problems: list[RuleProblem] = []

    def add(self, err: RuleError) -> None:
        self.problems.append(err.problem)


# Keys that are often written one level too high or too low, and where they belong.
_NESTED_KEYS = {
    "allow": "policies.<name>.allow", "credentials": "policies.<name>.credentials", "mcp": "policies.<name>.mcp",
    "strip": "policies.<name>.strip", "token_sha256": "an agents: entry", "sources": "an agents: entry",
    "private_networks": "settings", "hosts_file": "settings", "tls_intercept": "settings",
    "secrets_dir": "settings", "audit": "settings", "alerts": "settings",
}


def _schema_problems(doc: Any, lines: LineMap) -> list[RuleProblem]:
    if _fast_check()(doc):
        return []  # the common case; jsonschema below only runs to explain a failure
    problems = []
    for err in sorted(_schema_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        where = ".".join(str(p) for p in path) or "top level"
        message = err.message
        hint = ""
        if "token_sha256" in path:
            # Never echo a value: people paste the token itself here, and check output
            # lands in CI logs.
            message = (f"{where}: a digest is listed twice" if err.validator == "uniqueItems" else
                       f"{where}: must be a list of sha256 hex digests" if err.validator == "type" and
                       path[-1] == "token_sha256" else f"{where}: not a sha256 hex digest (64 characters 0-9a-f)")
            hint = ("if you pasted the token itself, treat it as leaked: make a new one with `warden token ID` "
                    "and paste only the token_sha256 line")
        elif err.validator in ("type", "required") and err.instance is None and path:
            # `section:` with nothing under it, usually because the lines meant to be
            # inside it are not indented (jsonschema would say "None is not of type 'object'").
            wanted = err.validator_value if err.validator == "type" else "object"
            kind = {"object": "a mapping", "array": "a list"}.get(str(wanted), f"of type {wanted}")
            message = f"{where} is empty, but it must be {kind}"
            hint = (f"if the lines below '{path[-1]}:' belong to it, indent them further; "
                    "otherwise remove the empty key")
        elif (err.validator == "type" and len(path) == 2 and path[0] == "policies"
              and str(path[1]) in _NESTED_KEYS):
            message = f"'{path[1]}' is at the level of policy names, so it is read as a policy called '{path[1]}'"
            hint = f"it belongs inside a policy: indent it under the policy name ({_NESTED_KEYS[str(path[1])]})"
        elif err.validator == "additionalProperties":
            properties = err.schema.get("properties", {}) if isinstance(err.schema, Mapping) else {}
            present = err.instance if isinstance(err.instance, Mapping) else {}
            unknown = sorted(set(present) - set(properties))
            if unknown:
                # Point at the unknown key itself, not the mapping that holds it.
                path.append(unknown[0])
                known = ", ".join(sorted(properties))
                message = f"unknown key '{unknown[0]}' in {where}"
                hint = f"allowed keys here: {known}"
                if unknown[0] in _NESTED_KEYS:
                    hint = f"'{unknown[0]}' belongs in {_NESTED_KEYS[unknown[0]]}: check its indentation; {hint}"
        elif err.validator == "enum":
            message = f"{where}: {err.instance!r} is not one of {err.validator_value}"
        elif err.validator in ("type", "pattern", "minimum", "maximum", "minItems", "uniqueItems", "required",
                               "maxLength", "minLength", "const", "propertyNames", "exclusiveMinimum"):
            message = f"{where}: {err.message}"
        problems.append(RuleProblem(lines.file, lines.line_of(path), message, hint))
    return problems


def _normalize_methods(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.upper() for v in values)


def parse_target(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap, *, allow_cidr: bool = True,
                 what: str = "rule", broad_ok: bool = False) -> Target:
    """The host/domain/cidr of a rule, normalised, or a RuleError saying what to write instead.
    `broad_ok` (deny rules): a wildcard or domain over a public suffix is allowed, since
    denying all of `.zip` is stricter, not broader."""
    keys = [k for k in ("host", "domain", "cidr") if k in item]
    if len(keys) != 1:
        wanted = "host, domain or cidr" if allow_cidr else "host or domain"
        raise lines.error(path, f"a {what} needs exactly one of {wanted}; found {len(keys)}")
    key = keys[0]
    raw = item[key]
    kpath = (*path, key)
    if key == "cidr":
        if not allow_cidr:
            raise lines.error(kpath, f"a {what} cannot use cidr", "use host or domain")
        try:
            net = ipaddress.ip_network(raw, strict=True)
        except ValueError as e:
            try:
                fixed = ipaddress.ip_network(raw, strict=False)
            except ValueError:
                raise lines.error(kpath, f"invalid cidr {raw!r}: {e}") from None
            raise lines.error(kpath, f"cidr {raw!r} has host bits set", f"write {fixed}") from None
        if net.prefixlen == 0:
            raise lines.error(kpath, f"cidr {raw!r} covers every address", "list the networks you mean")
        if any(k in item for k in ("methods", "paths")):
            raise lines.error(kpath, "cidr rules take ports only",
                              "put method/path limits on a host rule; cidr rules cover addresses")
        return Target(TargetKind.CIDR, net.compressed, net)
    wildcard = key == "host" and raw.startswith("*.")
    name = raw[2:] if wildcard else raw
    if "*" in name:
        raise lines.error(kpath, f"{key} {raw!r}: '*' is only allowed as the whole leftmost label",
                          "write '*.example.com' (any subdomain) or use domain: example.com")
    try:
        norm = normalize_host(name)
    except HostError as e:
        raise lines.error(kpath, f"{key} {raw!r} is not a valid host name: {e}") from None
    if parse_ip(norm) is not None:
        raise lines.error(kpath, f"{key} {raw!r} is an IP address", f"use cidr: {norm}/{32 if ':' not in norm else 128}")
    if (wildcard or key == "domain") and not broad_ok:
        _check_not_over_broad(key, raw, norm, wildcard, kpath, lines)
    if wildcard:
        return Target(TargetKind.WILDCARD, norm)
    return Target(TargetKind.DOMAIN if key == "domain" else TargetKind.HOST, norm)


def _check_not_over_broad(key: str, raw: str, norm: str, wildcard: bool, kpath: tuple[str | int, ...],
                          lines: LineMap) -> None:
    """A wildcard or domain: target must stay inside one registrant's names. (An exact host
    is one name, whatever the list says of it: `host: gov.uk` is fine.)"""
    shown = f"{raw!r}" if raw in (norm, f"*.{norm}") else f"{raw!r} ({'*.' if wildcard else ''}{norm})"
    if is_public_suffix(norm):
        raise lines.error(kpath, f"{key} {shown} is over-broad: {norm!r} is a public suffix",
                          f"name a registrable domain, e.g. {'*.' if wildcard else ''}example.{norm}")
    below = public_suffixes_below(norm)
    if below is not None:
        # `*.za` (the list has co.za, not za), `*.sch.uk` (it has `*.sch.uk`), `domain: nordland.no`:
        # this covers every registrant under those suffixes, as `*.co.uk` would (red teams 30, 31)
        count, first = below
        more = f" and {count - 1} more" if count > 1 else ""
        example = f"example.<name>.{first[2:]}" if first.startswith("*.") else f"example.{first}"
        raise lines.error(kpath, f"{key} {shown} is over-broad: public suffixes lie below {norm!r} ({first}{more})",
                          f"name a registrable domain under one of them, e.g. {'*.' if wildcard else ''}{example}")


def _check_paths(paths: list[str] | None, path: tuple[str | int, ...], lines: LineMap) -> tuple[str, ...] | None:
    if paths is None:
        return None
    for i, glob in enumerate(paths):
        try:
            check_glob(glob)
        except GlobError as e:
            raise lines.error((*path, "paths", i), f"path glob {glob!r}: {e}") from None
    return tuple(paths)


def _parse_addresses(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap,
                     target: Target, policy: str | None) -> tuple[IPNetwork, ...] | None:
    """`addresses:` of a host/domain allow rule: the private networks the name may resolve to."""
    if "addresses" not in item:
        return None
    kpath = (*path, "addresses")
    if policy is None:
        raise lines.error(kpath, "deny rules take no addresses", "remove addresses: from the deny rule")
    if target.kind is TargetKind.CIDR:
        raise lines.error(kpath, "a cidr rule takes no addresses", "the cidr itself says which addresses")
    networks = []
    for i, raw in enumerate(item["addresses"]):
        try:
            net = ipaddress.ip_network(raw, strict=True)
        except ValueError as e:
            raise lines.error((*kpath, i), f"invalid network {raw!r} in addresses: {e}",
                              "write a cidr such as 10.0.0.5/32") from None
        if net.prefixlen == 0:
            raise lines.error((*kpath, i), f"addresses entry {raw!r} covers every address",
                              "list the networks the name really resolves to")
        networks.append(net)
    return tuple(networks)


def _parse_rule(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap, default_id: str,
                policy: str | None) -> Rule:
    target = parse_target(item, path, lines, broad_ok=policy is None)
    if "websocket" in item and policy is None:
        raise lines.error((*path, "websocket"), "deny rules take no websocket key",
                          "WebSocket is refused unless an allow rule says websocket: true")
    if "raw_tcp" in item and policy is None:
        raise lines.error((*path, "raw_tcp"), "deny rules take no raw_tcp key",
                          "a tunnel carries raw bytes only where an allow rule says raw_tcp: true")
    return Rule(
        id=item.get("id", default_id),
        target=target,
        ports=frozenset(item["ports"]) if "ports" in item else None,
        methods=_normalize_methods(item.get("methods")),
        paths=_check_paths(item.get("paths"), path, lines),
        policy=policy,
        origin=Origin(lines.file, lines.line_of(path)),
        addresses=_parse_addresses(item, path, lines, target, policy),
        websocket=bool(item.get("websocket", False)),
        raw_tcp=bool(item.get("raw_tcp", False)),
        accept_warnings=frozenset(item.get("accept_warnings", ())),
    )


def _check_templates(values: dict[str, str], path: tuple[str | int, ...], lines: LineMap) -> None:
    for key, template in values.items():
        stripped = SECRET_REF.sub("", template)
        if _ANY_REF.search(stripped):
            raise lines.error((*path, key), f"{key}: only ${{secret:NAME}} references are supported",
                              "NAME is an environment variable or a file in settings.secrets_dir")


def _parse_credential(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap, policy: str) -> Credential:
    target = parse_target(item, path, lines, allow_cidr=False, what="credential")
    inject = item.get("inject", {})
    inject_query = item.get("inject_query", {})
    _check_templates(inject, (*path, "inject"), lines)
    _check_templates(inject_query, (*path, "inject_query"), lines)
    if not inject and not inject_query:
        raise lines.error(path, f"credential {item['id']!r} injects nothing", "add inject: {Header: value}")
    if inject_query and not item.get("allow_secret_in_url", False):
        raise lines.error((*path, "inject_query"), "inject_query puts the secret into URLs, which origins log",
                          "prefer a header; if the API needs it, set allow_secret_in_url: true")
    for header in inject:
        if header.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise lines.error((*path, "inject", header), f"cannot inject the {header} header")
    return Credential(
        id=item["id"],
        target=target,
        ports=frozenset(item["ports"]) if "ports" in item else None,
        methods=_normalize_methods(item.get("methods")),
        paths=_check_paths(item.get("paths"), path, lines),
        inject=tuple(inject.items()),
        inject_query=tuple(inject_query.items()),
        allow_secret_in_url=bool(item.get("allow_secret_in_url", False)),
        strip=tuple(item.get("strip", ())),
        placeholder=item.get("placeholder"),
        redact_response=bool(item.get("redact_response", True)),
        policy=policy,
        origin=Origin(lines.file, lines.line_of(path)),
        accept_warnings=frozenset(item.get("accept_warnings", ())),
    )


def _parse_mcp_rule(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap, policy: str) -> McpRule:
    arguments = item.get("arguments", {})
    for tool, schema in arguments.items():
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise lines.error((*path, "arguments", tool), f"arguments schema for {tool!r} is invalid: {e.message}") from None
    return McpRule(
        server=item["server"],
        tools=frozenset(item.get("tools", ())),
        deny_tools=frozenset(item.get("deny_tools", ())),
        arguments=tuple(arguments.items()),
        resources=tuple(item["resources"]) if "resources" in item else None,
        prompts=frozenset(item["prompts"]) if "prompts" in item else None,
        log_argument_values=frozenset(item.get("log_argument_values", ())),
        policy=policy,
        origin=Origin(lines.file, lines.line_of(path)),
        accept_warnings=frozenset(item.get("accept_warnings", ())),
    )


def _parse_networks(values: list[str], path: tuple[str | int, ...], lines: LineMap) -> tuple[Any, ...]:
    out = []
    for i, raw in enumerate(values):
        try:
            out.append(ipaddress.ip_network(raw, strict=False))
        except ValueError as e:
            raise lines.error((*path, i), f"invalid source network {raw!r}: {e}") from None
    return tuple(out)


def _parse_agent(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap) -> Agent:
    tokens = tuple(bytes.fromhex(h) for h in item.get("token_sha256", ()))
    sources = _parse_networks(item.get("sources", []), (*path, "sources"), lines)
    if item["id"] == ANONYMOUS_AGENT and tokens:
        raise lines.error((*path, "token_sha256"), "the anonymous agent takes no tokens",
                          "it serves clients that send no credentials; restrict it with sources:")
    # An agent with a sandbox_profile can be identified by `warden sandbox` sessions alone.
    if item["id"] != ANONYMOUS_AGENT and not tokens and not sources and "sandbox_profile" not in item:
        raise lines.error(path, f"agent {item['id']!r} has neither token_sha256 nor sources, so nobody can be it",
                          "add token_sha256 (see `warden token`), sources, or sandbox_profile (`warden sandbox`)")
    if item["id"] == ANONYMOUS_AGENT and "sandbox_profile" in item:
        raise lines.error((*path, "sandbox_profile"), "the anonymous agent cannot be sandboxed",
                          "sandboxes identify their agent; give the sandboxed agent an id of its own")
    return Agent(item["id"], tokens, sources, tuple(item["policies"]), AgentMode(item.get("mode", "enforce")),
                 Origin(lines.file, lines.line_of(path)), item.get("sandbox_profile"))


def _check_sandbox_path(glob: str, path: tuple[str | int, ...], lines: LineMap) -> str:
    parts = glob.split("/")
    if ".." in parts or "." in parts[1:]:
        raise lines.error(path, f"sandbox path {glob!r} has '.' or '..' segments", "write the path it means")
    if glob.startswith("./") and glob.rstrip("/") == ".":
        raise lines.error(path, "'./' is the workdir itself", "the workdir is always read-write")
    if "\0" in glob or "\n" in glob:
        raise lines.error(path, f"sandbox path {glob!r} has control characters")
    return glob.rstrip("/") if len(glob) > 1 else glob


def _parse_sandbox_profile(name: str, body: dict[str, Any], path: tuple[str | int, ...],
                           lines: LineMap) -> SandboxProfile:
    env = body.get("env", {})
    for key, value in env.items():
        if key in SANDBOX_RESERVED_ENV:
            raise lines.error((*path, "env", key), f"{key} is set by `warden sandbox` itself",
                              "the bridge, CA trust and identity variables cannot be overridden")
        if _ANY_REF.search(value):
            raise lines.error((*path, "env", key), f"{key}: a sandbox profile never holds a real secret",
                              "set the credential's placeholder here; Warden injects the secret at the bound host")
    for i, key in enumerate(body.get("env_inherit", [])):
        if key in SANDBOX_RESERVED_ENV:
            raise lines.error((*path, "env_inherit", i), f"{key} is set by `warden sandbox` itself")
    read_write = tuple(_check_sandbox_path(g, (*path, "read_write", i), lines)
                       for i, g in enumerate(body.get("read_write", [])))
    own_deny = tuple(_check_sandbox_path(g, (*path, "deny", i), lines) for i, g in enumerate(body.get("deny", [])))
    defaults = DEFAULT_SANDBOX_DENY if body.get("deny_defaults", True) else ()
    limits = body.get("limits", {})
    return SandboxProfile(
        id=name,
        read_write=read_write,
        deny=tuple(dict.fromkeys(defaults + own_deny)),
        env=tuple(env.items()),
        env_inherit=tuple(body.get("env_inherit", ())),
        deny_commands=tuple(body.get("deny_commands", ())),
        limits=SandboxLimits(limits.get("memory_mb"), limits.get("max_processes"), limits.get("cpu_seconds")),
        origin=Origin(lines.file, lines.line_of(path)),
    )


def _parse_alert_sink(item: dict[str, Any], index: int, path: tuple[str | int, ...], lines: LineMap) -> AlertSink:
    headers = item.get("headers", {})
    _check_templates(headers, (*path, "headers"), lines)
    return AlertSink(
        id=item.get("id", f"sink{index}"),
        url=item["url"],
        headers=tuple(headers.items()),
        events=frozenset(item.get("events", ["deny", "secret_leak", "ssrf", "auth_failure", "reload_failed",
                                              "mcp_deny", "tool_changed", "audit_failure",
                                              "sandbox_refused"])),
        dedup_window_seconds=float(item.get("dedup_window_seconds", 300)),
        max_per_minute=int(item.get("max_per_minute", 60)),
        timeout_seconds=float(item.get("timeout_seconds", 5)),
        max_retries=int(item.get("max_retries", 3)),
        ca_file=item.get("ca_file"),
    )


def _parse_stdio_server(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap) -> McpServer:
    for key in ("credential", "legacy_sse_messages_path"):
        if key in item:
            raise lines.error((*path, key), f"{key} applies to HTTP MCP servers (url), not to stdio servers (command)")
    env = item.get("env", {})
    _check_templates(env, (*path, "env"), lines)
    stdio = StdioCommand(item["command"], tuple(item.get("args", ())), item.get("cwd"), tuple(env.items()),
                         item.get("sandbox_profile"))
    return McpServer(item["id"], "", "stdio", "", 0, "", None, None, Origin(lines.file, lines.line_of(path)), stdio)


def _parse_mcp_server(item: dict[str, Any], path: tuple[str | int, ...], lines: LineMap) -> McpServer:
    if ("url" in item) == ("command" in item):
        raise lines.error(path, f"mcp server {item['id']!r} needs exactly one of url (HTTP) and command (stdio)",
                          "url: https://host/mcp for a remote server; command: + args: for a local one")
    if "command" in item:
        return _parse_stdio_server(item, path, lines)
    for key in ("args", "cwd", "env", "sandbox_profile"):
        if key in item:
            raise lines.error((*path, key), f"{key} applies to stdio MCP servers (command), not to url servers")
    parts = urlsplit(item["url"])
    try:
        host = normalize_host(parts.hostname or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except (HostError, ValueError) as e:
        raise lines.error((*path, "url"), f"invalid MCP server url {item['url']!r}: {e}") from None
    if parts.query or parts.fragment or parts.username:
        raise lines.error((*path, "url"), "MCP server url takes scheme, host, port and path only")
    return McpServer(item["id"], item["url"], parts.scheme, host, port, parts.path.rstrip("/") or "/",
                     item.get("credential"), item.get("legacy_sse_messages_path"),
                     Origin(lines.file, lines.line_of(path)))


class _FileContent:
    """The parsed pieces of one rule file."""

    def __init__(self, lines: LineMap) -> None:
        self.lines = lines
        self.agents: list[Agent] = []
        self.policies: dict[str, Policy] = {}
        self.deny: list[Rule] = []
        self.settings: dict[str, Any] = {}
        self.mcp_servers: list[McpServer] = []
        self.mcp_pins: dict[str, dict[str, str]] = {}
        self.sandbox_profiles: dict[str, SandboxProfile] = {}


def _parse_file(doc: dict[str, Any], lines: LineMap, out: _Collector) -> _FileContent:
    content = _FileContent(lines)
    stem = Path(lines.file).stem
    for i, item in enumerate(doc.get("agents", [])):
        try:
            content.agents.append(_parse_agent(item, ("agents", i), lines))
        except RuleError as e:
            out.add(e)
    for name, body in doc.get("policies", {}).items():
        base: tuple[str | int, ...] = ("policies", name)
        allow, creds, mcp = [], [], []
        for i, item in enumerate(body.get("allow", [])):
            try:
                allow.append(_parse_rule(item, (*base, "allow", i), lines, f"{name}/allow/{i}", name))
            except RuleError as e:
                out.add(e)
        for i, item in enumerate(body.get("credentials", [])):
            try:
                creds.append(_parse_credential(item, (*base, "credentials", i), lines, name))
            except RuleError as e:
                out.add(e)
        for i, item in enumerate(body.get("mcp", [])):
            try:
                mcp.append(_parse_mcp_rule(item, (*base, "mcp", i), lines, name))
            except RuleError as e:
                out.add(e)
        content.policies[name] = Policy(name, tuple(allow), tuple(creds), tuple(body.get("strip", ())), tuple(mcp),
                                        Origin(lines.file, lines.line_of(base)))
    for i, item in enumerate(doc.get("deny", [])):
        try:
            content.deny.append(_parse_rule(item, ("deny", i), lines, f"deny/{stem}/{i}", None))
        except RuleError as e:
            out.add(e)
    for i, item in enumerate(doc.get("mcp_servers", [])):
        try:
            content.mcp_servers.append(_parse_mcp_server(item, ("mcp_servers", i), lines))
        except RuleError as e:
            out.add(e)
    for name, body in doc.get("sandbox_profiles", {}).items():
        try:
            content.sandbox_profiles[name] = _parse_sandbox_profile(name, body, ("sandbox_profiles", name), lines)
        except RuleError as e:
            out.add(e)
            # Keep the name known, so agents naming it do not get a second, misleading error.
            content.sandbox_profiles[name] = SandboxProfile(name, origin=Origin(lines.file, e.problem.line))
    content.settings = doc.get("settings", {})
    content.mcp_pins = doc.get("mcp_pins", {})
    return content


def _build_settings(raw: dict[str, Any], lines_of: dict[str, LineMap], out: _Collector) -> Settings:
    alerts = []
    for i, sink in enumerate(raw.get("alerts", [])):
        try:
            alerts.append(_parse_alert_sink(sink, i, ("settings", "alerts", i), lines_of["alerts"]))
        except RuleError as e:
            out.add(e)
    audit = raw.get("audit", {})
    return Settings(
        private_networks=raw.get("private_networks", "deny"),
        hosts_file=raw.get("hosts_file"),
        tls_intercept=raw.get("tls_intercept", "auto"),
        secrets_dir=raw.get("secrets_dir"),
        resolve_timeout_seconds=float(raw.get("resolve_timeout_seconds", 5.0)),
        body_scan_max_buffered_bytes=int(raw.get("body_scan", {}).get("max_buffered_bytes", 1024 * 1024)),
        max_mcp_body_bytes=int(raw.get("body_scan", {}).get("max_mcp_body_bytes", 8 * 1024 * 1024)),
        max_buffered_bytes_per_agent=int(raw.get("body_scan", {}).get("max_buffered_bytes_per_agent",
                                                                      64 * 1024 * 1024)),
        decoded_bytes_per_second_per_agent=int(raw.get("body_scan", {}).get("decoded_bytes_per_second_per_agent",
                                                                            8 * 1024 * 1024)),
        max_connections_per_agent=int(raw.get("limits", {}).get("max_connections_per_agent", 1024)),
        explain_denials=raw.get("explain_denials", "in_band"),
        audit=AuditSettings(
            on_failure=audit.get("on_failure", "fail_closed"),
            max_file_bytes=int(audit.get("max_file_bytes", 100 * 1024 * 1024)),
            queue_size=int(audit.get("queue_size", 65536)),
            stdout=bool(audit.get("stdout", False)),
            signing_key=audit.get("signing_key"),
            checkpoint_records=int(audit.get("checkpoint_records", 1000)),
            checkpoint_seconds=float(audit.get("checkpoint_seconds", 5.0)),
            keep_query_values=frozenset(audit.get("keep_query_values", ())),
        ),
        alerts=tuple(alerts),
        mcp_unpinned=raw.get("mcp_unpinned", "learn"),
        mcp_pin_store=raw.get("mcp_pin_store"),
    )


def _check_unique(items: Iterable[tuple[str, Origin]], what: str, out: _Collector) -> None:
    seen: dict[str, Origin] = {}
    for key, origin in items:
        if key in seen:
            out.add(RuleError(origin.file, origin.line, f"duplicate {what} {key!r} (first defined at {seen[key]})",
                              f"{what}s must be unique across all rule files"))
        else:
            seen[key] = origin


def _cross_checks(files: list[_FileContent], model_parts: dict[str, Any], out: _Collector) -> None:
    agents: list[Agent] = model_parts["agents"]
    policies: dict[str, Policy] = model_parts["policies"]
    servers: dict[str, McpServer] = {s.id: s for s in model_parts["mcp_servers"]}
    _check_unique(((a.id, a.origin) for a in agents), "agent id", out)
    _check_unique(((s.id, s.origin) for s in model_parts["mcp_servers"]), "mcp server id", out)
    rule_ids = [(r.id, r.origin) for p in policies.values() for r in p.allow]
    rule_ids += [(r.id, r.origin) for r in model_parts["deny"]]
    _check_unique(rule_ids, "rule id", out)
    credentials = [(c.id, c.origin) for p in policies.values() for c in p.credentials]
    _check_unique(credentials, "credential id", out)
    credential_ids = {c for c, _ in credentials}
    for agent in agents:
        for name in agent.policies:
            if name not in policies:
                known = ", ".join(sorted(policies)) or "none defined"
                out.add(RuleError(agent.origin.file, agent.origin.line,
                                  f"agent {agent.id!r} uses unknown policy {name!r}", f"known policies: {known}"))
    source_only = [a for a in agents if not a.token_sha256 and a.sources]
    for i, a in enumerate(source_only):
        for b in source_only[i + 1 :]:
            if any(x.version == y.version and x.overlaps(y) for x in a.sources for y in b.sources):
                out.add(RuleError(b.origin.file, b.origin.line,
                                  f"agents {a.id!r} and {b.id!r} are identified by overlapping source networks",
                                  "give one of them token_sha256, or make the networks disjoint"))
    for policy in policies.values():
        for rule in policy.mcp:
            if rule.server not in servers:
                out.add(RuleError(rule.origin.file, rule.origin.line, f"mcp rule names unknown server {rule.server!r}",
                                  f"declare it under mcp_servers: ({', '.join(sorted(servers)) or 'none declared'})"))
    for server in servers.values():
        if server.credential and server.credential not in credential_ids:
            out.add(RuleError(server.origin.file, server.origin.line,
                              f"mcp server {server.id!r} names unknown credential {server.credential!r}"))
    profiles: dict[str, SandboxProfile] = model_parts["sandbox_profiles"]
    for agent in agents:
        if agent.sandbox_profile is not None and agent.sandbox_profile not in profiles:
            known = ", ".join(sorted(profiles))
            out.add(RuleError(agent.origin.file, agent.origin.line,
                              f"agent {agent.id!r} uses unknown sandbox profile {agent.sandbox_profile!r}",
                              f"known sandbox profiles: {known}"))


def _check_kept_query_values(settings: Settings, parts: dict[str, Any], out: _Collector) -> None:
    """A query value the audit keeps must never be one Warden injects: that is a secret."""
    kept = settings.audit.keep_query_values
    if not kept:
        return
    for policy in parts["policies"].values():
        for cred in policy.credentials:
            for name in sorted(kept & {n for n, _ in cred.inject_query}):
                out.add(parts["settings_lines"]["audit"].error(
                    ("settings", "audit", "keep_query_values"),
                    f"keep_query_values lists {name!r}, which credential {cred.id!r} injects: its secret would be "
                    "written to the audit", f"remove {name!r} from settings.audit.keep_query_values"))


def _merge(files: list[_FileContent], out: _Collector) -> dict[str, Any]:
    agents: list[Agent] = []
    policies: dict[str, Policy] = {}
    deny: list[Rule] = []
    settings: dict[str, Any] = {}
    settings_lines: dict[str, LineMap] = {}
    servers: list[McpServer] = []
    pins: dict[str, dict[str, str]] = {}
    profiles: dict[str, SandboxProfile] = {}
    for content in files:
        for name, profile in content.sandbox_profiles.items():
            if name in profiles:
                first = profiles[name].origin
                out.add(content.lines.error(("sandbox_profiles", name),
                                            f"duplicate sandbox profile {name!r} (first at {first})",
                                            "a sandbox profile is defined in one file"))
            else:
                profiles[name] = profile
        agents += content.agents
        deny += content.deny
        servers += content.mcp_servers
        for name, policy in content.policies.items():
            if name in policies:
                first = policies[name].origin
                out.add(RuleError(policy.origin.file, policy.origin.line, f"duplicate policy {name!r} (first at {first})",
                                  "a policy is defined in one file; split it into two named policies instead"))
            else:
                policies[name] = policy
        for key, value in content.settings.items():
            if key in settings:
                out.add(content.lines.error(("settings", key), f"setting {key!r} is also set in {settings_lines[key].file}",
                                            "each setting is set in one file"))
            else:
                settings[key] = value
                settings_lines[key] = content.lines
        for server, tools in content.mcp_pins.items():
            pins.setdefault(server, {}).update(tools)
    return {"agents": agents, "policies": policies, "deny": deny, "settings": settings,
            "settings_lines": settings_lines, "mcp_servers": servers, "mcp_pins": pins,
            # The built-in default profile unless the rule files define their own.
            "sandbox_profiles": {DEFAULT_SANDBOX_PROFILE: SandboxProfile(DEFAULT_SANDBOX_PROFILE)} | profiles}


def content_version(paths: list[Path], base: Path) -> str:
    """Content hash of the rule files: the policy version every decision carries."""
    digest = hashlib.sha256()
    for p in paths:
        rel = str(p.relative_to(base)) if base.is_dir() else p.name
        data = p.read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:12]


def load_model(rules_dir: Path) -> RuleModel:
    """Read, validate and merge every rule file under `rules_dir`. Raises RuleSetError."""
    out = _Collector()
    if not rules_dir.exists():
        raise RuleSetError([RuleProblem(str(rules_dir), 0, "rules directory does not exist")])
    paths = rule_files(rules_dir)
    if not paths:
        raise RuleSetError([RuleProblem(str(rules_dir), 0, "no rule files (*.yaml, *.yml) found")])
    files: list[_FileContent] = []
    for path in paths:
        try:
            doc, lines = load_yaml(path)
        except RuleError as e:
            out.add(e)
            continue
        for problem in lines.problems:  # duplicate keys: reported alongside everything else
            out.add(problem)
        problems = _schema_problems(doc, lines)
        if problems:
            out.problems += problems
            continue
        files.append(_parse_file(doc or {}, lines, out))
    parts = _merge(files, out)
    _cross_checks(files, parts, out)
    settings = _build_settings(parts["settings"], {"alerts": LineMap("settings")} | parts["settings_lines"], out)
    _check_kept_query_values(settings, parts, out)
    if out.problems:
        raise RuleSetError(out.problems)
    return RuleModel(
        agents=tuple(parts["agents"]),
        policies=parts["policies"],
        deny=tuple(parts["deny"]),
        settings=settings,
        mcp_servers=tuple(parts["mcp_servers"]),
        mcp_pins=parts["mcp_pins"],
        files=tuple(str(p) for p in paths),
        version=content_version(paths, rules_dir),
        rules_dir=str(rules_dir),
        sandbox_profiles=parts["sandbox_profiles"],
    )
