"""`warden replay --rules NEW_DIR AUDIT_FILE...`: what a proposed rule change would change.

Every recorded `connect`, `request` and `mcp` record is decided again under the new rules
with the proxy's own stage function (`core.plan`), offline: addresses come from the new
rules' hosts file, else the record's `upstream_ip` (the address the proxy checked and
pinned), else an IP literal; names that would need DNS are not guessed at. The old decision
is the one the record carries. Each record is then one of:

  unchanged        same verdict (allow / deny / report)
  newly_denied     was allow or report, now deny
  newly_allowed    was deny, now allow or report
  report_changed   allow <-> report (a report-mode agent, or a rule that now reports)
  not replayed     its decision depends on something the audit log does not hold (below)

and, independently, `interception_changed` (a tunnel now intercepted or passed through),
`credentials_changed` (other credentials would be injected) and `raw_tcp_removed` (a
passed-through tunnel that carried bytes that are not TLS, `tunnel_close` with
`carried_tls: false`, whose new rule carries TLS only: it would be refused). Changes are grouped by
kind, agent, host, old and new rule and reason, with counts, first/last time seen and a few
example records (file:line).

Sequencing follows the proxy: a request whose tunnel the new rules refuse is not decided on
its own (never sent, or with `explain_denials: in_band` answered with the tunnel's refusal),
so it is counted once, under `requests_in_refused_tunnels`, not as a second denial (the
connect record is the denial); likewise MCP messages whose HTTP request is refused. An HTTP
request that carried MCP messages is compared through its `mcp` records (the proxy records
the first MCP denial on it when it answered every message itself).

Not replayed, and said so: identity decisions (tokens and source addresses are not
recorded); the leak guard and body checks (headers and bodies are not recorded); DNS
failures; operational refusals (rules or audit unavailable, internal errors); MCP tool pins
(definitions seen at run time); tool calls whose arguments the new rules constrain when the
values were not logged (`log_argument_values`); completion requests (their ref is not
recorded); names whose address the new rules would check but no address is known.
Rule-independent checks (domain fronting, MCP header mismatches) are assumed unchanged.

Streams: memory is bounded by the number of groups and a bounded decision memo (traffic
repeats: the same agent, host and path are decided once), not by the number of records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from egresswarden.cli.auditread import Reader, parse_line, quiet_broken_pipe
from egresswarden.cli.common import load_or_report
from egresswarden.core.decision import Decision, Reason, Verdict
from egresswarden.core.hostnames import IPAddress, parse_ip
from egresswarden.core.mcp import McpPolicies, PinStore
from egresswarden.core.plan import Plan, StageName, decide_mcp, mcp_decider_for, plan, rule_origins
from egresswarden.core.ruleset import RuleSet

REPLAYED_EVENTS = ("connect", "request", "mcp")
KINDS = ("newly_denied", "newly_allowed", "report_changed", "interception_changed", "credentials_changed",
         "raw_tcp_removed")
MEMO_LIMIT = 20_000  # per memo (decisions, and decision-relevant bytes): bounds memory, not records

# Old reasons whose decision does not come from the rules: assumed the same under any rules.
RULE_INDEPENDENT = frozenset({Reason.SNI_MISMATCH.value, Reason.HOST_MISMATCH.value,
                              Reason.MCP_HEADER_MISMATCH.value})
# Old reasons whose inputs the audit log does not hold: not replayed (code -> why).
NOT_REPLAYABLE = {
    Reason.AUTH_REQUIRED.value: "identity",
    Reason.AUTH_FAILED.value: "identity",
    Reason.SOURCE_NOT_ALLOWED.value: "identity",
    Reason.SECRET_LEAK.value: "leak_guard",
    Reason.BODY_TOO_LARGE.value: "body_check",
    Reason.MISSING_SECRET.value: "operational",
    Reason.RESOLVE_FAILED.value: "dns_failure",
    Reason.RULES_UNAVAILABLE.value: "operational",
    Reason.AUDIT_UNAVAILABLE.value: "operational",
    Reason.INTERNAL_ERROR.value: "operational",
    Reason.MCP_TOOL_CHANGED.value: "mcp_pins",
    Reason.BUFFER_LIMIT.value: "load",
    Reason.SCAN_LIMIT.value: "load",
    Reason.CONNECTION_LIMIT.value: "load",
}
WHY_TEXT = {
    "identity": "identity decisions (missing or wrong token, source address): tokens and sources are not recorded",
    "leak_guard": "leak-guard denials: request headers and bodies are not recorded, so secrets cannot be rescanned",
    "body_check": "body checks (compressed bodies above the scan limit): bodies are not recorded",
    "dns_failure": "names that did not resolve at the time: DNS is not replayed",
    "operational": "operational refusals (rules/audit unavailable, internal error, missing secret): not policy",
    "load": "refusals for load (an agent's body budget, decode meter or connection limit): they depend on "
            "what else was open at the time, not on the rules' allow and deny",
    "mcp_pins": "MCP tool-definition changes: pins depend on definitions seen at run time",
    "mcp_arguments": "tool calls whose arguments the new rules constrain: argument values were not logged "
                     "(add the tool to log_argument_values to replay them)",
    "mcp_completion": "MCP completion requests: the prompt/resource they refer to is not recorded",
    "address_unknown": "names the new rules allow but whose address was never checked (no upstream_ip recorded, "
                       "not in the new hosts file): the SSRF guard and cidr rules cannot be evaluated",
    "no_agent": "records without an identified agent",
    "no_decision": "records without a recorded decision",
    "unknown_layer": "requests without a recorded interception (refused before the tunnel was known)",
}
LIMITS = [
    "Only what was recorded is replayed: a tunnel passed through under the old rules has no request records, so "
    "requests inside it that the new rules would intercept and decide are not known (see interception_changed).",
    "upstream_ip is the first address the proxy checked; other addresses of the same name are not recorded.",
    "Whether a passed-through tunnel carried TLS is on its tunnel_close record (carried_tls); tunnel_close records "
    "written before that field existed, and tunnels still open, are not checked for raw_tcp_removed.",
    "The leak guard, fronting checks and identity are not simulated; they would still apply under the new rules.",
    "HTTP requests to an MCP endpoint are compared through their mcp records; a request the new rules newly "
    "route to an MCP server has no recorded JSON-RPC body, so its MCP decisions are not known.",
]


# (event, replayed?, counter to bump, keys of the groups it joins): what one record does to the report
Effect = tuple[str, bool, str | None, tuple[tuple[Any, ...], ...]]

# The key order of outcome records (record/audit.py outcome_record), which `fast_key` relies on.
OUTCOME_LAYOUT = ("time", "event", "request_id", "agent", "identity", "client_ip", "client_port", "method", "scheme",
                  "host", "port", "path", "decision", "reason", "rule_id", "message", "policy_version",
                  "interception", "status", "bytes_up", "bytes_down", "duration_ms", "upstream_ip", "credential_ids")


def standard_layout(record: dict[str, Any]) -> bool:
    """True if the parsed record has outcome_record's key order (so its fast key is sound)."""
    return tuple(record)[:len(OUTCOME_LAYOUT)] == OUTCOME_LAYOUT


