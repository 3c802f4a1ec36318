"""The admin-socket protocol between `warden sandbox` and Warden (server: runtime/admin.py).

JSON Lines over a unix socket that only Warden's own user (or root) can open. Each request
`{"op": ..., ...}` gets one reply `{"ok": true, ...}` or `{"ok": false, "reason": ..., "message": ...}`,
in order. One connection is one sandbox:

    register  {agent, profile?, workdir, command}  -> {sandbox_id, token, proxy, ca_bundle, profile, hidden}
    started   {command, workdir, limits, limits_backend}        Warden audits sandbox_start
    refused   {reason, message}                                  Warden audits sandbox_refused (+ alert)
    conn      {port} / unconn {port}                             the bridge's TCP source ports to Warden
    exit      {exit_status, signal, duration_ms, limit_hit}      Warden audits sandbox_exit

The session token is usable only while this connection is open, only for its agent, and only
on proxy connections whose source port the same session announced with `conn` before sending
a byte: a copy of the token read out of the sandbox's environment is useless elsewhere. When
the connection closes the session is revoked; a sandbox that started and vanished without
`exit` is audited as `sandbox_exit` with an error.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from egresswarden.core.model import SandboxLimits, SandboxProfile

TOKEN_PREFIX = "wsb_"
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 16 * 1024 * 1024  # the CA bundle (public roots) is ~250 KB


class Op(StrEnum):
    REGISTER = "register"
    STARTED = "started"
    REFUSED = "refused"
    CONN = "conn"
    UNCONN = "unconn"
    EXIT = "exit"


class Refusal(StrEnum):
    """Why a sandbox did not start (`reason` of sandbox_refused records)."""

    RULES_UNAVAILABLE = "rules_unavailable"
    UNKNOWN_AGENT = "unknown_agent"
    UNKNOWN_PROFILE = "unknown_profile"
    PROFILE_NOT_ALLOWED = "profile_not_allowed"  # --profile differs from the agent's sandbox_profile
    WORKDIR_DENIED = "workdir_denied"  # the workdir is (under) a denied path
    MOUNT_DENIED = "mount_denied"  # a read-write path of the profile is (under) a denied path
    SCAN_LIMIT = "scan_limit"  # too many files under the workdir to find denied files (./** globs)
    BUBBLEWRAP_MISSING = "bubblewrap_missing"
    SETUP_FAILED = "setup_failed"  # bubblewrap could not build the sandbox
    LIMITS_UNAVAILABLE = "limits_unavailable"
    BAD_REQUEST = "bad_request"


class LimitHit(StrEnum):
    MEMORY = "memory"
    PROCESSES = "processes"
    CPU = "cpu"


LIMITS_BACKENDS = ("cgroup_v2", "cgroup_v1", "rlimit", "none")


def limits_to_wire(limits: SandboxLimits) -> dict[str, int]:
    return {k: v for k, v in (("memory_mb", limits.memory_mb), ("max_processes", limits.max_processes),
                              ("cpu_seconds", limits.cpu_seconds)) if v is not None}


def limits_from_wire(data: Any) -> SandboxLimits:
    data = data if isinstance(data, dict) else {}

    def value(key: str) -> int | None:
        v = data.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    return SandboxLimits(value("memory_mb"), value("max_processes"), value("cpu_seconds"))


def profile_to_wire(profile: SandboxProfile) -> dict[str, Any]:
    return {
        "id": profile.id,
        "read_write": list(profile.read_write),
        "deny": list(profile.deny),
        "env": dict(profile.env),
        "env_inherit": list(profile.env_inherit),
        "deny_commands": list(profile.deny_commands),
        "limits": limits_to_wire(profile.limits),
        "origin": str(profile.origin) if profile.origin else "built-in",
    }


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"profile field {key!r} must be a list of strings")
    return tuple(value)


def profile_from_wire(data: Any) -> tuple[SandboxProfile, str]:
    """The profile Warden sent, and where it was defined. Raises ValueError on a malformed one."""
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ValueError("profile missing")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("profile env must map strings to strings")
    profile = SandboxProfile(
        id=data["id"],
        read_write=_strings(data, "read_write"),
        deny=_strings(data, "deny"),
        env=tuple(env.items()),
        env_inherit=_strings(data, "env_inherit"),
        deny_commands=_strings(data, "deny_commands"),
        limits=limits_from_wire(data.get("limits")),
    )
    return profile, str(data.get("origin", ""))
