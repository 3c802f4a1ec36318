"""The one place Warden's own records are scrubbed of secrets and placeholders.

Every audit record (Audit.emit), every alert payload (Alerts) and every log line of the
`warden` logger (RedactingFilter) passes through here. The record is serialised once and
scanned in one pass with the rule set's Aho-Corasick automaton, which knows every secret and
placeholder in every encoding the leak guard checks (raw, base64 at each alignment, URL- and
JSON-escaped). Only when something matched are the record's strings rewritten, so the common
case costs one serialisation and one scan. No field is trusted to be clean: a secret in a
refused path, in a Host header quoted by a message, or used as a CONNECT host is removed
wherever it landed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from egresswarden.core.credentials import Scanner, decoded_url, scanner_for
from egresswarden.core.ruleset import RuleSet
from egresswarden.record.journal import record_json


def _scrub_probe(scanner: Scanner, probe: str) -> tuple[str, int]:
    """Scrub a latin-1 view; a partly percent-encoded secret (`%67hp_...`, as in a refused URL)
    is found in the decoded text, and then the decoded, scrubbed text replaces the value."""
    scrubbed, n = scanner.scrub(probe)
    decoded = decoded_url(scrubbed)
    if decoded is not None:
        clean, m = scanner.scrub(decoded)
        if m:
            return clean, n + m
    return scrubbed, n


def _scrub_text(scanner: Scanner, value: str) -> str:
    # The automaton is keyed on latin-1 views of UTF-8 bytes.
    probe = value.encode("utf-8", "surrogateescape").decode("latin-1")
    scrubbed, n = _scrub_probe(scanner, probe)
    return scrubbed.encode("latin-1", "replace").decode("utf-8", "surrogateescape") if n else value


def _walk(scanner: Scanner, value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(scanner, value)
    if isinstance(value, dict):
        return {_scrub_text(scanner, str(k)): _walk(scanner, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(scanner, v) for v in value]
    return value


def scrub_record(rules: RuleSet | None, record: dict[str, Any]) -> dict[str, Any]:
    """`record` unchanged if it holds no secret or placeholder, else a scrubbed copy."""
    if rules is None:
        return record
    scanner = scanner_for(rules)
    if scanner.automaton is None:
        return record
    text = json.dumps(record, ensure_ascii=False, default=str)
    if not _scrub_probe(scanner, text.encode("utf-8", "surrogateescape").decode("latin-1"))[1]:
        return record
    scrubbed = _walk(scanner, record)
    assert isinstance(scrubbed, dict)
    return scrubbed


def scrubbed_record_json(rules: RuleSet | None, record: dict[str, Any]) -> str:
    """`scrub_record` and `journal.record_json` in one serialisation: the record's journal text,
    scrubbed (re-serialised only when it held a secret or placeholder)."""
    text = record_json(record)
    scanner = scanner_for(rules) if rules is not None else None
    if scanner is None or scanner.automaton is None:
        return text
    if not _scrub_probe(scanner, text.encode("utf-8", "surrogateescape").decode("latin-1"))[1]:
        return text
    scrubbed = _walk(scanner, record)
    assert isinstance(scrubbed, dict)
    return record_json(scrubbed)


def scrub_text(rules: RuleSet | None, text: str) -> str:
    if rules is None:
        return text
    scanner = scanner_for(rules)
    return text if scanner.automaton is None else _scrub_text(scanner, text)


class RedactingFilter(logging.Filter):
    """Scrubs every record of the `warden` logger (message and arguments) before any handler sees it."""

    def __init__(self, current_rules: Callable[[], RuleSet | None]) -> None:
        super().__init__()
        self.current_rules = current_rules

    def filter(self, record: logging.LogRecord) -> bool:
        rules = self.current_rules()
        if rules is None or scanner_for(rules).automaton is None:
            return True
        message = record.getMessage()
        clean = scrub_text(rules, message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