def fast_key(raw: bytes) -> tuple[bytes, ...] | None:
    """The decision-relevant bytes of an outcome record line, without parsing it, or None.

    outcome_record writes time, event, request_id, agent, identity, client_ip, client_port,
    method, scheme, host, port, path, decision, reason, rule_id, message, policy_version,
    interception, status, bytes_up, bytes_down, duration_ms, upstream_ip, credential_ids, extra
    fields (MCP), then the writer's seq and prev_hash. The key is event + agent + method..
    interception + upstream_ip..extras: everything but time, ids, ports, sizes and the chain.
    A quote inside a JSON string is always escaped, so a marker like `,"status":` can only be
    a key, and no value before upstream_ip is an object that could hold one. A key is only
    remembered after a line with it was parsed and found to have that layout
    (`standard_layout`); equal slices then mean equal decision inputs. Lines of another shape
    (other record types, a future field order) are parsed in full."""
    if not raw.startswith(b'{"time":"') or not raw.endswith(b'"}'):
        return None
    e = raw.find(b',"event":"', 9)
    a = raw.find(b',"agent":', e)
    i = raw.find(b',"identity":', a)
    m = raw.find(b',"method":', i)
    s = raw.find(b',"status":', m)
    u = raw.find(b',"upstream_ip":', s)
    q = raw.rfind(b',"seq":')
    if not 0 < e < a < i < m < s < u < q:
        return None
    return raw[e + 10:raw.find(b'"', e + 10)], raw[a:i], raw[m:s], raw[u:q]


