"""Credential binding, injection planning, leak scanning and response redaction (pure).

No mitmproxy imports: the addon (`stages/credentials.py`) adapts flows to these functions,
the benchmark and unit tests call them directly.

Binding: a credential applies to a request only when one of the agent's policies holds it,
the request is intercepted TLS (never plain HTTP: a secret would cross the network in clear
text), and its host/domain, port, method and canonical path all match.

Leak scanning: every resolved secret of the rule set (raw, base64 std/urlsafe at each of the
three byte alignments so it is found inside a longer base64 text such as Basic auth,
percent-encoded with upper/lower hex, `+` for space, JSON-escaped) and every credential's
placeholder are compiled into ONE Aho-Corasick automaton per RuleSet, so a request is scanned
in a single pass whatever the number of secrets. A hit is a leak unless the secret or
placeholder belongs to a credential bound to this very request.

Nothing here ever puts a secret value into an exception, a message or a repr.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote_plus

import ahocorasick

from .derived import derived
from .paths import PathError, canonical_path
from .ruleset import CompiledAgent, CompiledCredential, RuleSet

REDACTED = b"[REDACTED by warden]"
_BASE64_ENCODINGS = frozenset({"base64", "base64url"})
REDACTED_TEXT = REDACTED.decode()
MIN_ENCODED_LENGTH = 8  # shorter encoded fragments would match random text


@dataclass(frozen=True, slots=True)
class _Pattern:
    kind: str  # "secret" | "placeholder"
    encoding: str  # raw | base64 | base64url | urlencoded | json
    owners: frozenset[str]  # credential ids this value belongs to
    redact: bool  # secret of a credential with redact_response
    length: int


@dataclass(frozen=True, slots=True)
class Leak:
    """A secret or placeholder seen where it does not belong. Holds no secret value."""

    kind: str
    encoding: str
    credentials: tuple[str, ...]
    where: str

    def message(self) -> str:
        what = "a credential placeholder" if self.kind == "placeholder" else "a secret Warden holds"
        enc = "" if self.encoding == "raw" else f" ({self.encoding}-encoded)"
        creds = ", ".join(self.credentials)
        return (f"the request {self.where} carries {what}{enc} of credential {creds}, which may only be sent "
                f"to that credential's destination; do not copy credentials between hosts")


def _b64_cores(value: bytes) -> Iterable[tuple[str, bytes]]:
    """Base64 fragments of `value` that appear whatever bytes surround it, at each alignment."""
    n = len(value)
    for k in range(3):
        enc = base64.b64encode(b"\x00" * k + value)
        start = -(-8 * k // 6)
        end = (8 * (k + n)) // 6
        core = enc[start:end]
        yield "base64", core
        yield "base64url", core.replace(b"+", b"-").replace(b"/", b"_")


def encodings(value: str) -> dict[bytes, str]:
    """Every byte form of `value` the scanner looks for -> its encoding name."""
    raw = value.encode("utf-8")
    forms: dict[bytes, str] = {raw: "raw"}
    for name, core in _b64_cores(raw):
        if len(core) >= MIN_ENCODED_LENGTH:
            forms.setdefault(core, name)
    for enc in (quote(value, safe=""), quote_plus(value, safe="")):
        b = enc.encode("ascii")
        forms.setdefault(b, "urlencoded")
        forms.setdefault(_lower_hex(b), "urlencoded")
    j = json.dumps(value)[1:-1].encode("ascii")
    forms.setdefault(j, "json")
    forms.setdefault(j.replace(b"/", b"\\/"), "json")
    return forms


def _lower_hex(b: bytes) -> bytes:
    out = bytearray(b)
    i = 0
    while i < len(out):
        if out[i] == 0x25 and i + 2 < len(out):  # '%'
            out[i + 1 : i + 3] = bytes(out[i + 1 : i + 3]).lower()
            i += 3
        else:
            i += 1
    return bytes(out)


# -- disguised bodies -------------------------------------------------------------------------
# An agent that wants a secret out unnoticed can write it in the body's own syntax: every byte
# percent-encoded (any URL decoder reverses it), a JSON string of \uXXXX escapes (json.loads
# gives it back), base64 broken by line breaks or junk (non-strict base64 decoders skip
# anything outside the alphabet). The automaton only knows fixed spellings, so request bodies
# are also scanned in normalised views: percent-decoding and JSON-unescaping repeated until
# nothing changes (at most MAX_UNWRAP rounds: `%2567`, `\u0025` + hex, percent-encoded `\u`
# escapes), then only base64-alphabet bytes kept (in that last view only base64 spellings count:
# dropping spaces joins words, and a word-like placeholder must not match prose).
# Cost is linear: only valid escapes are matched (a body of bare `%` or `\` costs a regex scan),
# and the stream scanner re-scans its window only once enough new bytes arrived.
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_HEX_DIGITS = "0123456789abcdefABCDEF"
_HEX_BYTE = {(hi + lo).encode(): bytes([int(hi + lo, 16)])  # every case mix: no .lower() per escape
             for hi in _HEX_DIGITS for lo in _HEX_DIGITS}
_JSON_PAIR = re.compile(rb"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})")
_JSON_ESCAPE = re.compile(rb'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_JSON_SIMPLE = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r",
                b"t": b"\t"}
_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64_ALPHABET)  # bytes.translate: ~40x a regex
SQUEEZED = "base64 alphabet only"
MAX_UNWRAP = 3  # %252567, \u0025 + hex...; each round costs a pass over the body
DISGUISE_GROWTH = 18  # longest spelling per byte: %5Cu00XX (percent-encoded \u00XX)


def _percent(m: re.Match[bytes]) -> bytes:
    return _HEX_BYTE[m[1]]


def _json_pair(m: re.Match[bytes]) -> bytes:
    hi, lo = int(m[1], 16), int(m[2], 16)
    return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)).encode("utf-8")


def _json_escape(m: re.Match[bytes]) -> bytes:
    if m[2] is not None:
        return _JSON_SIMPLE[m[2]]
    cp = int(m[1], 16)
    return m[0] if 0xD800 <= cp <= 0xDFFF else chr(cp).encode("utf-8")  # a lone surrogate stays


def disguise_views(data: bytes) -> list[tuple[str, bytes]]:
    """The normalised views of `data` that differ from it (and from each other): (name, bytes)."""
    views: list[tuple[str, bytes]] = []
    view = data
    for _ in range(MAX_UNWRAP):
        before = view
        if b"%" in view:
            decoded = _PERCENT.sub(_percent, view)
            if decoded != view:
                views.append(("percent-decoded", decoded))
                view = decoded
        if b"\\" in view:
            unescaped = _JSON_ESCAPE.sub(_json_escape, _JSON_PAIR.sub(_json_pair, view))
            if unescaped != view:
                views.append(("JSON-unescaped", unescaped))
                view = unescaped
        if view == before:
            break
    squeezed = view.translate(None, _NOT_BASE64)
    if squeezed != view:
        views.append((SQUEEZED, squeezed))
    return views


class Scanner:
    """One automaton over every secret and placeholder of a RuleSet."""

    def __init__(self, credentials: Iterable[CompiledCredential]) -> None:
        table: dict[bytes, tuple[str, str, set[str], bool]] = {}
        for cred in credentials:
            for secret in cred.secrets:
                for form, enc in encodings(secret.value).items():
                    kind, e, owners, redact = table.get(form, ("secret", enc, set(), False))
                    owners.add(cred.id)
                    table[form] = ("secret", e, owners, redact or cred.redact_response)
            if cred.placeholder:  # every spelling a secret has (README: raw, base64, URL, JSON)
                for form, enc in encodings(cred.placeholder).items():
                    if form not in table:  # a placeholder equal to a secret stays a secret
                        table[form] = ("placeholder", enc, set(), False)
                    table[form][2].add(cred.id)
        self.automaton: ahocorasick.Automaton | None = None
        self.folded: ahocorasick.Automaton | None = None
        self.max_len = 0
        if not table:
            return
        automaton = ahocorasick.Automaton()
        for form, (kind, enc, owners, redact) in table.items():
            key = form.decode("latin-1")  # bytes <-> str 1:1, the automaton is str-keyed
            automaton.add_word(key, _Pattern(kind, enc, frozenset(owners), redact, len(key)))
            self.max_len = max(self.max_len, len(key))
        automaton.make_automaton()
        self.automaton = automaton
        # For Warden's own records only (`scrub`): the raw secrets and placeholders, ASCII-lowercased.
        # Host names are lowercased before they are recorded, so a secret used as a CONNECT host
        # (`CONNECT <secret>.example:443`) would otherwise land in the audit case-folded, which
        # costs an attacker who reads the audit one bit per letter to undo.
        folded = ahocorasick.Automaton()
        for form, (_kind, enc, _owners, _redact) in table.items():
            if enc == "raw":
                key = _fold(form.decode("latin-1"))
                folded.add_word(key, len(key))
        folded.make_automaton()
        self.folded = folded

    # -- leaks ----------------------------------------------------------------------------
    def find_leak(self, data: bytes | str, bound: frozenset[str], where: str,
                  placeholders_bound: bool = True) -> Leak | None:
        """The first secret/placeholder in `data` that belongs to no credential in `bound`.
        `placeholders_bound=False`: a placeholder is a leak even of a bound credential (it is
        replaced only in headers, and in the URL with allow_secret_in_url)."""
        found = self.first_leak(data, bound, where, placeholders_bound)
        return found[0] if found is not None else None

    def first_leak(self, data: bytes | str, bound: frozenset[str], where: str,
                   placeholders_bound: bool = True,
                   only_encodings: frozenset[str] | None = None) -> tuple[Leak, int] | None:
        """(leak, index where the leaked value starts) of the first unbound hit, or None."""
        if self.automaton is None or not data:
            return None
        text = data.decode("latin-1") if isinstance(data, bytes) else data
        for end, pattern in self.automaton.iter(text):
            if only_encodings is not None and pattern.encoding not in only_encodings:
                continue
            exempt = bound and not pattern.owners.isdisjoint(bound)
            if exempt and (placeholders_bound or pattern.kind != "placeholder"):
                continue
            leak = Leak(pattern.kind, pattern.encoding, tuple(sorted(pattern.owners)), where)
            return leak, end - pattern.length + 1
        return None

    def find_disguised_leak(self, data: bytes, bound: frozenset[str], where: str) -> Leak | None:
        """`find_leak` over `data` and each of its normalised views (see `disguise_views`);
        placeholders are leaks even of a bound credential, as everywhere in a body."""
        return self.find_leak(data, bound, where, placeholders_bound=False) or self.view_leak(data, bound, where)

    def view_leak(self, data: bytes, bound: frozenset[str], where: str) -> Leak | None:
        """The first leak in one of `data`'s normalised views (not in `data` itself)."""
        if self.automaton is None:
            return None
        for name, view in disguise_views(data):
            found = self.first_leak(view, bound, f"{where} ({name})", placeholders_bound=False,
                                    only_encodings=_BASE64_ENCODINGS if name == SQUEEZED else None)
            if found is not None:
                return found[0]
        return None

    def hold_from(self, text: str) -> int:
        """Index from which `text`'s tail could be the start of a pattern continued later."""
        n = len(text)
        assert self.automaton is not None
        for p in range(max(0, n - self.max_len + 1), n):
            if self.automaton.match(text[p:]):
                return p
        return n

    # -- redaction ------------------------------------------------------------------------
    def _spans(self, text: str, only: frozenset[str] | None, force: bool = False,
               placeholders: bool = False) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        assert self.automaton is not None
        for end, pattern in self.automaton.iter(text):
            if pattern.kind == "placeholder":
                if not placeholders:
                    continue
            elif not (pattern.redact or force):
                continue
            if only is not None and pattern.owners.isdisjoint(only):
                continue
            spans.append((end - pattern.length + 1, end + 1))
        return _merge(spans) if spans else spans

    def redact(self, data: bytes, only: frozenset[str] | None = None, force: bool = False) -> tuple[bytes, int]:
        """`data` with every secret (any encoding) replaced; and how many were replaced.

        Only secrets of credentials with redact_response (and in `only`, if given), unless
        `force` (used for Warden's own records, which must never hold a secret)."""
        if self.automaton is None or not data:
            return data, 0
        text = data.decode("latin-1")
        spans = self._spans(text, only, force)
        if not spans:
            return data, 0
        return _splice(data, spans, REDACTED), len(spans)

    def scrub(self, text: str) -> tuple[str, int]:
        """`text` with every secret AND placeholder of the rule set, in every encoding the
        automaton knows, replaced: for Warden's own records (audit, alerts, logs)."""
        if self.automaton is None or not text:
            return text, 0
        spans = self._spans(text, None, force=True, placeholders=True)
        assert self.folded is not None
        spans += [(end - length + 1, end + 1) for end, length in self.folded.iter(_fold(text))]
        if not spans:
            return text, 0
        spans = _merge(spans)
        return _splice(text, spans, REDACTED_TEXT), len(spans)

    def redact_str(self, value: str, only: frozenset[str] | None = None, force: bool = False) -> tuple[str, int]:
        data, n = self.redact(value.encode("utf-8", "surrogateescape"), only, force)
        return (data.decode("utf-8", "surrogateescape") if n else value), n


