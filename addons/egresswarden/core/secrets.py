"""`${secret:NAME}` resolution, in the proxy process only.

A secret is read from the file NAME in `settings.secrets_dir` (Docker/Kubernetes secret
mounts) when that directory is set and holds the file, otherwise from the environment
variable NAME. A missing or empty secret is an error that names the secret and the
credential, never an empty header. Values are held in `Secret` objects whose repr and str
never show the value, so an accidental log line or exception text cannot leak them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SecretError
from .validate import SECRET_REF


@dataclass(frozen=True, slots=True)
class Secret:
    name: str
    value: str

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, <redacted>)"

    __str__ = __repr__


def read_secret(name: str, secrets_dir: str | None) -> Secret:
    if secrets_dir:
        path = Path(secrets_dir) / name
        if path.is_file():
            try:
                value = path.read_text("utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise SecretError(f"secret {name!r}: cannot read {path}: {e.__class__.__name__}") from None
            if not value:
                raise SecretError(f"secret {name!r}: file {path} is empty")
            return Secret(name, value)
    value = os.environ.get(name)
    if not value:
        where = f"file {secrets_dir}/{name} or " if secrets_dir else ""
        raise SecretError(f"secret {name!r} is not set (looked for {where}environment variable {name})")
    return Secret(name, value)


def render(template: str, secrets_dir: str | None) -> tuple[str, tuple[Secret, ...]]:
    """Replace every ${secret:NAME} in `template`; return the text and the secrets used."""
    used: list[Secret] = []

    def substitute(match: object) -> str:
        secret = read_secret(match.group(1), secrets_dir)  # type: ignore[attr-defined]
        used.append(secret)
        return secret.value

    return SECRET_REF.sub(substitute, template), tuple(used)
