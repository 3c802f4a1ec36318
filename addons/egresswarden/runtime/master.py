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

import logging
from typing import Any

from mitmproxy import addons, ctx, exceptions, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    script,
    tlsconfig,
    upstream_auth,
)
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import modes

from egresswarden.runtime.chain import build_addon

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


class LogLevel:
    """Keep the root logger at the level the terminal shows.

    mitmproxy's main() sets the root logger to DEBUG and filters in its terminal log, so
    every connection builds debug records nobody sees (~3% of CPU on new-connection load).
    """

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated:
            level = logging.getLevelName(ctx.options.termlog_verbosity.upper())
            logging.getLogger().setLevel(level if isinstance(level, int) else logging.DEBUG)


class FirstLayerOnly(next_layer.NextLayer):
    """mitmproxy's layer chooser, restricted to the explicit proxy's own first layer.

    Warden's Interception stage decides every other layer (see stages/interception.py). It
    runs before this addon in the same hook, and when it leaves the decision open ("wait for
    a whole ClientHello or request line") mitmproxy's chooser would otherwise decide at once
    from the few bytes there are: `G` became an HttpLayer that no tunnel mode governs, or,
    with rawtcp, a raw relay past every rule."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        ctxt = nextlayer.context
        if len(ctxt.layers) == 1 and isinstance(ctxt.layers[0], (modes.HttpProxy, modes.HttpUpstreamProxy)):
            super().next_layer(nextlayer)


class WardenMaster(master.Master):
    def __init__(self, opts: options.Options, loop=None) -> None:  # noqa: ANN001
        super().__init__(opts, event_loop=loop, with_termlog=True)
        defaults = addons.default_addons()
        kept = [FirstLayerOnly() if isinstance(a, next_layer.NextLayer) else a
                for a in defaults if isinstance(a, NEEDED)]
        refused = RefusedOptions([a for a in defaults if not isinstance(a, NEEDED)])
        at = next(i for i, a in enumerate(kept) if isinstance(a, script.ScriptLoader)) + 1
        self.addons.add(LogLevel(), *kept[:at], build_addon(), *kept[at:], refused)
        self.addons.add(errorcheck.ErrorCheck())