def _fold(text: str) -> str:
    """ASCII lowercase, length-preserving (str.lower() is not, for a few characters)."""
    return text.encode("latin-1", "replace").lower().decode("latin-1")


def _splice[S: (bytes, str)](data: S, spans: list[tuple[int, int]], filler: S) -> S:
    """`data` with each (sorted, non-overlapping) span replaced by `filler`."""
    out, last = [], 0
    for s, e in spans:
        out.append(data[last:s])
        out.append(filler)
        last = e
    out.append(data[last:])
    return data[:0].join(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans = sorted(spans)
    merged = [spans[0]]
    for s, e in spans[1:]:
        if s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


@derived
def scanner_for(rules: RuleSet) -> Scanner:
    """The scanner of a RuleSet (built with it; see core.derived)."""
    return Scanner(rules.credentials_by_id.values())


# -- binding and injection ----------------------------------------------------------------
def bound_credentials(rules: RuleSet, agent: CompiledAgent, host: str, port: int, scheme: str, method: str,
                      path: str, intercepted: bool) -> list[CompiledCredential]:
    """The agent's credentials that apply to this request (empty unless intercepted TLS)."""
    if not intercepted or scheme != "https":
        return []
    creds = rules.credentials_for(agent, host)
    if not creds:
        return []
    try:
        canonical = canonical_path(path)
    except PathError:
        return []
    method = method.upper()
    return [c for c in creds if c.rule.port_ok(port, scheme) and c.rule.method_ok(method) and c.rule.path_ok(canonical)]


def strip_names(agent: CompiledAgent, bound: Sequence[CompiledCredential]) -> frozenset[str]:
    """Lowercased header names to remove: every policy-level strip plus the bound credentials'."""
    names: set[str] = set()
    for policy in agent.policies:
        names.update(policy.strip)
    for cred in bound:
        names.update(cred.strip)
    return frozenset(names)


def decoded_url(path: str) -> str | None:
    """`path` with every %XX (and `+` as space) decoded, byte for byte (latin-1, as the automaton
    sees bytes); None when nothing is encoded. Servers decode URLs, so `%67hp_...` is the secret
    `ghp_...` to them, though no single encoding the scanner knows spells it that way."""
    if "%" not in path and "+" not in path:
        return None
    decoded = unquote_plus(path, encoding="latin-1")
    return decoded if decoded != path else None


def headers_text(headers: Iterable[tuple[str, str]]) -> str:
    """The text scanned for a request's headers (one string: one automaton pass)."""
    return "\n".join(f"{k}: {v}" for k, v in headers)


def target_text(method: str, host: str, path: str) -> str:
    """The text scanned for a request's method, host and URL; the URL as sent and percent-decoded."""
    parts = [method, host, path]
    decoded = decoded_url(path)
    if decoded is not None:
        parts.append(decoded)
    return "\n".join(parts)


def replace_placeholders(value: str, bound: Sequence[CompiledCredential]) -> str:
    for cred in bound:
        if cred.placeholder and cred.secrets and cred.placeholder in value:
            value = value.replace(cred.placeholder, cred.secrets[0].value)
    return value


def injections(bound: Sequence[CompiledCredential]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(headers, query parameters) to set; later credentials do not override earlier ones."""
    headers: dict[str, tuple[str, str]] = {}
    query: dict[str, tuple[str, str]] = {}
    for cred in bound:
        for name, value in cred.headers:
            headers.setdefault(name.lower(), (name, value))
        if cred.allow_secret_in_url:
            for name, value in cred.query:
                query.setdefault(name, (name, value))
    return list(headers.values()), list(query.values())


# -- streaming ------------------------------------------------------------------------------
FILLER = b"*"


class StreamScanner:
    """Scans a streamed request body chunk by chunk; holds back any tail that could start a pattern.

    `feed(chunk)` returns the bytes safe to forward; `feed(b"")` ends the body. mitmproxy
    cannot kill a flow from inside a stream callable (raising there crashes the connection
    handler and leaves both sides hanging), so on a leak the secret and everything after it
    is replaced by filler of the same length (framing and Content-Length stay valid, no byte
    of the secret leaves), `leak` is set, and the addon replaces the upstream's answer with
    the refusal.
    """

    def __init__(self, scanner: Scanner, bound: frozenset[str]) -> None:
        self.scanner = scanner
        self.bound = bound
        self.pending = ""
        self.leak: Leak | None = None
        # Disguised spellings (see disguise_views) are up to DISGUISE_GROWTH times longer than
        # what they spell and have no fixed prefix to hold back on: the last `window` bytes are
        # always held, so a disguised secret that ends in this chunk started in held bytes.
        self.window = DISGUISE_GROWTH * scanner.max_len
        self.unviewed = 0  # bytes at the end of `pending` not yet scanned in the views

    def feed(self, chunk: bytes) -> bytes:
        if self.leak is not None:
            return FILLER * len(chunk)
        if self.scanner.automaton is None:
            return chunk
        text = self.pending + chunk.decode("latin-1")
        found = self.scanner.first_leak(text, self.bound, "body", placeholders_bound=False)
        if found is not None:
            self.leak, start = found
            self.pending = ""
            return text[:start].encode("latin-1") + FILLER * (len(text) - start)
        self.unviewed += len(chunk)
        if not chunk or self.unviewed >= self.window:
            # The views of everything held: once per `window` new bytes (amortised linear cost
            # even for one-byte chunks), and at the end of the body.
            disguised = self.scanner.view_leak(text.encode("latin-1"), self.bound, "body")
            if disguised is not None:  # where it starts in `text` is unknown: none of `text` leaves
                self.leak = disguised
                self.pending = ""
                return FILLER * len(text)
            self.unviewed = 0
        if not chunk:
            cut = len(text)
        else:  # never forward the last `window` bytes the views have seen, nor any they have not
            cut = min(self.scanner.hold_from(text), max(0, len(text) - self.unviewed - self.window))
        self.pending = text[cut:]
        return text[:cut].encode("latin-1")


class StreamRedactor:
    """Redacts secrets in a response body chunk by chunk (a secret split across chunks too)."""

    def __init__(self, scanner: Scanner, only: frozenset[str] | None = None) -> None:
        self.scanner = scanner
        self.only = only
        self.pending = ""
        self.count = 0

    def feed(self, chunk: bytes) -> bytes:
        if self.scanner.automaton is None:
            return chunk
        text = self.pending + chunk.decode("latin-1")
        if not chunk:
            self.pending = ""
            out, n = self.scanner.redact(text.encode("latin-1"), self.only)
            self.count += n
            return out
        spans = self.scanner._spans(text, self.only)
        cut = self.scanner.hold_from(text)
        for s, e in spans:  # a complete match across the cut: emit it redacted now
            if s < cut < e:
                cut = e
        self.pending = text[cut:]
        head = text[:cut].encode("latin-1")
        out, n = self.scanner.redact(head, self.only)
        self.count += n
        return out