@dataclass(slots=True)
class Group:
    kind: str
    agent: str
    host: str
    old: tuple[str, str | None, str | None]  # verdict, reason, rule
    new: tuple[str, str, str | None, str | None, str]  # verdict, reason, rule, rule origin, stage
    count: int = 0
    first_seen: str = ""
    last_seen: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "agent": self.agent, "host": self.host, "count": self.count,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "old": {"decision": self.old[0], "reason": self.old[1], "rule_id": self.old[2]},
                "new": {"decision": self.new[0], "reason": self.new[1], "rule_id": self.new[2],
                        "rule_origin": self.new[3], "stage": self.new[4]},
                "examples": self.examples}


@dataclass(frozen=True, slots=True)
class Redecision:
    """What the new rules do with one record (memoised: identical inputs, identical answer)."""

    decision: Decision | None = None
    stage: str = ""
    rule_origin: str | None = None
    not_replayed: str | None = None  # a WHY_TEXT key
    refused_earlier: bool = False  # its tunnel / HTTP request is refused first
    mcp_carrier: bool = False  # an HTTP request whose MCP messages decide it
    interception: str | None = None
    credentials: tuple[str, ...] | None = None
    raw_tcp: bool | None = None  # a passthrough tunnel: may it carry bytes that are not TLS


