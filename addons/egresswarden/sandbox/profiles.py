"""A sandbox profile (from the rules, via Warden) -> concrete paths for one sandbox.

Path patterns are absolute (`/data/x`), home-relative (`~/.ssh`) or workdir-relative
(`./**/.env`), with `*`, `?`, `[...]` and `**` (any depth, hidden names included). They are
expanded against the real filesystem when the sandbox starts; a symlink is denied as itself
and as what it points to, so `~/.aws -> /mnt/keys/aws` hides both.

`plan_paths` refuses (PathRefusal) when the workdir or a read-write path is, or is under, a
denied path: the denied path must never exist inside, and Docker's sandboxes refuse the same
way rather than silently dropping the mount.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from egresswarden.core.model import SandboxProfile
from egresswarden.sandbox.protocol import Refusal

MAX_SCAN_ENTRIES = 200_000  # files and directories walked for one `**` pattern
# A read-write workdir here would make the system itself writable inside the sandbox.
SYSTEM_DIRS = frozenset({"/", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/var",
                         "/opt", "/srv", "/proc", "/sys", "/dev", "/run", "/tmp", "/home", "/root", "/mnt", "/media"})


class PathRefusal(Exception):
    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PathPlan:
    workdir: str
    read_write: tuple[str, ...]  # workdir first
    hidden: tuple[str, ...]  # existing absolute paths that must not be visible
    notes: list[str] = field(default_factory=list)


def _translate(pattern: str) -> re.Pattern[str]:
    """Glob -> regex over '/'-separated paths: '**' spans directories, '*' and '?' do not."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def expand_base(pattern: str, home: str, workdir: str) -> str:
    if pattern.startswith("~/") or pattern == "~":
        return home.rstrip("/") + pattern[1:]
    if pattern.startswith("./"):
        return workdir.rstrip("/") + pattern[1:]
    return pattern


def expand(pattern: str, home: str, workdir: str, limit: int = MAX_SCAN_ENTRIES) -> list[str]:
    """Existing paths matching a profile pattern (absolute, normalised)."""
    full = os.path.normpath(expand_base(pattern, home, workdir))
    if not glob.has_magic(full):
        return [full] if os.path.lexists(full) else []
    if "**" not in full:
        return sorted(os.path.normpath(p) for p in glob.glob(full, include_hidden=True))
    # '**': walk from the longest literal prefix, bounded (a huge tree refuses rather than hangs).
    parts = full.split("/")
    literal = []
    for part in parts:
        if glob.has_magic(part):
            break
        literal.append(part)
    root = "/".join(literal) or "/"
    if not os.path.isdir(root):
        return []
    regex = _translate(full)
    found: list[str] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        seen += len(dirnames) + len(filenames)
        if seen > limit:
            raise PathRefusal(Refusal.SCAN_LIMIT,
                              f"more than {limit} entries under {root} to search for {pattern!r}; "
                              f"use a smaller --workdir or a more specific pattern in the profile")
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if regex.match(path):
                found.append(path)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return sorted(found)


def _under(path: str, ancestor: str) -> bool:
    return path == ancestor or ancestor == "/" or path.startswith(ancestor.rstrip("/") + "/")


def plan_paths(profile: SandboxProfile, workdir: str, home: str, extra_hidden: list[str]) -> PathPlan:
    """Resolve the profile for this workdir and home. Raises PathRefusal."""
    workdir = os.path.realpath(workdir)
    if not os.path.isdir(workdir):
        raise PathRefusal(Refusal.WORKDIR_DENIED, f"workdir {workdir} is not a directory")
    if workdir in SYSTEM_DIRS or workdir.startswith(("/usr/", "/etc/", "/proc/", "/sys/", "/dev/", "/boot/")):
        raise PathRefusal(Refusal.WORKDIR_DENIED,
                          f"workdir {workdir} is a system directory; run the agent in its project directory")
    hidden: dict[str, str] = {}  # path -> the pattern that denied it
    for pattern in (*profile.deny, *extra_hidden):
        for path in expand(pattern, home, workdir):
            hidden.setdefault(path, pattern)
            real = os.path.realpath(path)
            hidden.setdefault(real, pattern)
    for path, pattern in hidden.items():
        if _under(workdir, path):
            raise PathRefusal(Refusal.WORKDIR_DENIED,
                              f"workdir {workdir} is under {path}, which sandbox profile {profile.id!r} denies "
                              f"({pattern}); a denied path never exists inside the sandbox")
    read_write = [workdir]
    for pattern in profile.read_write:
        for path in expand(pattern, home, workdir):
            real = os.path.realpath(path)
            for denied, why in hidden.items():
                if _under(real, denied) or _under(path, denied):
                    raise PathRefusal(Refusal.MOUNT_DENIED,
                                      f"read-write path {path} (profile {profile.id!r}) is under {denied}, "
                                      f"which the profile denies ({why})")
            if os.path.isdir(real) or os.path.isfile(real):
                read_write.append(real)
    return PathPlan(workdir, tuple(dict.fromkeys(read_write)), tuple(sorted(hidden)))


def home_dir() -> str:
    return os.environ.get("HOME") or str(Path.home())
