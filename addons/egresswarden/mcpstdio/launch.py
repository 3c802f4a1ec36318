"""How a declared stdio server is started: argv, environment, working directory, secrets.

- The environment is a minimal base (the MCP SDK's own choice: HOME, LOGNAME, PATH, SHELL,
  TERM, USER, plus LANG/LC_ALL for encodings) and the server's declared `env`, whose
  `${secret:NAME}` references are resolved here (settings.secrets_dir file, else the
  variable NAME of this process). The agent's other variables (tokens it holds, proxy
  settings) are not passed on.
- `sandbox_profile` wraps the command: `warden sandbox --agent ID --profile P -- CMD ARGS`
  (the `warden sandbox` command owns namespaces, filesystem view and the proxied network);
  `SANDBOX_COMMAND` is the one seam to that command.
- The secrets resolved are returned, so that the relay redacts them from everything the
  agent receives (tool results, server stderr) and from audit records.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from egresswarden.core.errors import SecretError
from egresswarden.core.model import McpServer, StdioCommand
from egresswarden.core.ruleset import CompiledCredential, CompiledRule, RuleSet
from egresswarden.core.secrets import Secret, render

BASE_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LC_ALL")


class LaunchError(Exception):
    """The server cannot be started as declared (message is safe to print: no secret values)."""


@dataclass(frozen=True, slots=True)
class Launch:
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str | None
    secrets: tuple[Secret, ...]

    def __repr__(self) -> str:  # the environment may hold secret values
        return f"Launch(argv={self.argv!r}, cwd={self.cwd!r}, env=<{len(self.env)} variables>)"


def warden_command() -> list[str]:
    """How to run this `warden` again (same interpreter, so the sandbox wrapper matches)."""
    exe = Path(sys.executable).parent / "warden"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "egresswarden"]


def SANDBOX_COMMAND(agent: str, profile: str, rules_dir: str, argv: list[str]) -> list[str]:  # noqa: N802 - the seam
    """`warden sandbox` around the server: same agent, the declared profile, the same rules
    (profiles live there); its workdir is the server's cwd (the process's working directory)."""
    return [*warden_command(), "sandbox", "--agent", agent, "--profile", profile, "--rules", rules_dir, "--", *argv]


def _secrets_dir(rules: RuleSet) -> str | None:
    d = rules.settings.secrets_dir
    if d and not Path(d).is_absolute():
        base = Path(rules.model.rules_dir)
        d = str((base if base.is_dir() else base.parent) / d)
    return d


def _cwd(rules: RuleSet, stdio: StdioCommand) -> str | None:
    if stdio.cwd is None:
        return None
    path = Path(stdio.cwd).expanduser()
    if not path.is_absolute():
        base = Path(rules.model.rules_dir)
        path = (base if base.is_dir() else base.parent) / path
    return str(path)


def build_launch(rules: RuleSet, server: McpServer, agent: str) -> Launch:
    """Resolve everything needed to start `server` for `agent`. Raises LaunchError."""
    stdio = server.stdio
    if stdio is None:
        raise LaunchError(f"MCP server {server.id!r} is an HTTP server ({server.url}), not a stdio server; "
                          f"agents reach it through `warden run` as a proxy")
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ and not os.environ[k].startswith("()")}
    used: list[Secret] = []
    secrets_dir = _secrets_dir(rules)
    for name, template in stdio.env:
        try:
            value, secrets = render(template, secrets_dir)
        except SecretError as e:
            raise LaunchError(f"MCP server {server.id!r}, env {name}: {e}") from None
        env[name] = value
        used += secrets
    cwd = _cwd(rules, stdio)
    if cwd is not None and not Path(cwd).is_dir():
        raise LaunchError(f"MCP server {server.id!r}: cwd {cwd} is not a directory")
    command = stdio.command
    if os.sep not in command:
        found = shutil.which(command, path=env.get("PATH"))
        if found is None:
            raise LaunchError(f"MCP server {server.id!r}: command {command!r} not found on PATH")
        command = found
    argv = [command, *stdio.args]
    if stdio.sandbox_profile:
        argv = SANDBOX_COMMAND(agent, stdio.sandbox_profile, rules.model.rules_dir, argv)
    return Launch(tuple(argv), env, cwd, tuple(used))


def secrets_credential(server: McpServer, secrets: tuple[Secret, ...]) -> CompiledCredential:
    """The server's env secrets as a credential, so the shared `Scanner` redacts them (every encoding)."""
    rule = CompiledRule(f"mcp/{server.id}/env", None, "stdio", None, None, None)
    return CompiledCredential(id=f"mcp-server:{server.id}", policy="", rule=rule, headers=(), query=(), strip=(),
                              placeholder=None, redact_response=True, secrets=secrets)
