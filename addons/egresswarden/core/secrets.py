"""`${secret:NAME}` resolution, in the proxy process only.

A secret is read from the file NAME in `settings.secrets_dir` (Docker/Kubernetes secret
mounts) when that directory is set and holds the file, otherwise from the environment
variable NAME. A missing or empty secret is an error that names the secret and the
credential, never an empty header. Values are held in `Secret` objects whose repr and str
never show the value, so an accidental log line or exception text cannot leak them.

The policy version must change when a secret file changes (rotation is a policy change that
operators want to see in the audit log), yet it leaves the process in 403 bodies, audit
records and metric labels. An unkeyed hash of a secret would let anyone who sees the version
test guesses offline (a 48-bit truncated SHA-256 of a short password is enough to confirm
it). `secrets_digest` is therefore an HMAC-SHA256 under `VERSION_KEY`, 32 random bytes made
once per process and never written anywhere: it tells "changed" from "unchanged" and nothing
else. `warden run --workers N` hands its key to its workers (`VERSION_KEY_ENV`) so that they
agree on the version; separate processes (replicas, `warden check`) give different versions for
the same secrets, while rule files and the hosts file alone always hash the same everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
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


VERSION_KEY_ENV = "WARDEN_POLICY_VERSION_KEY"


def _version_key() -> bytes:
    inherited = os.environ.pop(VERSION_KEY_ENV, "")  # popped: nothing this process starts sees it
    try:
        key = bytes.fromhex(inherited)
    except ValueError:
        key = b""
    return key if len(key) == 32 else os.urandom(32)


VERSION_KEY = _version_key()


def secrets_digest(secrets: Iterable[Secret]) -> bytes:
    """A keyed digest of secret names and values for the policy version (see module docstring)."""
    mac = hmac.new(VERSION_KEY, digestmod=hashlib.sha256)
    for name, value in sorted({(s.name, s.value) for s in secrets}):
        mac.update(f"{len(name)}:{name}{len(value)}:".encode() + value.encode("utf-8", "surrogateescape"))
    return mac.digest()


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
    from_env = os.environ.get(name)
    if not from_env:
        where = f"file {secrets_dir}/{name} or " if secrets_dir else ""
        raise SecretError(f"secret {name!r} is not set (looked for {where}environment variable {name})")
    return Secret(name, from_env)


def render(template: str, secrets_dir: str | None) -> tuple[str, tuple[Secret, ...]]:
    """Replace every ${secret:NAME} in `template`; return the text and the secrets used."""
    used: list[Secret] = []

    def substitute(match: object) -> str:
        secret = read_secret(match.group(1), secrets_dir)  # type: ignore[attr-defined]
        used.append(secret)
        return secret.value

    return SECRET_REF.sub(substitute, template), tuple(used)