class Replay:
    def __init__(self, rules: RuleSet, examples: int = 3) -> None:
        self.rules = rules
        self.examples = examples
        self.memo: dict[tuple[Any, ...], Redecision] = {}
        self.fast: dict[tuple[bytes, ...], Effect] = {}
        self.groups: dict[tuple[Any, ...], Group] = {}
        self.events: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.records = 0
        self.unparsable = 0
        self._mcp: tuple[McpPolicies, PinStore] | None = None

    # -- deciding -------------------------------------------------------------------------------
    def _addresses(self, host: str, upstream: Any) -> tuple[IPAddress, ...] | None:
        if host in self.rules.hosts_file:
            return None  # plan() uses the new hosts file: what the new rules would resolve to
        ip = parse_ip(upstream) if isinstance(upstream, str) else None
        return (ip,) if ip is not None else None

    def _from_plan(self, p: Plan, **extra: Any) -> Redecision:
        if not p.complete:
            return Redecision(not_replayed="address_unknown")
        return Redecision(p.decision, p.final.stage.value, p.final.rule_origin,
                          interception=p.interception.value if p.interception else None, raw_tcp=p.raw_tcp, **extra)

    def _connect(self, r: dict[str, Any]) -> Redecision:
        host, port = str(r.get("host")), int(r.get("port") or 443)
        p = plan(self.rules, r["agent"], "https", host, port, None, None, self._addresses(host, r.get("upstream_ip")))
        return self._from_plan(p)

    def _http(self, r: dict[str, Any]) -> tuple[Plan | None, Redecision | None]:
        """The plan of the HTTP request a request/mcp record describes, or why there is none."""
        layer = r.get("interception")
        # "explain": a request inside a tunnel the old rules refused (answered with the refusal)
        if layer not in ("intercept", "plain", "explain"):
            return None, Redecision(not_replayed="unknown_layer")
        scheme = "https" if layer != "plain" else str(r.get("scheme") or "http")
        host, port = str(r.get("host")), int(r.get("port") or (443 if scheme == "https" else 80))
        p = plan(self.rules, r["agent"], scheme, host, port, str(r.get("method") or "GET"), str(r.get("path") or "/"),
                 self._addresses(host, r.get("upstream_ip")))
        if not p.complete:
            return None, Redecision(not_replayed="address_unknown")
        if not p.decision.allowed and p.final.stage in (StageName.CONNECT, StageName.ADDRESSES) and scheme == "https":
            return None, Redecision(p.decision, p.final.stage.value, p.final.rule_origin, refused_earlier=True)
        return p, None

    def _request(self, r: dict[str, Any]) -> Redecision:
        p, early = self._http(r)
        if p is None:
            assert early is not None
            return early
        if p.decision.allowed and p.mcp_server is not None:
            # The proxy records the MCP verdict on the HTTP request when it answered every
            # message itself; the mcp records (compared on their own) carry the decisions.
            return Redecision(p.decision, p.final.stage.value, mcp_carrier=True)
        return self._from_plan(p, credentials=p.credentials)

    def _mcp_call(self, r: dict[str, Any]) -> Redecision:
        p, early = self._http(r)
        if p is None:
            assert early is not None
            return Redecision(early.decision, early.stage, early.rule_origin, early.not_replayed,
                              refused_earlier=early.decision is not None)
        if not p.decision.allowed:
            return Redecision(p.decision, p.final.stage.value, p.final.rule_origin, refused_earlier=True)
        if p.mcp_server is None:
            return self._from_plan(p)  # no longer a declared server: the ordinary rules decided the request
        method = r.get("mcp_method")
        if not isinstance(method, str) or method == "stream":
            return Redecision(not_replayed="no_decision")
        if method == "completion/complete":
            return Redecision(not_replayed="mcp_completion")
        if self._mcp is None:
            self._mcp = mcp_decider_for(self.rules)
        policies, pins = self._mcp
        server = next(s for s in self.rules.model.mcp_servers if s.id == p.mcp_server)
        params: dict[str, Any] = {}
        if method == "tools/call":
            tool = r.get("mcp_tool")
            if tool is not None:
                params["name"] = tool
            values = r.get("mcp_argument_values")
            policy = policies.policy(r["agent"], server.id)
            if isinstance(values, dict):
                params["arguments"] = values
            elif policy is not None and isinstance(tool, str) and policy.validators.get(tool):
                return Redecision(not_replayed="mcp_arguments")
            else:
                params["arguments"] = {k: None for k in r.get("mcp_argument_keys") or ()}
        elif r.get("mcp_resource") is not None:
            params["uri"] = r["mcp_resource"]
        elif r.get("mcp_prompt") is not None:
            params["name"] = r["mcp_prompt"]
        md = decide_mcp(policies, pins, r["agent"], server, {"jsonrpc": "2.0", "id": 1, "method": method,
                                                             "params": params})
        origin = rule_origins(self.rules).rules.get(md.decision.rule_id) if md.decision.rule_id else None
        return Redecision(md.decision, "mcp", origin)

    def _key(self, event: str, r: dict[str, Any]) -> tuple[Any, ...]:
        path = r.get("path")
        bare = path.split("?", 1)[0] if isinstance(path, str) else path
        base = (event, r.get("agent"), r.get("interception"), r.get("scheme"), r.get("host"), r.get("port"),
                r.get("method"), bare, r.get("upstream_ip"))
        if event == "mcp":
            values = r.get("mcp_argument_values")
            return (*base, r.get("mcp_method"), r.get("mcp_tool"), r.get("mcp_resource"), r.get("mcp_prompt"),
                    tuple(r.get("mcp_argument_keys") or ()),
                    json.dumps(values, sort_keys=True, default=str) if values is not None else None)
        return base

    def redecide(self, event: str, r: dict[str, Any]) -> Redecision:
        key = self._key(event, r)
        found = self.memo.get(key)
        if found is None:
            if event == "connect":
                found = self._connect(r)
            elif event == "request":
                found = self._request(r)
            else:
                found = self._mcp_call(r)
            if len(self.memo) >= MEMO_LIMIT:
                self.memo.clear()  # bounded memory; traffic repeats, so it refills with what is hot
            self.memo[key] = found
        return found

    # -- recording ------------------------------------------------------------------------------
    def classify(self, r: dict[str, Any]) -> Effect:
        """What one record does to the report; depends only on the fields `fast_key` covers."""
        event = r["event"]
        if event == "tunnel_close":
            return self._tunnel_close(r)
        if event not in REPLAYED_EVENTS:
            return (event, False, None, ())
        old_verdict, old_reason = r.get("decision"), r.get("reason")
        if not r.get("agent"):
            return (event, True, None, (("not_replayed", "no_agent"),))
        if old_verdict not in ("allow", "deny", "report"):
            return (event, True, None, (("not_replayed", "no_decision"),))
        if old_reason in RULE_INDEPENDENT:
            return (event, True, "rule_independent", ())
        why = NOT_REPLAYABLE.get(str(old_reason))
        if why is not None:
            return (event, True, None, (("not_replayed", why),))
        new = self.redecide(event, r)
        if new.not_replayed is not None:
            return (event, True, None, (("not_replayed", new.not_replayed),))
        if new.mcp_carrier:
            return (event, True, "mcp_carriers", ())
        if new.refused_earlier:
            return (event, True, "unchanged" if old_verdict == "deny" else "refused_earlier", ())
        assert new.decision is not None
        d = new.decision
        agent, host = str(r.get("agent")), str(r.get("host"))
        old = (str(old_verdict), old_reason, r.get("rule_id"))
        new_key = (d.verdict.value, d.reason.value, d.rule_id, new.rule_origin, new.stage)
        new_verdict = d.verdict.value
        keys: list[tuple[Any, ...]] = []
        counter = None
        if new_verdict == old_verdict:
            counter = "unchanged"
        elif new_verdict == "deny":
            keys.append(("newly_denied", agent, host, old, new_key))
        elif old_verdict == "deny":
            keys.append(("newly_allowed", agent, host, old, new_key))
        else:
            keys.append(("report_changed", agent, host, old, new_key))
        if old_verdict != "deny" and d.verdict is not Verdict.DENY:
            if event == "connect" and new.interception and r.get("interception") and \
                    new.interception != r["interception"]:
                keys.append(("interception_changed", agent, host, (str(r["interception"]), old_reason,
                                                                   r.get("rule_id")),
                             (new.interception, *new_key[1:])))
            creds = tuple(r.get("credential_ids") or ())
            if event == "request" and new.credentials is not None and creds != new.credentials:
                keys.append(("credentials_changed", agent, host, (",".join(creds) or "-", old_reason,
                                                                  r.get("rule_id")),
                             (",".join(new.credentials) or "-", *new_key[1:])))
        return (event, True, counter, tuple(keys))

    def _tunnel_close(self, r: dict[str, Any]) -> Effect:
        """A tunnel that carried raw bytes, replayed for `raw_tcp`: would its new rule refuse
        them? Its CONNECT is decided as its connect record is (same memo entry); a tunnel the
        new rules deny or intercept counts there (newly_denied, interception_changed)."""
        if r.get("carried_tls") is not False or not r.get("agent") or r.get("decision") not in ("allow", "report"):
            return ("tunnel_close", False, None, ())
        new = self.redecide("connect", r)
        if new.not_replayed is not None:
            return ("tunnel_close", True, None, (("not_replayed", new.not_replayed),))
        d = new.decision
        if d is None or d.verdict is Verdict.DENY or new.interception != "passthrough" or new.raw_tcp:
            return ("tunnel_close", True, None, ())
        old = (str(r.get("decision")), r.get("reason"), r.get("rule_id"))
        new_key = ("tls only", d.reason.value, d.rule_id, new.rule_origin, new.stage)
        return ("tunnel_close", True, None, (("raw_tcp_removed", str(r["agent"]), str(r.get("host")), old, new_key),))

    def apply(self, effect: Effect, file: str, number: int, when: str, record: dict[str, Any] | None,
              raw: bytes) -> None:
        event, replayed, counter, keys = effect
        self.records += 1
        counts = self.events if replayed else self.skipped
        counts[event] = counts.get(event, 0) + 1
        if counter is not None:
            self.counters[counter] = self.counters.get(counter, 0) + 1
        for key in keys:
            g = self.groups.get(key)
            if g is None:
                if key[0] == "not_replayed":
                    g = Group(key[1], "", "", ("", None, None), ("", "", None, None, ""))
                else:
                    g = Group(key[0], key[1], key[2], key[3], key[4])
                self.groups[key] = g
            g.count += 1
            if when and (not g.first_seen or when < g.first_seen):
                g.first_seen = when
            if when > g.last_seen:
                g.last_seen = when
            if len(g.examples) < self.examples:
                if record is None:
                    record = json.loads(raw)
                g.examples.append(self._example(file, number, record))

    def feed(self, file: str, number: int, raw: bytes) -> None:
        """One line of an audit file (already stripped of any log-shipper prefix)."""
        fk = fast_key(raw)
        if fk is not None:
            effect = self.fast.get(fk)
            if effect is not None:
                # the time is only needed by groups; most records only bump counters
                self.apply(effect, file, number, raw[9:raw.find(b'"', 9)].decode() if effect[3] else "", None, raw)
                return
        parsed = parse_line(raw)
        if parsed is None:
            self.unparsable += 1
            return
        record = parsed[1]
        effect = self.classify(record)
        if fk is not None and standard_layout(record):
            if len(self.fast) >= MEMO_LIMIT:
                self.fast.clear()
            self.fast[fk] = effect
        self.apply(effect, file, number, str(record.get("time") or ""), record, raw)

    def _example(self, file: str, number: int, r: dict[str, Any]) -> dict[str, Any]:
        ex = {"file": file, "line": number, "time": r.get("time"), "event": r.get("event"), "agent": r.get("agent"),
              "request_id": r.get("request_id"), "method": r.get("method"), "scheme": r.get("scheme"),
              "host": r.get("host"), "port": r.get("port"), "path": r.get("path")}
        for k in ("mcp_server", "mcp_method", "mcp_tool", "mcp_resource", "mcp_prompt"):
            if r.get(k) is not None:
                ex[k] = r[k]
        return ex

    # -- reporting -------------------------------------------------------------------------------
    def report(self, files: list[str], seconds: float, cpu_seconds: float, reader: Reader) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for kind in KINDS:
            groups = sorted((g for k, g in self.groups.items() if k[0] == kind),
                            key=lambda g: (-g.count, g.agent, g.host))
            changes[kind] = {"records": sum(g.count for g in groups), "groups": [g.to_json() for g in groups]}
        skipped = sorted((g for k, g in self.groups.items() if k[0] == "not_replayed"), key=lambda g: -g.count)
        not_replayed = [{"why": g.kind, "text": WHY_TEXT[g.kind], "count": g.count, "first_seen": g.first_seen,
                         "last_seen": g.last_seen, "examples": g.examples} for g in skipped]
        return {
            "rules": self.rules.model.rules_dir, "policy_version": self.rules.version, "files": files,
            "records": self.records, "lines": reader.lines, "unparsable_lines": reader.unparsable + self.unparsable,
            "read_errors": reader.errors, "seconds": round(seconds, 3),
            "records_per_second": round(self.records / seconds) if seconds > 0 else None,
            "cpu_seconds": round(cpu_seconds, 3),
            "records_per_cpu_second": round(self.records / cpu_seconds) if cpu_seconds > 0 else None,
            "events": self.events, "skipped_events": self.skipped,
            "unchanged": self.counters.get("unchanged", 0),
            "rule_independent": self.counters.get("rule_independent", 0),
            "requests_in_refused_tunnels": self.counters.get("refused_earlier", 0),
            "mcp_carrier_requests": self.counters.get("mcp_carriers", 0),
            "changes": changes, "not_replayed": not_replayed, "limits": LIMITS,
        }


