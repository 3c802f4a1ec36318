"""The start-up line on stderr, printed once Warden really listens.

    warden 0.1.0 listening on 127.0.0.1:8080 (metrics 127.0.0.1:9464); rules rules (7 rules,
    policy version ea01de690c64); CA sha256 3f9a...; audit /srv/audit.jsonl

It is the last addon of the master, so its `running()` comes after the proxy server bound
its port (mitmproxy's Proxyserver) and after ErrorCheck, which exits on any start-up error:
the line is never printed for a Warden that is not serving. It goes to stderr whatever the
audit destination, so `--audit-log -` keeps stdout pure JSON Lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import ctx

from egresswarden import __version__
from egresswarden.runtime.rulestore import RuleStore

CA_CERT_NAME = "mitmproxy-ca-cert.pem"


def ca_fingerprint(confdir: str) -> str:
    """SHA-256 of the interception CA certificate (DER), as `warden ca init` prints it."""
    path = Path(os.path.expanduser(confdir)) / CA_CERT_NAME
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        return f"unreadable ({e.__class__.__name__})"
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _address(host: str, port: int) -> str:
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StartupLine:
    def __init__(self, chain: Any) -> None:
        self.store = next((p for p in getattr(chain, "parts", ()) if isinstance(p, RuleStore)), None)

    def running(self) -> None:
        opts = ctx.options
        rules = self.store.current if self.store is not None else None
        loaded = (f"{rules.rule_count} rules, policy version {rules.version}" if rules is not None
                  else "no rules loaded")
        audit = opts.warden_audit_log
        audit_shown = "stdout" if audit == "-" else str(Path(audit).resolve())
        # Workers (--workers N) listen for metrics on port 0 and the supervisor serves the merged
        # endpoint: their own address would only mislead.
        listen = opts.warden_metrics_listen
        metrics = f" (metrics {listen})" if listen and not listen.endswith(":0") else ""
        line = (f"warden {__version__} listening on {_address(opts.listen_host, opts.listen_port)}{metrics}; "
                f"rules {Path(opts.warden_rules).resolve()} ({loaded}); CA sha256 {ca_fingerprint(opts.confdir)}; "
                f"audit {audit_shown}")
        if getattr(opts, "warden_log_format", "text") == "json":  # stderr stays one JSON object per line
            line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                               "level": "info", "logger": "warden", "message": line})
        print(line, file=sys.stderr, flush=True)
