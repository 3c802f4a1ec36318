"""Durable MCP pins: learned tool definitions in one SQLite file shared by every Warden process on a host.

Why SQLite: `warden run --workers N` and any number of `warden mcp stdio` processes learn
pins at the same time. SQLite (standard library) in WAL mode gives atomic insert-if-absent
across processes with file locking done by the database, readers that never block the
writer, and crash safety, where a YAML or JSON file would need a lock protocol of our own.

Tables:
    learned(server, tool) -> digest     first definition seen wins: `INSERT ... ON CONFLICT
                                        DO NOTHING`, then read back what is stored, so two
                                        processes that race see one pin and the loser's
                                        definition counts as changed
    definitions(digest) -> body         canonical definitions seen (for `warden mcp pin`
                                        diffs), at most MAX_DEFINITIONS_PER_SERVER per server
                                        (oldest dropped) so a server minting definitions
                                        cannot grow the file without bound

A learned pin is never rewritten here: operators approve a definition with `warden mcp pin`,
which writes a rule pin (`mcp_pins`, always consulted first). Each call opens no new
connection: one connection per thread (SQLite connections must not be shared across
threads without care), busy_timeout for writers that collide.

`attach(pins, rules)` points a `core.mcp.PinStore` at the store and mode a rule set names;
a store that cannot be opened is replaced by `UnavailablePins`, so every unpinned tool is
hidden and refused (fail closed) and stderr says why.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from egresswarden.core.mcp import PinStore
from egresswarden.core.ruleset import RuleSet

MAX_DEFINITIONS_PER_SERVER = 1000
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS learned (
    server TEXT NOT NULL, tool TEXT NOT NULL, digest TEXT NOT NULL, learned_at REAL NOT NULL,
    PRIMARY KEY (server, tool));
CREATE TABLE IF NOT EXISTS definitions (
    digest TEXT PRIMARY KEY, server TEXT NOT NULL, tool TEXT NOT NULL, body TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS definitions_by_server ON definitions (server, last_seen);
"""


def default_path() -> Path:
    """$XDG_STATE_HOME/warden/mcp-pins.sqlite (~/.local/state/... when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "warden" / "mcp-pins.sqlite"


def store_path(rules: RuleSet) -> Path:
    """The pin store a rule set names (settings.mcp_pin_store, relative to the rules directory)."""
    configured = rules.settings.mcp_pin_store
    if not configured:
        return default_path()
    path = Path(configured).expanduser()
    if not path.is_absolute():
        base = Path(rules.model.rules_dir)
        path = (base if base.is_dir() else base.parent) / path
    return path


class SqlitePins:
    """`core.mcp.PinBackend` on a SQLite file. Methods raise `sqlite3.Error`/`OSError` on failure;
    `PinStore` turns that into "no pin" (fail closed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._db()  # create the file and schema now, so a bad path fails at start, not mid-traffic

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across process crashes
        db.executescript(_SCHEMA)
        self._local.db = db
        with self._lock:
            self._all.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    # -- PinBackend ---------------------------------------------------------------------------
    def learned(self, server: str, tool: str) -> str | None:
        row = self._db().execute("SELECT digest FROM learned WHERE server = ? AND tool = ?", (server, tool)).fetchone()
        return str(row[0]) if row else None

    def learn(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> str:
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO learned (server, tool, digest, learned_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (server, tool) DO NOTHING", (server, tool, digest, now))
            self._remember(db, server, tool, digest, definition, now)
            row = db.execute("SELECT digest FROM learned WHERE server = ? AND tool = ?", (server, tool)).fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return str(row[0])

    def remember(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            self._remember(db, server, tool, digest, definition, time.time())
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _remember(db: sqlite3.Connection, server: str, tool: str, digest: str, definition: dict[str, Any],
                  now: float) -> None:
        body = json.dumps(definition, sort_keys=True, ensure_ascii=True)
        db.execute("INSERT INTO definitions (digest, server, tool, body, first_seen, last_seen) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET last_seen = excluded.last_seen",
                   (digest, server, tool, body, now, now))
        db.execute("DELETE FROM definitions WHERE server = ? AND digest NOT IN (SELECT digest FROM definitions "
                   "WHERE server = ? ORDER BY last_seen DESC LIMIT ?) "
                   "AND digest NOT IN (SELECT digest FROM learned WHERE server = ?)",
                   (server, server, MAX_DEFINITIONS_PER_SERVER, server))

    # -- for `warden mcp pin` -------------------------------------------------------------------
    def definition(self, digest: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT body FROM definitions WHERE digest = ?", (digest,)).fetchone()
        if not row:
            return None
        body = json.loads(row[0])
        return body if isinstance(body, dict) else None

    def learned_pins(self, server: str) -> dict[str, str]:
        rows = self._db().execute("SELECT tool, digest FROM learned WHERE server = ?", (server,)).fetchall()
        return {str(t): str(d) for t, d in rows}



class UnavailablePins:
    """The backend used when the configured store cannot be opened: every call fails, so
    `PinStore` treats every tool without a rule pin as unpinned (hidden, refused)."""

    def __init__(self, path: Path, error: str) -> None:
        self.path = path
        self.error = error

    def learned(self, server: str, tool: str) -> str | None:
        raise OSError(f"MCP pin store {self.path} is unavailable: {self.error}")

    def learn(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> str:
        raise OSError(f"MCP pin store {self.path} is unavailable: {self.error}")

    def remember(self, server: str, tool: str, digest: str, definition: dict[str, Any]) -> None:
        raise OSError(f"MCP pin store {self.path} is unavailable: {self.error}")

    def definition(self, digest: str) -> dict[str, Any] | None:
        raise OSError(f"MCP pin store {self.path} is unavailable: {self.error}")


def open_store(path: Path) -> SqlitePins | UnavailablePins:
    try:
        return SqlitePins(path)
    except (sqlite3.Error, OSError) as e:
        error = f"{e.__class__.__name__}: {str(e)[:200]}"
        print(f"warden: MCP pin store {path} cannot be opened ({error}); tools without a rule pin are refused",
              file=sys.stderr, flush=True)
        return UnavailablePins(path, error)


def attach(pins: PinStore, rules: RuleSet) -> None:
    """Apply a rule set's pins, unpinned mode and store to `pins` (call on every rule change)."""
    pins.set_rule_pins(rules.model.mcp_pins)
    pins.set_unpinned(rules.settings.mcp_unpinned)
    path = store_path(rules)
    current = pins.backend
    if isinstance(current, (SqlitePins, UnavailablePins)) and current.path == path:
        return
    pins.backend = open_store(path)
    pins.learned = {}  # the cache belonged to the previous store