def _fmt_group(g: dict[str, Any]) -> list[str]:
    old, new = g["old"], g["new"]
    where = f" [{new['rule_origin']}]" if new.get("rule_origin") else ""
    lines = [f"  {g['count']:>8}  agent {g['agent']}  host {g['host']}",
             f"            was {old['decision']} ({old['reason']}, rule {old['rule_id'] or '-'}) -> "
             f"{new['decision']} ({new['reason']}, rule {new['rule_id'] or '-'}{where}) at {new['stage']}",
             f"            first {g['first_seen']}  last {g['last_seen']}"]
    for ex in g["examples"]:
        what = f"{ex.get('mcp_method')} {ex.get('mcp_tool') or ex.get('mcp_resource') or ''}".strip() if \
            ex["event"] == "mcp" else f"{ex.get('method')} {ex.get('path') or ''}".strip()
        lines.append(f"            e.g. {ex['event']} {what}  ({ex['file']}:{ex['line']}, {ex['time']})")
    return lines


TITLES = {"newly_denied": "NEWLY DENIED", "newly_allowed": "NEWLY ALLOWED",
          "report_changed": "REPORT CHANGES (allow <-> report)",
          "interception_changed": "INTERCEPTION CHANGES (was -> now)",
          "credentials_changed": "CREDENTIAL CHANGES (injected ids: was -> now)",
          "raw_tcp_removed": "TUNNELS THAT CARRIED RAW TCP, NOW TLS ONLY (would be refused: the rule lost raw_tcp)"}


