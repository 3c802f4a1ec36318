"""RuleStore addon: loads the rules directory, watches it, swaps the compiled RuleSet atomically.

How reload works: a background task fingerprints the rule files, the hosts file and every
file in the secrets directory (stat identity: mtime, size, inode, through symlinks, so a
Kubernetes `..data` swap counts) every `POLL_SECONDS`, and compares it with the fingerprint
taken when the rules in force were loaded. Once a change has settled (see `_watch`), the
new rule set is loaded and compiled in a worker thread, off the event loop, then published by assigning one
attribute: a decision in flight keeps the RuleSet it started with, the next one sees the
new one. A change that fails validation keeps the last good rules, logs every problem with
file and line, and tells listeners (audit, metrics, alerts). A rule set that is invalid at
start-up stops Warden from starting.

SIGHUP asks for a reload now, whether or not anything changed; it is always audited (result
`unchanged` when the sources are the same). SIGUSR1 and SIGUSR2 are logged and ignored, so a
stray `kill -USR1` never stops the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

from egresswarden.core.compiler import current_version
from egresswarden.core.errors import WardenError
from egresswarden.core.loader import load_ruleset, rule_files
from egresswarden.core.ruleset import RuleSet
from egresswarden.core.validate import content_version

logger = logging.getLogger("warden")

POLL_SECONDS = 0.4  # a change is loaded after two equal polls: within ~1.2 s, under the 2 s promise
CONTENT_CHECK_POLLS = 25  # every ~10 s, compare content hashes as well as file stats


@dataclass(frozen=True, slots=True)
class ReloadEvent:
    ok: bool
    version: str | None  # the version now in force
    previous_version: str | None
    rule_count: int
    duration_seconds: float
    error: str | None = None  # file:line problems; never secret values
    initial: bool = False
    changed: bool = True  # False: a requested reload found the same sources (version unchanged)
    trigger: str = "watch"  # watch | signal | content_check


ReloadListener = Callable[[ReloadEvent], None]


Stat = tuple[str, int | None, int | None, int | None]
Fingerprint = tuple[tuple[Stat, ...], tuple[Stat, ...]]


def _stat(path: Path) -> Stat:
    """What identifies a file's version cheaply: a change to any of these means "look again"."""
    try:
        st = path.stat()
    except OSError:
        return (str(path), None, None, None)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


