#!/usr/bin/env python3
"""MCP engine micro-benchmark: cost of one tools/call decision.

    .venv/bin/python bench/bench_mcp.py [--iterations 20000]

A catalog of 100 tools, each with an arguments JSON Schema; the call carries a ~1 KiB
argument object. Measured per message, as the addon does it: parse the JSON-RPC body
(`parse_messages`) and decide it (`decide_message`: catalog, deny list, pin check, schema
validation with the validator compiled once per RuleSet). Also: one tools/list filter of
100 tools (hashing each definition for the pins). Target: tools/call p50 < 200 us.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from egresswarden.core import mcp as E
from egresswarden.core.loader import load_ruleset

N_TOOLS = 100


def build_rules(d: Path) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["query"],
              "properties": {"query": {"type": "string", "maxLength": 2000},
                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 32},
                             "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                             "options": {"type": "object", "additionalProperties": {"type": "string"}}}}
    tools = [f"tool_{i:03d}" for i in range(N_TOOLS)]
    rules = {
        "agents": [{"id": "bench", "token_sha256": ["0" * 64], "policies": ["p"]}],
        "mcp_servers": [{"id": "srv", "url": "https://mcp.example.com/mcp"}],
        "policies": {"p": {"allow": [{"host": "mcp.example.com"}], "mcp": [
            {"server": "srv", "tools": tools, "deny_tools": ["tool_danger"], "arguments": {t: schema for t in tools}}]}},
    }
    (d / "rules.yaml").write_text(yaml.safe_dump(rules))


def arguments_1k() -> dict:
    args = {"query": "q" * 400, "tags": [f"tag-{i:02d}" for i in range(20)], "limit": 50,
            "options": {f"k{i}": "v" * 20 for i in range(10)}}
    size = len(json.dumps(args))
    assert 900 <= size <= 1200, size
    return args


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_rules(Path(tmp))
        rules = load_ruleset(Path(tmp))
    t0 = time.perf_counter()
    policies = E.McpPolicies(rules)
    compile_ms = (time.perf_counter() - t0) * 1000
    pins = E.PinStore()
    server = rules.model.mcp_servers[0]
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "tool_077", "arguments": arguments_1k()}}).encode()
    samples = []
    for i in range(a.iterations + 1000):
        t = time.perf_counter()
        msgs, _ = E.parse_messages(body)
        md = E.decide_message(policies, pins, "bench", server, msgs[0])
        dt = time.perf_counter() - t
        if i >= 1000:
            samples.append(dt)
        assert md.allowed
    bad = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "tool_077", "arguments": {**arguments_1k(), "limit": 1000}}}).encode()
    deny_samples = []
    for _ in range(2000):
        t = time.perf_counter()
        msgs, _ = E.parse_messages(bad)
        md = E.decide_message(policies, pins, "bench", server, msgs[0])
        deny_samples.append(time.perf_counter() - t)
        assert not md.allowed
    tools = [{"name": f"tool_{i:03d}", "description": "does a thing " * 10,
              "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}}} for i in range(N_TOOLS)]
    list_samples = []
    for _ in range(200):
        result = {"tools": [dict(t) for t in tools]}
        t = time.perf_counter()
        E.filter_result(policies, pins, "bench", "srv", result, E.FilterReport())
        list_samples.append(time.perf_counter() - t)
    us = 1e6
    print(f"MCP engine, {N_TOOLS}-tool catalog, ~{len(json.dumps(arguments_1k()))} B arguments "
          f"(compile {compile_ms:.1f} ms)")
    print(f"tools/call allow : p50 {statistics.median(samples) * us:7.1f} us  p99 {percentile(samples, 0.99) * us:7.1f} us"
          f"  ({len(samples) / sum(samples):,.0f}/s)")
    print(f"tools/call deny  : p50 {statistics.median(deny_samples) * us:7.1f} us  "
          f"p99 {percentile(deny_samples, 0.99) * us:7.1f} us (bad arguments)")
    print(f"tools/list filter: p50 {statistics.median(list_samples) * us:7.1f} us for {N_TOOLS} tools (with pin hashing)")
    ok = statistics.median(samples) * us < 200
    print("target p50 < 200 us:", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