def render_text(rep: dict[str, Any], max_groups: int) -> str:
    out = [f"warden replay: {rep['records']:,} records from {len(rep['files'])} files against {rep['rules']} "
           f"(policy version {rep['policy_version']}) in {rep['seconds']} s"
           + (f", {rep['records_per_second']:,} records/s" if rep["records_per_second"] else "")
           + (f" ({rep['records_per_cpu_second']:,} per CPU second)" if rep["records_per_cpu_second"] else "")]
    ev = ", ".join(f"{k} {v:,}" for k, v in sorted(rep["events"].items())) or "none"
    out.append(f"  decided again: {ev}; unchanged {rep['unchanged']:,}")
    if rep["requests_in_refused_tunnels"]:
        out.append(f"  {rep['requests_in_refused_tunnels']:,} requests/MCP messages would not happen: their tunnel or "
                   f"HTTP request is refused first (counted there)")
    for kind in KINDS:
        c = rep["changes"][kind]
        if not c["groups"]:
            continue
        out.append(f"\n{TITLES[kind]}: {c['records']:,} records in {len(c['groups'])} groups")
        for g in c["groups"][:max_groups]:
            out += _fmt_group(g)
        if len(c["groups"]) > max_groups:
            out.append(f"  ... {len(c['groups']) - max_groups} more groups (--max-groups, or --json)")
    if not any(rep["changes"][k]["groups"] for k in KINDS):
        out.append("\nno changes: every replayed record is decided the same way")
    if rep["not_replayed"]:
        out.append("\nNOT REPLAYED (the audit log does not hold what these decisions need):")
        for item in rep["not_replayed"]:
            out.append(f"  {item['count']:>8}  {item['text']}")
    if rep["rule_independent"]:
        out.append(f"  {rep['rule_independent']:,} rule-independent denials (fronting, MCP header mismatch) "
                   f"assumed unchanged")
    if rep["unparsable_lines"] or rep["read_errors"]:
        out.append(f"\n{rep['unparsable_lines']:,} lines were not audit records and were skipped")
        out += [f"  error: {e}" for e in rep["read_errors"]]
    out.append("\nLimits: " + " ".join(rep["limits"]))
    return "\n".join(out)


