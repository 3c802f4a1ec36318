"""Warden: an egress governance proxy for AI agents, built as mitmproxy addons.

`addons.engine` is the pure policy core (no mitmproxy imports); the other modules are
thin mitmproxy addons, one concern each, chained in `addons.chain`.
"""
