"""Sandbox profiles in the rule files (file:line errors, defaults) and the pure parts of the
launcher: path patterns, the bubblewrap mount plan, the environment inside."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from egresswarden.core.errors import RuleSetError
from egresswarden.core.loader import load_ruleset
from egresswarden.core.model import DEFAULT_SANDBOX_DENY, DEFAULT_SANDBOX_PROFILE, SandboxProfile
from egresswarden.sandbox import bwrap
from egresswarden.sandbox.profiles import PathRefusal, expand, plan_paths
from egresswarden.sandbox.protocol import Refusal, profile_from_wire, profile_to_wire

BASE = {"agents": [{"id": "coder", "token_sha256": ["a" * 64], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"host": "example.com"}]}}}


@dataclass(frozen=True)
class Bad:
    doc: str
    line: int
    message: str


def _load(tmp_path: Path, text: str):  # noqa: ANN202
    (tmp_path / "rules.yaml").write_text(text)
    return load_ruleset(tmp_path)


def test_default_profile_is_built_in(tmp_path: Path) -> None:
    rules = _load(tmp_path, yaml.safe_dump(BASE))
    profile = rules.model.sandbox_profiles[DEFAULT_SANDBOX_PROFILE]
    assert profile.origin is None and profile.deny == DEFAULT_SANDBOX_DENY and "ssh" in profile.deny_commands


def test_profiles_and_agent_binding(tmp_path: Path) -> None:
    doc = dict(BASE, agents=[{"id": "coder", "policies": ["p"], "sandbox_profile": "dev"}],
               sandbox_profiles={"dev": {"read_write": ["~/.cache"], "deny": ["~/keys"], "env": {"K": "PH"},
                                         "deny_commands": ["curl"], "limits": {"memory_mb": 256}},
                                 "bare": {"deny_defaults": False}})
    rules = _load(tmp_path, yaml.safe_dump(doc))
    dev = rules.model.sandbox_profiles["dev"]
    assert dev.deny == (*DEFAULT_SANDBOX_DENY, "~/keys") and dev.deny_commands == ("curl",)
    assert dev.limits.memory_mb == 256 and dev.env == (("K", "PH"),) and dev.origin is not None
    assert rules.model.sandbox_profiles["bare"].deny == ()
    # an agent with only sandbox_profile (no tokens, no sources) is valid: sandbox sessions identify it
    assert rules.model.agents[0].sandbox_profile == "dev"
    assert DEFAULT_SANDBOX_PROFILE in rules.model.sandbox_profiles
    wire, origin = profile_from_wire(profile_to_wire(dev))
    assert wire.deny == dev.deny and wire.env == dev.env and wire.limits == dev.limits and "rules.yaml:" in origin


BAD = [
    pytest.param(Bad("agents:\n  - id: coder\n    policies: [p]\n    sandbox_profile: nope\n", 2,
                     "unknown sandbox profile 'nope'"), id="unknown profile"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    env:\n      K: \"${secret:X}\"\n", 4,
                     "never holds a real secret"), id="secret in env"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    env:\n      HTTPS_PROXY: x\n", 4,
                     "HTTPS_PROXY is set by `warden sandbox` itself"), id="reserved env"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    deny:\n      - relative/path\n", 3,
                     "does not match"), id="relative path"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    deny:\n      - ~/a/../b\n", 3,
                     "'..' segments"), id="dotdot"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    limits: {memory_mb: 1}\n", 3,
                     "less than the minimum"), id="tiny memory"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    deny_commands: [a/b]\n", 3,
                     "does not match"), id="command with slash"),
    pytest.param(Bad("sandbox_profiles:\n  dev:\n    mounts: []\n", 3, "unknown key 'mounts'"), id="unknown key"),
    pytest.param(Bad("agents:\n  - id: anonymous\n    policies: [p]\n    sandbox_profile: default\n", 4,
                     "anonymous agent cannot be sandboxed"), id="anonymous"),
]


@pytest.mark.parametrize("case", BAD)
def test_bad_profiles_report_file_and_line(tmp_path: Path, case: Bad) -> None:
    text = "policies:\n  p:\n    allow: [{host: example.com}]\n"
    (tmp_path / "base.yaml").write_text(text)
    with pytest.raises(RuleSetError) as err:
        _load(tmp_path, case.doc)
    problems = [p for p in err.value.problems if p.file.endswith("rules.yaml")]
    assert any(p.line == case.line and case.message in p.message for p in problems), [str(p) for p in problems]


def test_secret_value_in_profile_env_is_a_compile_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAL_KEY", "sk-real-value-123456")
    doc = dict(BASE, policies={"p": {"allow": [{"host": "example.com"}], "credentials": [
        {"id": "c", "host": "example.com", "inject": {"Authorization": "${secret:REAL_KEY}"}}]}},
        sandbox_profiles={"dev": {"env": {"KEY": "sk-real-value-123456"}}})
    with pytest.raises(RuleSetError) as err:
        _load(tmp_path, yaml.safe_dump(doc))
    assert "holds the value of secret 'REAL_KEY'" in str(err.value)
    assert "sk-real-value" not in str(err.value)


# -- paths ----------------------------------------------------------------------------------
@pytest.fixture
def tree() -> Iterator[dict[str, Path]]:
    # Not under /tmp: the sandbox replaces /tmp, so the plan rightly ignores paths there.
    tmp_path = Path(tempfile.mkdtemp(prefix="warden-sandbox-plan-", dir="/var/tmp"))
    try:
        yield _make_tree(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _make_tree(tmp_path: Path) -> dict[str, Path]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("k")
    (home / ".config" / "gcloud").mkdir(parents=True)
    (home / ".config" / "other").mkdir()
    (home / ".netrc").write_text("x")
    (home / "link").symlink_to(home / ".config")
    work = home / "proj"
    (work / "sub").mkdir(parents=True)
    (work / ".env").write_text("x")
    (work / "sub" / ".env").write_text("x")
    (tmp_path / "keys").mkdir()
    (home / ".aws").symlink_to(tmp_path / "keys")
    return {"home": home, "work": work, "root": tmp_path}


def test_expand_patterns(tree: dict[str, Path]) -> None:
    home, work = str(tree["home"]), str(tree["work"])
    assert expand("~/.ssh", home, work) == [f"{home}/.ssh"]
    assert expand("~/.missing", home, work) == []
    assert expand("./**/.env", home, work) == [f"{work}/.env", f"{work}/sub/.env"]
    assert expand("~/.config/*", home, work) == [f"{home}/.config/gcloud", f"{home}/.config/other"]
    with pytest.raises(PathRefusal) as err:
        expand("./**/.env", home, work, limit=2)
    assert err.value.reason is Refusal.SCAN_LIMIT


def test_plan_hides_symlink_targets_and_refuses_denied_workdir(tree: dict[str, Path]) -> None:
    home, work = str(tree["home"]), str(tree["work"])
    plan = plan_paths(SandboxProfile("default"), work, home, [])
    assert f"{home}/.aws" in plan.hidden and str(tree["root"] / "keys") in plan.hidden
    assert plan.read_write == (work,)
    with pytest.raises(PathRefusal) as err:
        plan_paths(SandboxProfile("default"), f"{home}/.ssh", home, [])
    assert err.value.reason is Refusal.WORKDIR_DENIED
    with pytest.raises(PathRefusal) as err:
        plan_paths(SandboxProfile("default", read_write=("~/.aws",)), work, home, [])
    assert err.value.reason is Refusal.MOUNT_DENIED
    for system in ("/", "/usr", "/etc/ssl"):
        with pytest.raises(PathRefusal) as err:
            plan_paths(SandboxProfile("default"), system, home, [])
        assert "system directory" in str(err.value)


def test_mount_plan_absent_outside_masked_inside_read_write(tree: dict[str, Path]) -> None:
    home, work = str(tree["home"]), str(tree["work"])
    plan = plan_paths(SandboxProfile("default"), work, home, [])
    args = bwrap.mount_operations(plan)
    joined = " ".join(args)
    # home: a tmpfs with every entry but the denied ones bound back, then read-only
    assert f"--tmpfs {home} " in joined and f"--remount-ro {home}" in joined
    assert f"{home}/.ssh" not in args and f"{home}/.netrc" not in args
    assert f"--ro-bind-try {home}/proj {home}/proj" in joined
    assert f"--symlink {home}/.config {home}/link" in joined
    # .config: gcloud absent, other kept
    assert f"--tmpfs {home}/.config " in joined and f"{home}/.config/gcloud" not in args
    # .env inside the read-write workdir: masked by /dev/null, after the workdir's bind
    bind_at = args.index("--bind")
    mask_at = args.index(f"{work}/.env")
    assert args[bind_at + 1] == work and mask_at > bind_at and args[mask_at - 1] == "/dev/null"
    assert args.index("--tmpfs") < bind_at  # shallow first: home's tmpfs before the workdir bind


def test_sandbox_env_allowlist_and_reserved() -> None:
    host = {"PATH": "/usr/bin", "LANG": "C", "LC_ALL": "C", "AWS_SECRET_ACCESS_KEY": "s", "EDITOR": "vi",
            "HTTPS_PROXY": "http://host-proxy"}
    env = bwrap.sandbox_env(host, ("EDITOR",), (("API_KEY", "PH"),), "http://a:t@127.0.0.1:3128", "/h", "sb-1", "a")
    assert "AWS_SECRET_ACCESS_KEY" not in env and env["EDITOR"] == "vi" and env["LC_ALL"] == "C"
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://a:t@127.0.0.1:3128"
    assert env["PATH"] == f"{bwrap.STUB_DIR}:/usr/bin" and env["API_KEY"] == "PH"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS",
                 "PIP_CERT"):
        assert env[name] == bwrap.CA_BUNDLE
    assert env["NODE_USE_ENV_PROXY"] == "1" and env["NO_PROXY"] == "localhost,127.0.0.1,::1"


def test_stub_script_is_safe_to_embed() -> None:
    script = bwrap.stub_script("dev'; rm -rf /", "rules/x.yaml:3")
    assert "'; rm" not in script and "exit 126" in script


def test_command_copies_resolve_real_files() -> None:
    copies = bwrap.command_copies("sh", os.environ.get("PATH", ""))
    assert copies and all(os.path.isfile(c) and os.path.realpath(c) == c for c in copies)
