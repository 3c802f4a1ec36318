"""WardenMaster: a lean mitmdump master with the Warden chain where `-s` scripts would run.

Unlike `-s`, the chain is not loaded through the script loader, so nothing is ever
hot-reloaded from code (a failed script reload removes the addon and lets traffic pass).

Only the mitmproxy addons Warden needs are loaded (`NEEDED`). mitmproxy dispatches every
event to every addon in its list, so each unused addon costs CPU on every request, and
several would undermine a governance proxy: `save`/`savehar` write whole flows (with
injected credentials) to disk, `map_remote`/`map_local`/`modify_*` rewrite requests after
the policy decided, `server_replay`/`client_replay` replay traffic, and `onboarding` serves
its own web app from inside the proxy. Their options stay registered (mitmproxy's
command-line parser refers to them), but setting one is refused with a clear error rather
than silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from mitmproxy import addons, ctx, exceptions, log, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    script,
    termlog,
    tlsconfig,
    upstream_auth,
)
from mitmproxy.proxy import layer

from egresswarden.runtime import fastconnect
from egresswarden.runtime.addonmanager import CachedAddonManager
from egresswarden.runtime.banner import StartupLine
from egresswarden.runtime.chain import build_addon
from egresswarden.runtime.debug_checks import skip_message_typechecks
from egresswarden.runtime.options import use_scalar_reads
from egresswarden.stages.interception import is_first_layer
from egresswarden.stages.upstream_tls import ResumingTlsConfig, UpstreamSessions

NEEDED: tuple[type, ...] = (
    core.Core,
    block.Block,  # refuses clients from public addresses unless block_global is off
    disable_h2c.DisableH2C,  # h2c upgrades would bypass per-request decisions
    proxyserver.Proxyserver,
    script.ScriptLoader,  # kept for its options; warden run loads no scripts itself
    next_layer.NextLayer,
    tlsconfig.TlsConfig,
    upstream_auth.UpstreamAuth,  # for --mode upstream: behind a corporate proxy
)


class RefusedOptions:
    """Registers the options of the mitmproxy addons Warden does not load and refuses them."""

    def __init__(self, dropped: list[Any]) -> None:
        self.dropped = dropped
        self.names: set[str] = set()

    def load(self, loader: Any) -> None:
        before = set(loader.master.options.keys())
        for addon in self.dropped:
            if hasattr(addon, "load"):
                addon.load(loader)
        self.names = set(loader.master.options.keys()) - before

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        for name in sorted(updated & self.names):
            if getattr(opts, name) != opts.default(name):
                raise exceptions.OptionsError(
                    f"warden run does not support the mitmproxy option {name!r}: the addon that implements it "
                    f"is not loaded, because it would record or rewrite traffic behind the policy's back")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception type)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__
        return json.dumps(out, ensure_ascii=False)


class LogLevel:
    """Operational logging: level, format (`warden_log_format`), and always on stderr.

    Keeps the root logger at the level the terminal shows: mitmproxy's main() sets it to
    DEBUG and filters in its terminal log, so every connection builds debug records nobody
    sees (~3% of CPU on new-connection load). The terminal log writes to stderr, never
    stdout, which may be the audit stream (`--audit-log -`).
    """

    def __init__(self, termlog_addon: termlog.TermLog) -> None:
        self.termlog = termlog_addon

    def load(self, loader: Any) -> None:
        loader.add_option("warden_log_format", str, "text", "Operational log format on stderr: text or json.",
                          choices=["text", "json"])

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated:
            level = logging.getLevelName(ctx.options.termlog_verbosity.upper())
            logging.getLogger().setLevel(level if isinstance(level, int) else logging.DEBUG)
        if "warden_log_format" in updated:
            handler = self.termlog.logger
            if ctx.options.warden_log_format == "json":
                handler.setFormatter(JsonLogFormatter())
            else:
                handler.setFormatter(log.MitmFormatter(handler.has_vt_codes))


RUNTIME_CONDITION = "warden_runtime_condition"  # LogRecord attribute: an error Warden handles itself


class StartupErrorCheck(errorcheck.ErrorCheck):
    """mitmproxy's start-up error check, minus runtime conditions Warden handles itself.

    ErrorCheck exits when anything logs an ERROR before the proxy is running: right for a bad
    option, wrong for an audit write failure that the audit gate turns into 503s. Which of
    the two happened depended on how fast start-up was; now a log record marked
    `extra={RUNTIME_CONDITION: True}` never stops start-up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.logger.addFilter(lambda record: not getattr(record, RUNTIME_CONDITION, False))


class FirstLayerOnly(next_layer.NextLayer):
    """mitmproxy's layer chooser, restricted to the explicit proxy's own first layer.

    Warden's Interception stage decides every other layer (see stages/interception.py). It
    runs before this addon in the same hook, and when it leaves the decision open ("wait for
    a whole ClientHello or request line") mitmproxy's chooser would otherwise decide at once
    from the few bytes there are: `G` became an HttpLayer that no tunnel mode governs, or,
    with rawtcp, a raw relay past every rule."""

    first_layer_only = True  # stages.interception checks this under plain mitmdump -s

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if is_first_layer(nextlayer.context):
            super().next_layer(nextlayer)


def _replacement(addon: Any, sessions: UpstreamSessions) -> Any:
    """Warden's version of a mitmproxy default addon, where it has one."""
    if isinstance(addon, next_layer.NextLayer):
        return FirstLayerOnly()
    if isinstance(addon, tlsconfig.TlsConfig):
        return ResumingTlsConfig(sessions)
    return addon


class WardenMaster(master.Master):
    def __init__(self, opts: options.Options, loop: asyncio.AbstractEventLoop | None = None) -> None:
        use_scalar_reads(opts)
        skip_message_typechecks()
        super().__init__(opts, event_loop=loop, with_termlog=False)
        # Still empty (with_termlog=False added nothing): swap in the cached dispatch.
        opts.changed.disconnect(self.addons._configure_all)
        self.addons = CachedAddonManager(self)
        self._termlog_addon = termlog.TermLog(out=sys.stderr)  # stdout may be the audit stream
        self.addons.add(self._termlog_addon)
        defaults = addons.default_addons()
        chain = build_addon()
        sessions = next(p for p in chain.parts if isinstance(p, UpstreamSessions))
        kept = [_replacement(a, sessions) for a in defaults if isinstance(a, NEEDED)]
        refused = RefusedOptions([a for a in defaults if not isinstance(a, NEEDED)])
        at = next(i for i, a in enumerate(kept) if isinstance(a, script.ScriptLoader)) + 1
        fastconnect.install(next(p for p in chain.parts if isinstance(p, fastconnect.FastConnect)))
        self.addons.add(LogLevel(self._termlog_addon), *kept[:at], chain, *kept[at:],
                        refused)
        # StartupLine last: its running() comes after the port is bound and the error check passed.
        self.addons.add(StartupErrorCheck(), StartupLine(chain))
