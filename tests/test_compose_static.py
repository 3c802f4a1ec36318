"""Static checks of compose/ and deploy/kubernetes/ (no Docker engine or cluster needed).

What a typo here would cost: an agent container with a second network (egress
bypass), a dashboard panel silently empty because a metric name drifted, a
secret committed inline. Each test below pins one of those.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from egresswarden.record import metric_names

from .harness import WARDEN, sha256_hex, start_warden

# Metric families Warden exports (counters with their exposed `_total` name): the product's own
# list, which test_exported_metric_names_match_the_metrics_page checks against a running warden.
WARDEN_METRICS: frozenset[str] = metric_names.EXPORTED
WARDEN_HISTOGRAMS: frozenset[str] = frozenset({metric_names.DECISION_DURATION, metric_names.UPSTREAM_DURATION})
# Series names a query may use: histograms are only queryable through these suffixes.
QUERYABLE: frozenset[str] = frozenset(
    {m for m in WARDEN_METRICS if m not in WARDEN_HISTOGRAMS}
    | {f"{h}{s}" for h in WARDEN_HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
)
PROMETHEUS_BUILTIN: frozenset[str] = frozenset({"up"})  # written by Prometheus itself, fine in alerts

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = REPO / "deploy" / "kubernetes"
PROXY_PORT = 8080  # Warden defaults
METRICS_PORT = 9464
PROMTOOL_REASON = "promtool not installed (Debian package: prometheus; `apt-get install -y prometheus`)"

WARDEN_COMMAND = [
    "warden", "run", "--rules", "/rules",
    "--listen", f"0.0.0.0:{PROXY_PORT}", "--metrics-listen", f"172.31.94.10:{METRICS_PORT}",
    "--audit-log", "/var/log/warden/audit.jsonl", "--confdir", "/certs",
]  # fmt: skip
CA_TRUST_VARS = (
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
)

# Shapes of real credentials; none may appear literally in deploy files.
SECRET_PATTERNS = [
    re.compile(p)
    for p in (
        r"gh[pousr]_[A-Za-z0-9]{20,}",
        r"github_pat_[A-Za-z0-9_]{20,}",
        r"sk-[A-Za-z0-9_-]{20,}",
        r"AKIA[0-9A-Z]{16}",
        r"xox[abposr]-[A-Za-z0-9-]{10,}",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.",  # JWT
    )
]
SECRETISH_KEY = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE|CREDENTIAL)", re.I)


# ---------------------------------------------------------------- helpers


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())  # SafeLoader resolves the `<<: *anchor` merges
    assert isinstance(data, dict)
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def service_networks(service: dict[str, Any]) -> list[str]:
    nets = service.get("networks") or []
    return list(nets.keys()) if isinstance(nets, dict) else list(nets)


def named_volumes(service: dict[str, Any]) -> list[str]:
    """Named volumes a service mounts (bind mounts start with . / or ~)."""
    out = []
    for v in service.get("volumes") or []:
        src = v.get("source", "") if isinstance(v, dict) else str(v).split(":", 1)[0]
        if isinstance(v, dict) and v.get("type") not in (None, "volume"):
            continue
        if src and not src.startswith((".", "/", "~", "$")):
            out.append(src)
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for short-syntax volumes."""
    out = {}
    for v in service.get("volumes") or []:
        parts = str(v).split(":")
        out[parts[1]] = parts[0]
    return out


def strip_interpolation(value: str) -> str:
    """Remove ${VAR}, ${VAR:-default} and ${VAR:?msg} (values come from .env, not the file)."""
    return re.sub(r"\$\{[^}]*\}", "", value)


PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (good enough for our queries).

    Handles `{__name__=~"a|b"}` selectors, strips strings, label matchers, ranges,
    grouping clauses, Grafana variables and function calls.
    """
    names: set[str] = set()
    for m in re.finditer(r'__name__\s*=~?\s*"([^"]*)"', expr):
        names.update(part for part in m.group(1).split("|") if part)
    s = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers (incl. __name__, done above)
    s = re.sub(r'"[^"]*"', " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors / subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\w+", " ", s)  # Grafana variables
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in PROMQL_KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", ident):
            continue
        names.add(ident)
    return names


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL string in a Grafana dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and (k == "expr" or (k == "query" and "(" in v)):
                yield v
            elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                yield v["query"]
            else:
                yield from dashboard_queries(v)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def grafana_to_promql(q: str) -> str:
    """Make a dashboard query plain PromQL so promtool can parse it."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
    if m:  # Grafana templating function, not PromQL: check the selector inside
        q = m.group(1)
    return (
        q.replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$__interval", "1m")
        .replace("$agent", ".*")
    )


def warden_run_help() -> str:
    r = subprocess.run([WARDEN, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for f in sorted(K8S_DIR.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                d["__file__"] = f.name
                docs.append(d)
    return docs


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- compose: structure


def test_compose_references_are_defined() -> None:
    c = load_compose()
    services, networks = c["services"], c.get("networks") or {}
    volumes, secrets = c.get("volumes") or {}, c.get("secrets") or {}
    assert {"warden", "agent", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for n in service_networks(svc):
            assert n in networks, f"{name}: network {n!r} not defined"
        for v in named_volumes(svc):
            assert v in volumes, f"{name}: volume {v!r} not defined"
        for s in svc.get("secrets") or []:
            s_name = s["source"] if isinstance(s, dict) else s
            assert s_name in secrets, f"{name}: secret {s_name!r} not defined"
        deps = svc.get("depends_on") or []
        for d in deps.keys() if isinstance(deps, dict) else deps:
            assert d in services, f"{name}: depends_on {d!r} is not a service"
    for s_name, s in secrets.items():
        assert "file" in s, f"secret {s_name} must come from a file (not an inline value)"
        assert "environment" not in s
    # Nothing defined but unused (stale definitions hide mistakes).
    used_vols = {v for svc in services.values() for v in named_volumes(svc)}
    assert used_vols == set(volumes)
    used_nets = {n for svc in services.values() for n in service_networks(svc)}
    assert used_nets == set(networks)


def test_agent_is_only_on_an_internal_network_shared_only_with_warden() -> None:
    c = load_compose()
    agent = c["services"]["agent"]
    nets = service_networks(agent)
    assert len(nets) == 1, f"agent must be on exactly one network, is on {nets}"
    (net,) = nets
    assert c["networks"][net].get("internal") is True, f"network {net} must be internal: true"
    members = {name for name, svc in c["services"].items() if net in service_networks(svc)}
    assert members == {"agent", "warden"}, f"agent's network neighbours must be only warden, are {members}"
    # Other ways around the network: host networking, published ports, extra hosts.
    assert "network_mode" not in agent
    assert "ports" not in agent
    assert "extra_hosts" not in agent
    assert not agent.get("privileged"), "a privileged agent could change its own routing"
    assert "NET_ADMIN" not in (agent.get("cap_add") or [])
    # Warden is the only bridge: it also sits on a non-internal network to reach the internet.
    egress_nets = [
        n for n in service_networks(c["services"]["warden"]) if not c["networks"][n].get("internal")
    ]
    assert egress_nets, "warden needs a non-internal network for upstream traffic"


def test_warden_service_command_ports_and_healthcheck() -> None:
    c = load_compose()
    w = c["services"]["warden"]
    assert w["command"] == WARDEN_COMMAND
    assert {str(p) for p in w.get("expose", [])} == {str(PROXY_PORT), str(METRICS_PORT)}
    hc = w["healthcheck"]["test"]
    assert hc[0] == "CMD" and hc[1] == "python", "slim image: no curl, use the interpreter"
    assert f"http://172.31.94.10:{METRICS_PORT}/readyz" in " ".join(hc) and "urllib" in " ".join(hc)
    # metrics only on the monitoring network: the address bound is Warden's address there
    assert w["networks"]["monitoring"]["ipv4_address"] == "172.31.94.10"
    subnet = c["networks"]["monitoring"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address("172.31.94.10") in ipaddress.ip_network(subnet)
    assert "agent" not in {s for s, svc in c["services"].items() if "monitoring" in service_networks(svc)}
    m = mounts(w)
    assert (
        m["/rules"] == "../rules"
        and str(w["volumes"][0]).endswith(":ro")
        or "../rules:/rules:ro" in w["volumes"]
    )
    assert m["/certs"] in c["volumes"] and m["/var/log/warden"] in c["volumes"], (
        "CA and audit on named volumes"
    )
    # Only secrets the rules use are required (a listed secret file that is missing stops `up`).
    rules_text = "".join(p.read_text() for p in (REPO / "rules").glob("*.yaml"))
    for name in w.get("secrets") or []:
        assert f"${{secret:{name}}}" in rules_text, f"warden requires secret {name!r} the rules never use"
    # Prometheus scrapes the metrics port Warden listens on.
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "warden"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"warden:{METRICS_PORT}"]
    # Healthy warden gates the agent; CA init gates warden.
    assert c["services"]["agent"]["depends_on"]["warden"]["condition"] == "service_healthy"
    assert w["depends_on"]["ca-init"]["condition"] == "service_completed_successfully"


def test_warden_command_flags_exist_in_cli() -> None:
    help_text = warden_run_help()
    for flag in (a for a in WARDEN_COMMAND if a.startswith("--")):
        assert flag in help_text, f"`warden run --help` does not mention {flag}"


def test_agent_proxy_and_ca_trust_environment() -> None:
    c = load_compose()
    env = env_of(c["services"]["agent"])
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        url = env[var]
        m = re.fullmatch(r"http://(\$\{[^}]+\}):(\$\{[^}]+\})@warden:(\d+)", url)
        assert m, f"{var}={url!r}: expected http://${{ID}}:${{TOKEN}}@warden:{PROXY_PORT}"
        assert int(m.group(3)) == PROXY_PORT
        assert "TOKEN" in m.group(2) and ":?" in m.group(2), "token must be required from .env, not defaulted"
    assert "NO_PROXY" in env
    assert "warden" not in env["NO_PROXY"]
    bundle_paths = {env[v] for v in CA_TRUST_VARS}
    assert len(bundle_paths) == 1, f"all trust variables must point at one bundle: {bundle_paths}"
    (bundle,) = bundle_paths
    # The bundle path lives on the shared volume that ca-init writes with `warden ca bundle`.
    agent_mounts = mounts(c["services"]["agent"])
    mount_dir = str(Path(bundle).parent)
    vol = agent_mounts[mount_dir]
    assert vol in c["volumes"]
    assert [v for v in c["services"]["agent"]["volumes"] if v.startswith(f"{vol}:")][0].endswith(":ro")
    init = c["services"]["ca-init"]
    init_target = {s: t for t, s in mounts(init).items()}[vol]
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert f"warden ca bundle --confdir /certs --out {init_target}/{Path(bundle).name}" in script
    assert "warden ca init --confdir /certs --exist-ok" in script
    assert mounts(init)["/certs"] == mounts(c["services"]["warden"])["/certs"], (
        "ca-init and warden share the CA"
    )


def test_no_inline_secret_values() -> None:
    c = load_compose()
    for name, svc in c["services"].items():
        for key, value in env_of(svc).items():
            literal = strip_interpolation(value)
            for pat in SECRET_PATTERNS:
                assert not pat.search(literal), f"{name}.{key} contains a literal credential"
            if SECRETISH_KEY.search(key) and not key.endswith("__FILE") and key != "GF_SECURITY_ADMIN_USER":
                assert literal == "", f"{name}.{key} must come from .env or a secret file, not inline"
            # userinfo in a URL: the password part must be interpolated
            for m in re.finditer(r"://[^/@\s]*:([^@/\s]+)@", value):
                assert strip_interpolation(m.group(1)) == "", f"{name}.{key}: inline password in URL"
            # long random-looking literals (>= 24 chars of mixed letters/digits)
            for tok in re.findall(r"[A-Za-z0-9_+/=-]{24,}", literal):
                assert not (re.search(r"\d", tok) and re.search(r"[A-Za-z]", tok)), (
                    f"{name}.{key}: {tok!r} looks like a secret"
                )
    # The example .env ships no value; the real .env and secret files are git-ignored.
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE_DIR / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert example["WARDEN_AGENT_TOKEN"] == ""
    ignore = (COMPOSE_DIR / ".gitignore").read_text().split()
    assert ".env" in ignore and "secrets/*" in ignore
    for s in c["secrets"].values():
        assert s["file"].startswith("./secrets/")
    # And no credential-shaped text anywhere in the deploy files.
    for f in [*COMPOSE_DIR.rglob("*"), *K8S_DIR.rglob("*")]:
        if f.is_file() and f.suffix in {".yml", ".yaml", ".json", ".md", ".example", ""}:
            text = f.read_text(errors="replace")
            for pat in SECRET_PATTERNS:
                assert not pat.search(text), f"{f.relative_to(REPO)} matches {pat.pattern}"


def test_dockerfile_base_and_install() -> None:
    c = load_compose()
    for svc in ("warden", "ca-init"):
        build = c["services"][svc]["build"]
        assert build == {"context": "..", "dockerfile": "compose/Dockerfile"}, svc
    lines = [
        ln.strip()
        for ln in (COMPOSE_DIR / "Dockerfile").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert froms == ["FROM python:3.12-slim"]
    assert "COPY pyproject.toml README.md /src/" in lines and "COPY addons /src/addons" in lines
    assert any(ln.startswith("RUN pip install /src") for ln in lines)
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0"), "run as non-root"
    assert any(ln.startswith("EXPOSE") and str(PROXY_PORT) in ln and str(METRICS_PORT) in ln for ln in lines)
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    for must in (".venv", ".git", "certs/*", "compose/.env", "compose/secrets"):
        assert must in ignore, f"build context must exclude {must}"


def test_secrets_dir_documented_for_rules() -> None:
    """Compose mounts secrets at /run/secrets; the rules must point settings.secrets_dir there."""
    text = COMPOSE_FILE.read_text()
    assert "settings.secrets_dir: /run/secrets" in text


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_docker_compose_config_validates(tmp_path: Path) -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed (Debian: docker-compose-plugin from Docker's repo)")
    r = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "WARDEN_AGENT_TOKEN": "placeholder"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- prometheus / grafana


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((COMPOSE_DIR / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alerts_cover_required_conditions_with_known_metrics() -> None:
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    required = {
        "WardenDenySpike": {"warden_requests_total", "warden_connects_total"},
        "WardenSecretLeak": {"warden_secret_leaks_total"},
        "WardenReloadFailing": {"warden_reloads_total"},
        "WardenAuditWriteFailing": {"warden_audit_write_failures_total"},
        "WardenAlertSinkFailing": {"warden_alerts_failed_total"},
        "WardenDown": {"up"},
    }
    for alert, metrics in required.items():
        assert alert in rules, f"missing alert {alert}"
        assert metrics <= promql_metric_names(rules[alert]), (alert, promql_metric_names(rules[alert]))
    for alert, expr in rules.items():
        unknown = promql_metric_names(expr) - QUERYABLE - PROMETHEUS_BUILTIN
        assert not unknown, f"{alert} uses metrics Warden does not export: {unknown}"
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    for rf in prom["rule_files"]:
        assert (COMPOSE_DIR / "prometheus" / Path(rf).name).is_file()
    assert mounts(load_compose()["services"]["prometheus"])["/etc/prometheus"] == "./prometheus"


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip(PROMTOOL_REASON)
    return exe


def test_promtool_check_rules() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(COMPOSE_DIR / "prometheus" / "alerts.yml")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_alert_unit_tests() -> None:
    """alerts_test.yml feeds synthetic series and asserts each alert fires (and not before)."""
    r = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=COMPOSE_DIR / "prometheus",
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config() -> None:
    r = subprocess.run([promtool(), "check", "config", "--syntax-only", "prometheus.yml"], cwd=COMPOSE_DIR / "prometheus",
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def load_dashboard() -> dict[str, Any]:
    return json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "warden.json").read_text())


def test_dashboard_queries_use_only_warden_metrics() -> None:
    d = load_dashboard()
    queries = list(dashboard_queries(d))
    assert len(queries) >= 10
    used: set[str] = set()
    for q in queries:
        names = promql_metric_names(grafana_to_promql(q))
        assert names, f"query names no metric: {q}"
        unknown = names - QUERYABLE
        assert not unknown, f"dashboard query uses unknown metric(s) {unknown}: {q}"
        used |= names
    # Every panel has at least one query; panel ids are unique.
    panels = [p for p in d["panels"] if p["type"] != "row"]
    for p in panels:
        assert p.get("targets") and all(t.get("expr") for t in p["targets"]), p["title"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    # The panels the issue asks for.
    for needed in (
        "warden_requests_total",  # by decision and agent, top deny reasons
        "warden_connects_total",
        "warden_decision_duration_seconds_bucket",
        "warden_upstream_duration_seconds_bucket",
        "warden_reloads_total",
        "warden_active_tunnels",
        "warden_audit_queue_depth",
    ):
        assert needed in used, f"no panel shows {needed}"
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("decision", "agent", "deny reasons", "latency", "reload", "tunnels", "audit queue"):
        assert word in titles, f"no panel titled with {word!r}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule) after Grafana macros are substituted."""
    exe = promtool()
    rules = [
        {"record": f"dash:q{i}", "expr": grafana_to_promql(q)}
        for i, q in enumerate(dashboard_queries(load_dashboard()))
    ]
    f = tmp_path / "dash_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([exe, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_matches_compose() -> None:
    c = load_compose()
    g = mounts(c["services"]["grafana"])
    assert g["/etc/grafana/provisioning"] == "./grafana/provisioning"
    prov_dir = COMPOSE_DIR / "grafana" / "provisioning"
    ds = yaml.safe_load((prov_dir / "datasources" / "prometheus.yml").read_text())["datasources"]
    (prom_ds,) = [x for x in ds if x["type"] == "prometheus"]
    assert prom_ds["url"] == "http://prometheus:9090"
    dash_prov = yaml.safe_load((prov_dir / "dashboards" / "warden.yml").read_text())["providers"][0]
    dash_path = dash_prov["options"]["path"]
    assert g[dash_path] == "./grafana/dashboards", "provider path must be where compose mounts the dashboards"
    # Panels point at the provisioned datasource uid.
    uids = {t["datasource"]["uid"] for p in load_dashboard()["panels"] for t in p.get("targets", [])}
    assert uids == {prom_ds["uid"]}
    assert "grafana_admin_password" in (c["services"]["grafana"].get("secrets") or [])
    assert (
        c["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
        == "/run/secrets/grafana_admin_password"
    )


def test_exported_metric_names_match_the_metrics_page(tmp_path: Path) -> None:
    """The dashboard and alert checks above trust metric_names.EXPORTED: it must be what a
    running warden serves (every family is listed from startup, before any sample)."""
    import urllib.request

    w = start_warden(tmp_path, {"agents": [{"id": "a", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
                                "policies": {"p": {"allow": [{"host": "allowed.test"}]}}})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=10) as r:
            page = r.read().decode()
    finally:
        w.stop()
    # prometheus_client adds a `<name>_created` gauge beside unlabelled counters and histograms.
    families = {m.group(1) for m in re.finditer(r"^# TYPE (warden_\S+) ", page, re.M)
                if not m.group(1).endswith("_created")}
    assert families == WARDEN_METRICS
    assert WARDEN_HISTOGRAMS <= WARDEN_METRICS


# ---------------------------------------------------------------- kubernetes


def test_k8s_manifests_parse_and_are_namespaced() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d["metadata"].get("name"), d["__file__"]
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "warden", f"{d['kind']}/{d['metadata']['name']}"


def warden_container() -> dict[str, Any]:
    dep = k8s_one("Deployment", "warden")
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "warden"]
    return c


def test_k8s_deployment() -> None:
    dep = k8s_one("Deployment", "warden")
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert selector_matches(spec["selector"]["matchLabels"], labels)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    c = warden_container()
    cmd = c["command"]
    assert cmd[:2] == ["warden", "run"]
    args = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert (
        args["--listen"] == f"0.0.0.0:{PROXY_PORT}" and args["--metrics-listen"] == f"0.0.0.0:{METRICS_PORT}"
        # (a pod has one network; NetworkPolicy warden-ingress keeps agents off the metrics port)
    )
    assert args["--audit-log"] == "-", "audit to stdout for the node log collector"
    assert {p["containerPort"] for p in c["ports"]} == {PROXY_PORT, METRICS_PORT}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        assert c[probe]["httpGet"]["path"] == path
        port = c[probe]["httpGet"]["port"]
        assert port in (METRICS_PORT, "metrics")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Volumes reference objects that exist (or are created by the README's CA steps).
    mounts_by_name = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts_by_name[next(n for n, v in vols.items() if "configMap" in v)] == args["--rules"]
    assert k8s_one("ConfigMap", vols["rules"]["configMap"]["name"])
    assert mounts_by_name["credentials"] == "/run/secrets"
    assert k8s_one("Secret", vols["credentials"]["secret"]["secretName"])
    assert mounts_by_name["ca"] == args["--confdir"]
    ca_secret = vols["ca"]["secret"]["secretName"]
    readme = (K8S_DIR / "README.md").read_text()
    assert f"create secret generic {ca_secret}" in readme, (
        "the CA secret is created from `warden ca init` output"
    )
    assert "mitmproxy-ca.pem" in readme and "mitmproxy-dhparam.pem" in readme  # read-only confdir needs both
    pdb = k8s_one("PodDisruptionBudget", "warden")
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], labels)


def test_k8s_deployment_flags_exist_in_cli() -> None:
    help_text = warden_run_help()
    for flag in (a for a in warden_container()["command"] if a.startswith("--")):
        assert flag in help_text, f"`warden run --help` does not mention {flag}"


def test_k8s_service() -> None:
    svc = k8s_one("Service", "warden")
    labels = k8s_one("Deployment", "warden")["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(svc["spec"]["selector"], labels)
    assert {p["port"] for p in svc["spec"]["ports"]} == {PROXY_PORT, METRICS_PORT}


def test_k8s_secrets_are_placeholders_only() -> None:
    for d in k8s_docs():
        if d["kind"] != "Secret":
            continue
        assert "data" not in d, "base64 `data:` could hide a real value; use stringData placeholders"
        for k, v in (d.get("stringData") or {}).items():
            assert str(v).startswith("REPLACE"), f"Secret {d['metadata']['name']}.{k} must be a placeholder"


RULES_SCHEMA = REPO / "addons" / "egresswarden" / "core" / "rules.schema.json"


def test_k8s_rules_configmap_points_at_mounted_secrets() -> None:
    cm = k8s_one("ConfigMap", "warden-rules")
    mount = {m["name"]: m["mountPath"] for m in warden_container()["volumeMounts"]}["credentials"]
    for name, text in cm["data"].items():
        rules = yaml.safe_load(text)
        assert rules["settings"]["secrets_dir"] == mount, name
        # Placeholder hashes must have no known preimage (all zeros), never the hash of "REPLACE_ME".
        for agent in rules.get("agents", []):
            for h in agent.get("token_sha256", []):
                assert set(h) == {"0"}, f"{name}: {agent['id']} token_sha256 must be the all-zero placeholder"
    # Secrets the rules reference exist as keys of the mounted Secret.
    refs = set(re.findall(r"\$\{secret:([A-Za-z0-9_.-]+)\}", "".join(cm["data"].values())))
    keys = set(k8s_one("Secret", "warden-credentials")["stringData"])
    assert refs and refs <= keys, f"rules reference secrets {refs - keys} missing from warden-credentials"


def test_k8s_rules_configmap_matches_rules_schema() -> None:
    import jsonschema

    schema = json.loads(RULES_SCHEMA.read_text())
    for text in k8s_one("ConfigMap", "warden-rules")["data"].values():
        jsonschema.validate(yaml.safe_load(text), schema)


def network_policies() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "NetworkPolicy"}


def test_k8s_network_policy_agents_reach_only_warden() -> None:
    pols = network_policies()
    deny = [
        p
        for p in pols.values()
        if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert deny and all(not p["spec"].get("ingress") and not p["spec"].get("egress") for p in deny), (
        "default deny"
    )
    warden_labels = k8s_one("Deployment", "warden")["spec"]["template"]["metadata"]["labels"]
    agent_labels = k8s_one("Deployment", "example-agent")["spec"]["template"]["metadata"]["labels"]
    assert not selector_matches(
        k8s_one("Deployment", "warden")["spec"]["selector"]["matchLabels"], agent_labels
    )
    # Every policy selecting agent pods: egress allowed only to Warden pods on the proxy port.
    agent_pols = [
        p
        for p in pols.values()
        if p["spec"]["podSelector"]
        and selector_matches(p["spec"]["podSelector"]["matchLabels"], agent_labels)
    ]
    assert agent_pols
    for p in agent_pols:
        assert "Ingress" not in p["spec"]["policyTypes"] or not p["spec"].get("ingress")
        for rule in p["spec"].get("egress", []):
            assert rule.get("to"), "an egress rule without `to` allows every destination"
            for peer in rule["to"]:
                assert set(peer) == {"podSelector"}, (
                    f"agents may only reach pods (no ipBlock/namespace): {peer}"
                )
                assert selector_matches(peer["podSelector"]["matchLabels"], warden_labels)
            assert rule.get("ports") == [{"protocol": "TCP", "port": PROXY_PORT}]
    # The example agent gets the proxy through service env vars (no DNS needed) and the CA bundle.
    (agent_c,) = k8s_one("Deployment", "example-agent")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in agent_c["env"]}
    assert (
        env["HTTPS_PROXY"]["value"]
        == f"http://example-agent:$(WARDEN_AGENT_TOKEN)@$(WARDEN_SERVICE_HOST):{PROXY_PORT}"
    )
    assert "secretKeyRef" in env["WARDEN_AGENT_TOKEN"]["valueFrom"]
    names = [e["name"] for e in agent_c["env"]]
    assert names.index("WARDEN_AGENT_TOKEN") < names.index("HTTPS_PROXY"), (
        "$(VAR) only expands earlier entries"
    )
    for var in CA_TRUST_VARS:
        assert env[var]["value"] == "/etc/warden-ca/ca-bundle.pem"
    pod = k8s_one("Deployment", "example-agent")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("enableServiceLinks", True) is True


def test_k8s_network_policy_warden_egress_excludes_cluster_internals() -> None:
    warden_labels = k8s_one("Deployment", "warden")["spec"]["template"]["metadata"]["labels"]
    pols = [
        p
        for p in network_policies().values()
        if p["spec"]["podSelector"]
        and selector_matches(p["spec"]["podSelector"]["matchLabels"], warden_labels)
    ]
    egress = [r for p in pols if "Egress" in p["spec"]["policyTypes"] for r in p["spec"].get("egress", [])]
    blocks = [peer["ipBlock"] for r in egress for peer in r.get("to", []) if "ipBlock" in peer]
    v4 = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    assert v4, "warden may reach the internet"
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"):
        assert all(cidr in b.get("except", []) for b in v4), f"{cidr} (cluster/metadata) must be excluded"
    for r in egress:
        assert r.get("to"), "an egress rule without `to` would allow cluster internals"
    ingress = [r for p in pols if "Ingress" in p["spec"]["policyTypes"] for r in p["spec"].get("ingress", [])]
    ports = {pp["port"] for r in ingress for pp in r["ports"]}
    assert ports == {PROXY_PORT, METRICS_PORT}


def test_k8s_readme_documents_rollout_and_audit_shipping() -> None:
    text = (K8S_DIR / "README.md").read_text()
    for phrase in ("2 s", "without a restart", "subPath", "--audit-log -", "sidecar", "log collector"):
        assert phrase.lower() in text.lower(), phrase