class RuleStore:
    """Owns the current RuleSet. `current` is None only before the first successful load."""

    def __init__(self) -> None:
        self.current: RuleSet | None = None
        self.listeners: list[ReloadListener] = []
        self._fingerprint: Fingerprint = ((), ())
        self._task: asyncio.Task[None] | None = None
        self._rules_dir: Path | None = None
        self._reload_requested = False
        self._signal_task: asyncio.Task[ReloadEvent | None] | None = None

    def load(self, loader: Any) -> None:  # mitmproxy's Loader
        loader.add_option("warden_rules", str, "rules", "Directory (or file) of Warden YAML rule files.")
        loader.add_option("warden_watch", bool, True, "Reload the rule files when they change.")

    def configure(self, updated: set[str]) -> None:
        if "warden_rules" in updated:
            rules_dir = Path(ctx.options.warden_rules)
            try:
                self.replace(self._load(rules_dir), initial=True)
            except WardenError as e:
                raise exceptions.OptionsError(f"warden: refusing to start: {e}") from None
            self._rules_dir = rules_dir

    def running(self) -> None:
        if self._task is None and ctx.options.warden_watch:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._request_reload)
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                loop.add_signal_handler(sig, self._ignored_signal, sig)

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _request_reload(self) -> None:
        logger.warning("warden: SIGHUP: reloading rules, hosts file and secrets")
        if self._task is not None:
            self._reload_requested = True  # the watcher reloads on its next poll, once files settle
        elif self._rules_dir is not None and (self._signal_task is None or self._signal_task.done()):
            self._signal_task = asyncio.get_running_loop().create_task(self.reload("signal"))

    @staticmethod
    def _ignored_signal(sig: signal.Signals) -> None:
        logger.warning("warden: %s ignored (SIGHUP reloads; SIGTERM/SIGINT stop)", sig.name)

    def add_listener(self, listener: ReloadListener) -> None:
        if listener not in self.listeners:
            self.listeners.append(listener)

    def _load(self, rules_dir: Path) -> RuleSet:
        # Rule files are fingerprinted before they are read (a change during the load is seen
        # next poll); the hosts file and secrets after, with the new rules' paths (a change
        # that lands while loading is caught by the content check, ~10 s, at worst). A load
        # that fails records the fingerprint too, so a broken file is reported once, not
        # on every poll.
        rule_stats = self._fingerprint_of(rules_dir)
        try:
            rules = load_ruleset(rules_dir)
        except WardenError:
            self._fingerprint = (rule_stats, self._extra_fingerprint())
            raise
        self._fingerprint = (rule_stats, self._extra_fingerprint(rules))
        return rules

    def replace(self, rules: RuleSet, initial: bool = False, duration: float = 0.0, trigger: str = "watch") -> None:
        previous = self.current
        self.current = rules  # the atomic swap: one reference assignment
        if not initial:
            logger.warning("warden: rules reloaded: version %s (%d rules, was %s)", rules.version, rules.rule_count,
                           previous.version if previous else None)
        self._notify(ReloadEvent(True, rules.version, previous.version if previous else None, rules.rule_count,
                                 duration, initial=initial, trigger=trigger))

    def _notify(self, event: ReloadEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as e:  # one broken listener must not stop the others
                logger.error("warden: reload listener %s failed: %s", getattr(listener, "__qualname__", "?"),
                             e.__class__.__name__)

    @staticmethod
    def _fingerprint_of(rules_dir: Path) -> tuple[Stat, ...]:
        paths = list(rule_files(rules_dir)) if rules_dir.exists() else []
        return tuple(_stat(p) for p in paths)

    def _extra_fingerprint(self, rules: RuleSet | None = None) -> tuple[Stat, ...]:
        """The hosts file and the secrets are part of the rule set: watch them too."""
        rules = rules or self.current
        if rules is None:
            return ()
        items: list[Stat] = []
        for path in self._watched_extra(rules):
            try:
                children = sorted(path.iterdir()) if path.is_dir() else [path]
            except OSError:
                children = [path]
            items.extend(_stat(child) for child in children)
        return tuple(items)

    @staticmethod
    def _watched_extra(rules: RuleSet) -> list[Path]:
        base = Path(rules.model.rules_dir)
        out = []
        for value in (rules.settings.hosts_file, rules.settings.secrets_dir):
            if value:
                p = Path(value)
                out.append(p if p.is_absolute() else base / p)
        return out

    def _snapshot(self) -> Fingerprint:
        assert self._rules_dir is not None
        return self._fingerprint_of(self._rules_dir), self._extra_fingerprint()

    async def _watch(self) -> None:
        """Poll for changes; reload once the files have stopped changing.

        A change is acted on only when two polls POLL_SECONDS apart see the same files, so a
        file caught half-written by an editor or a config tool is not loaded. Every
        CONTENT_CHECK_POLLS polls the content hash is compared too, so a rewrite that left
        size and (coarse) mtime unchanged is still picked up.
        """
        assert self._rules_dir is not None
        seen = await asyncio.to_thread(self._snapshot)
        polls = 0
        while True:
            await asyncio.sleep(POLL_SECONDS)
            polls += 1
            try:
                now = await asyncio.to_thread(self._snapshot)
                changed = now != seen
                seen = now
                if changed:
                    continue  # still changing, or just changed: look again next poll
                trigger = "signal" if self._reload_requested else "watch"
                stale = now != self._fingerprint or self._reload_requested
                if not stale and polls % CONTENT_CHECK_POLLS == 0:
                    stale = await asyncio.to_thread(self._content_changed)
                    trigger = "content_check"
                if stale:
                    self._reload_requested = False
                    await self.reload(trigger)
                    seen = await asyncio.to_thread(self._snapshot)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watcher must survive anything; the last good rules stay
                logger.error("warden: rule watcher error: %s", e.__class__.__name__)

    def _content_changed(self) -> bool:
        rules = self.current
        if rules is None or self._rules_dir is None:
            return True
        paths = rule_files(self._rules_dir) if self._rules_dir.exists() else []
        try:
            return current_version(rules, content_version(paths, self._rules_dir)) != rules.version
        except (OSError, WardenError):
            return True

    async def reload(self, trigger: str = "signal") -> ReloadEvent | None:
        """Load and compile off the event loop, then swap. Keeps the old rules on failure."""
        assert self._rules_dir is not None
        started = time.perf_counter()
        previous = self.current
        try:
            rules = await asyncio.to_thread(self._load, self._rules_dir)
        except WardenError as e:
            duration = time.perf_counter() - started
            # Remember what failed, so the same broken files are not re-loaded (and re-audited,
            # re-alerted) on every poll; the next change to any of them is tried again.
            rules_dir = self._rules_dir
            self._fingerprint = await asyncio.to_thread(
                lambda: (self._fingerprint_of(rules_dir), self._extra_fingerprint(previous)))
            logger.error("warden: rule reload failed; keeping version %s:\n%s",
                         previous.version if previous else None, e)
            event = ReloadEvent(False, previous.version if previous else None,
                                previous.version if previous else None,
                                previous.rule_count if previous else 0, duration, error=str(e), trigger=trigger)
            self._notify(event)
            return event
        if previous is not None and rules.version == previous.version and rules.secrets == previous.secrets:
            # touched but unchanged (editors do this): nothing to announce, unless an operator asked
            self.current = rules
            if trigger == "signal":
                event = ReloadEvent(True, rules.version, previous.version, rules.rule_count,
                                    time.perf_counter() - started, changed=False, trigger=trigger)
                self._notify(event)
                return event
            return None
        self.replace(rules, duration=time.perf_counter() - started, trigger=trigger)
        return None
