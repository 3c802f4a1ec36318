"""Benchmark: credential binding + injection planning + leak scan per request, with 50 credentials.

Calls the pure engine (core/credentials.py) directly; not a timed test.
Run: .venv/bin/python bench/bench_credentials.py
Targets: < 20 us per request without a body, < 250 us with a 64 KiB body.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml
from egresswarden.core.credentials import (
    bound_credentials,
    headers_text,
    injections,
    replace_placeholders,
    scanner_for,
    strip_names,
    target_text,
)
from egresswarden.core.loader import load_ruleset

N_CREDS = 50


def build_rules(tmp: Path):
    creds = []
    for i in range(N_CREDS):
        os.environ[f"BENCH_SECRET_{i}"] = f"bench-secret-{i:03d}-" + os.urandom(16).hex()
        creds.append({"id": f"cred{i}", "host": f"api{i}.example.com", "methods": ["GET", "POST"],
                      "paths": ["/v1/**"], "inject": {"Authorization": f"Bearer ${{secret:BENCH_SECRET_{i}}}"},
                      "strip": ["Authorization"], "placeholder": f"PLACEHOLDER-{i:03d}-xxxxxxxx"})
    doc = {"agents": [{"id": "coder", "token_sha256": ["0" * 64], "policies": ["p"]}],
           "policies": {"p": {"allow": [{"host": f"api{i}.example.com"} for i in range(N_CREDS)]
                              + [{"host": "other.example.com"}],
                              "credentials": creds, "strip": ["Cookie"]}}}
    (tmp / "rules.yaml").write_text(yaml.safe_dump(doc))
    return load_ruleset(tmp)


def per_request(rules, agent, scanner, host: str, headers: list[tuple[str, str]], body: bytes) -> None:
    bound = bound_credentials(rules, agent, host, 443, "https", "POST", "/v1/items?page=2", True)
    ids = frozenset(c.id for c in bound)
    strip = strip_names(agent, bound)
    kept = [(k, v) for k, v in headers if k.lower() not in strip]
    if scanner.find_leak(headers_text(kept) + "\n" + target_text("GET", host, "/v1/items?page=2"), ids, "headers") is not None:
        raise AssertionError("unexpected leak")
    if body and scanner.find_disguised_leak(body, ids, "body") is not None:  # as the proxy does
        raise AssertionError("unexpected leak")
    kept = [(k, replace_placeholders(v, bound)) for k, v in kept]
    injections(bound)


def measure(label: str, fn, n: int) -> float:
    for _ in range(min(n, 200)):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - start) / n * 1e6
    print(f"{label:<58} {us:9.2f} us/request  (n={n})")
    return us


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rules = build_rules(Path(d))
        agent = rules.agent("coder")
        assert agent is not None
        t1 = time.perf_counter()
        scanner = scanner_for(rules)
        t2 = time.perf_counter()
        print(f"{N_CREDS} credentials; rules compiled in {(t1 - t0) * 1e3:.1f} ms; automaton built once in "
              f"{(t2 - t1) * 1e3:.1f} ms (longest pattern {scanner.max_len} chars)")
        headers = [("Host", "api7.example.com"), ("User-Agent", "agent/1.0"), ("Accept", "application/json"),
                   ("Authorization", "Bearer PLACEHOLDER-007-xxxxxxxx"), ("Content-Type", "application/json"),
                   ("X-Request-Id", "0123456789abcdef")]
        body64 = (b'{"items": [' + b'{"name": "item", "value": 1234567890}, ' * 1700)[:65536]
        assert len(body64) == 65536
        a = measure("bound host, no body (bind+strip+scan+placeholder+inject)",
                    lambda: per_request(rules, agent, scanner, "api7.example.com", headers, b""), 20000)
        b = measure("other host, no body (scan only)",
                    lambda: per_request(rules, agent, scanner, "other.example.com", headers[:3], b""), 20000)
        c = measure("bound host, 64 KiB body",
                    lambda: per_request(rules, agent, scanner, "api7.example.com", headers, body64), 2000)
        dd = measure("other host, 64 KiB body",
                     lambda: per_request(rules, agent, scanner, "other.example.com", headers[:3], body64), 2000)
        secret = os.environ["BENCH_SECRET_7"].encode()
        echoed = body64[:30000] + secret + body64[30000:]
        e = measure("response redaction, 64 KiB body with one echoed secret",
                    lambda: scanner.redact(echoed, frozenset({"cred7"})), 2000)
        print(f"targets: no body < 20 us -> {'OK' if max(a, b) < 20 else 'MISSED'}; "
              f"64 KiB < 250 us -> {'OK' if max(c, dd) < 250 else 'MISSED'}; redaction {e:.1f} us")


if __name__ == "__main__":
    main()