def replay_files(rules: RuleSet, files: Iterable[str], examples: int = 3) -> dict[str, Any]:
    """Replay audit files under `rules`; the report as a JSON-ready dict."""
    files = list(files)
    reader = Reader(files)
    replay = Replay(rules, examples)
    started, cpu = time.perf_counter(), time.process_time()
    for file, number, raw in reader.raw_lines():
        replay.feed(file, number, raw)
    return replay.report(reader.paths, time.perf_counter() - started, time.process_time() - cpu, reader)


def cmd_replay(args: argparse.Namespace) -> int:
    rules = load_or_report(args.rules, secrets=False)
    if rules is None:
        return 2
    rep = replay_files(rules, args.files, args.examples)
    with quiet_broken_pipe():
        print(json.dumps(rep, indent=2) if args.json else render_text(rep, args.max_groups), flush=True)
    if rep["read_errors"]:
        print("\n".join(f"warden: {e}" for e in rep["read_errors"]), file=sys.stderr)
        return 2
    changed = rep["changes"]["newly_denied"]["records"] or rep["changes"]["newly_allowed"]["records"]
    return 3 if args.fail_on_change and changed else 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = sub.add_parser("replay", help="re-decide recorded traffic under proposed rules and report what changes")
    replay.add_argument("--rules", required=True, metavar="NEW_DIR", help="the proposed rules directory")
    replay.add_argument("files", nargs="+", metavar="AUDIT_FILE",
                        help="audit files (rotated, .gz, worker chains; '-' for stdin), in any order")
    replay.add_argument("--json", action="store_true", help="print the report as JSON (for bots)")
    replay.add_argument("--examples", type=int, default=3, metavar="N", help="example records per group (default 3)")
    replay.add_argument("--max-groups", type=int, default=20, metavar="N",
                        help="groups shown per kind in the text report (default 20; --json shows all)")
    replay.add_argument("--fail-on-change", action="store_true",
                        help="exit 3 if anything is newly denied or newly allowed (for CI)")
    replay.set_defaults(func=cmd_replay)
