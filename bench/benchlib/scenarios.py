"""The scenario matrix and how each one maps to load-generator arguments."""

from __future__ import annotations

from dataclasses import dataclass

from .origin import Origin
from .proxies import PROXY_AUTH_HEADER

HOST_FOR_KIND = {
    "http": "plain.test",
    "passthrough": "passthrough.test",
    "intercept": "intercept.test",
    "cred": "cred.test",
    "denied": "denied.test",
}


@dataclass(frozen=True)
class Scenario:
    kind: str            # http | passthrough | intercept | cred | denied
    keepalive: bool
    concurrency: int
    body: str            # key of origin.BODIES

    @property
    def name(self) -> str:
        conn = "ka" if self.keepalive else "new"
        body = "" if self.kind == "denied" else f"-{self.body}"
        return f"{self.kind}-{conn}-c{self.concurrency}{body}"

    @property
    def squid_applicable(self) -> bool:
        # squid does no TLS interception here (no ssl-bump), so no intercept/cred column.
        return self.kind in ("http", "passthrough", "denied")

    def lg_args(self, origin: Origin, proxy_port: int | None) -> list[str] | None:
        """Arguments for lg; proxy_port=None means direct to origin (None if n/a)."""
        host = HOST_FOR_KIND[self.kind]
        port = origin.http_port if self.kind == "http" else origin.https_port
        if self.kind == "denied":
            if proxy_port is None:
                return None  # a refused CONNECT has no direct-to-origin equivalent
            mode, extra = "connect", ["-s", "403"]
        else:
            mode, extra = ("http" if self.kind == "http" else "https"), ["-p", f"/{self.body}"]
        args = ["-m", mode, "-t", f"{host}:{port}", "-c", str(self.concurrency),
                "-k", "1" if self.keepalive else "0", *extra]
        if proxy_port is None:
            return args + ["-a", f"127.0.0.1:{port}"]
        # Same bytes for every proxy: bare mitmdump and squid ignore the credentials.
        return args + ["-P", f"127.0.0.1:{proxy_port}", "-H", PROXY_AUTH_HEADER]


def S(kind: str, ka: bool, c: int, body: str = "128B") -> Scenario:
    return Scenario(kind, ka, c, body)


# Not the full cross product: every proxy mode with keep-alive at c16/128 B,
# then one axis varied at a time where it matters (new connection per
# request, c64, 1 MiB). 13 scenarios x (A, B, squid where applicable).
FULL_MATRIX: list[Scenario] = [
    S("http", True, 16), S("http", False, 16), S("http", True, 64), S("http", True, 16, "1MiB"),
    S("passthrough", True, 16), S("passthrough", False, 16), S("passthrough", True, 16, "1MiB"),
    S("intercept", True, 16), S("intercept", False, 16), S("intercept", True, 64),
    S("intercept", True, 16, "1MiB"),
    S("cred", True, 16),
    S("denied", False, 16),
]

QUICK_MATRIX: list[Scenario] = [
    S("http", True, 16), S("passthrough", True, 16), S("intercept", True, 16),
    S("cred", True, 16), S("denied", False, 16),
]
