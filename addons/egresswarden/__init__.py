"""Warden: an egress governance proxy for AI agents, built as mitmproxy addons.

Layers, each a sub-package; imports only point down this list:

    cli/      the `warden` command (run, check, explain, token, audit, ca, mcp)
    runtime/  the process: rule store, resolver, per-flow context, fail-closed dispatch, chain, master
    stages/   thin mitmproxy hook adapters, one concern each (identity ... upstream)
    record/   what happened: Outcome -> audit journal, metrics, alerts
    core/     the pure policy engine: rules -> RuleSet -> Decision (no mitmproxy imports)
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("egresswarden")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
