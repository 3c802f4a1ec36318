"""Issue 15 item 8: compose as people run it (Debian's docker-compose 1.29, classic builder).

* `docker-compose config` of 1.29 (the real one, `apt-get install docker-compose`) accepts the file.
* The build context a classic build sends: computed by docker-compose 1.29's own code (docker-py
  reads `<context>/.dockerignore` and tars the context, exactly as `APIClient.build` does before
  it talks to the daemon) over a copy of the repository with a CA key and secrets planted
  where people keep them. None of them may be in the tar.
* Warden requires no secret file its rules do not use, and the agent's environment is the
  output of `warden agent-env --format compose`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .harness import REPO, WARDEN

COMPOSE = REPO / "compose" / "docker-compose.yml"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's docker-compose 1.29 and its docker-py live here

CLASSIC_CONTEXT = """
import json, os, sys
from docker import utils
from docker.api.build import process_dockerfile
path, dockerfile = sys.argv[1], sys.argv[2]
# docker/api/build.py APIClient.build, up to the request to the daemon:
exclude = None
ignore = os.path.join(path, '.dockerignore')
if os.path.exists(ignore):
    with open(ignore) as f:
        exclude = [l for l in (x.strip() for x in f.read().splitlines()) if l and l[0] != '#']
dockerfile = process_dockerfile(dockerfile, path)
import tarfile
with tarfile.open(fileobj=utils.tar(path, exclude=exclude, dockerfile=dockerfile)) as t:
    print(json.dumps(t.getnames()))
"""


def need_docker_compose_1() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose 1.x not installed (Debian: apt-get install docker-compose; make system-deps)")


def test_docker_compose_1_29_accepts_the_file(tmp_path: Path) -> None:
    need_docker_compose_1()
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "WARDEN_AGENT_TOKEN": "placeholder",
                                         "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "name" not in yaml.safe_load(COMPOSE.read_text())


def test_classic_build_context_never_holds_keys_or_secrets(tmp_path: Path) -> None:
    need_docker_compose_1()
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import docker.utils"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("docker-py (python3-docker, a docker-compose dependency) not importable")
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True, timeout=60).stdout.split()
    ctx = tmp_path / "ctx"
    for name in files:
        src = REPO / name
        if src.is_file():
            (ctx / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / name)
    planted = ["certs/mitmproxy-ca.pem", "certs/mitmproxy-ca.p12", "ca/mitmproxy-ca.pem", "compose/secrets/github_token",
               "compose/.env", ".venv/bin/python", "audit.jsonl", "addons/stray-key.pem", ".git/config"]
    for name in planted:
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx / name).write_text("PRIVATE KEY material\n")
    r = subprocess.run([SYSTEM_PYTHON, "-c", CLASSIC_CONTEXT, str(ctx), "compose/Dockerfile"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sent = set(json.loads(r.stdout))
    assert not sent & set(planted), sent & set(planted)
    assert not any(n.startswith(("certs/", "compose/secrets", ".git/", ".venv/", "tests/")) for n in sent)
    # What the Dockerfile copies is there (and the Dockerfile, which the builder always sends).
    assert {"pyproject.toml", "README.md", "addons/egresswarden/core/rules.schema.json", "compose/Dockerfile"} <= sent


def test_both_ignore_files_are_the_same_allow_list() -> None:
    def patterns(path: Path) -> list[str]:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    root, buildkit = patterns(REPO / ".dockerignore"), patterns(REPO / "compose" / "Dockerfile.dockerignore")
    assert root == buildkit
    assert root[0] == "*", "an allow-list: everything is excluded unless named"
    copies = [ln.split()[1:-1] for ln in (REPO / "compose" / "Dockerfile").read_text().splitlines()
              if ln.startswith("COPY ")]
    copied = {src for srcs in copies for src in srcs}
    assert copied == {"pyproject.toml", "README.md", "addons"}
    assert {f"!{c}" for c in copied} <= set(root)


def test_warden_requires_only_secrets_its_rules_use() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    rules_text = "".join(p.read_text() for p in (REPO / "rules").glob("*.yaml"))
    for name in compose["services"]["warden"].get("secrets") or []:
        assert f"${{secret:{name}}}" in rules_text, name
    declared = set(compose.get("secrets") or {})
    used = {s for svc in compose["services"].values() for s in svc.get("secrets") or []}
    assert declared == used, "every declared secret file is one some service needs"


def test_agent_environment_is_agent_env_output() -> None:
    out = subprocess.run([WARDEN, "agent-env", "--agent", "coder", "--format", "compose"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    expected = yaml.safe_load(out)["environment"]
    actual = yaml.safe_load(COMPOSE.read_text())["services"]["agent"]["environment"]
    assert actual == expected
