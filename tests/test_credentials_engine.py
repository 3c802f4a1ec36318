"""Unit tests of the pure credential engine: binding, leak scanning (all encodings), redaction,
streaming with secrets split across chunks."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from egresswarden.core.credentials import (
    FILLER,
    REDACTED,
    Scanner,
    StreamRedactor,
    StreamScanner,
    bound_credentials,
    disguise_views,
    encodings,
    headers_text,
    injections,
    replace_placeholders,
    scanner_for,
    strip_names,
)
from egresswarden.core.errors import RuleSetError
from egresswarden.core.loader import load_ruleset

from .harness import sha256_hex

SECRET = "ghp_TestSecretValue0123456789abcdefXYZ/+="
OTHER = "sk-other-secret-abcdefghijklmnop"
PLACEHOLDER = "WARDEN_PLACEHOLDER_GH"


def _rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cred_extra: dict | None = None):
    monkeypatch.setenv("GH_TOKEN", SECRET)
    monkeypatch.setenv("OTHER_TOKEN", OTHER)
    cred = {"id": "github", "host": "api.github.com", "methods": ["GET", "POST"], "paths": ["/repos/**"],
            "inject": {"Authorization": "Bearer ${secret:GH_TOKEN}"}, "strip": ["Authorization"],
            "placeholder": PLACEHOLDER}
    cred.update(cred_extra or {})
    doc = {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]},
                   {"id": "other", "token_sha256": [sha256_hex("u")], "policies": ["q"]}],
        "policies": {
            "p": {"allow": [{"host": "api.github.com"}, {"host": "evil.test"}],
                  "credentials": [cred], "strip": ["Cookie"]},
            "q": {"allow": [{"host": "api.other.test"}],
                  "credentials": [{"id": "other", "host": "api.other.test",
                                   "inject": {"X-Api-Key": "${secret:OTHER_TOKEN}"}, "redact_response": False}]},
        },
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    return load_ruleset(tmp_path)


def test_binding_requires_interception_host_port_method_path(tmp_path, monkeypatch):
    rules = _rules(tmp_path, monkeypatch)
    coder, other = rules.agent("coder"), rules.agent("other")
    ok = bound_credentials(rules, coder, "api.github.com", 443, "https", "GET", "/repos/a/b", True)
    assert [c.id for c in ok] == ["github"]
    assert bound_credentials(rules, coder, "api.github.com", 443, "https", "GET", "/repos/a/b", False) == []
    assert bound_credentials(rules, coder, "api.github.com", 80, "http", "GET", "/repos/a/b", True) == []
    assert bound_credentials(rules, coder, "api.github.com", 8443, "https", "GET", "/repos/a/b", True) == []
    assert bound_credentials(rules, coder, "api.github.com", 443, "https", "DELETE", "/repos/a", True) == []
    assert bound_credentials(rules, coder, "api.github.com", 443, "https", "GET", "/user", True) == []
    assert bound_credentials(rules, coder, "api.github.com", 443, "https", "GET", "/repos/../user", True) == []
    assert bound_credentials(rules, coder, "evil.test", 443, "https", "GET", "/repos/a", True) == []
    assert bound_credentials(rules, other, "api.github.com", 443, "https", "GET", "/repos/a", True) == []
    assert strip_names(coder, ok) == {"authorization", "cookie"}
    assert strip_names(coder, []) == {"cookie"}
    headers, query = injections(ok)
    assert headers == [("Authorization", f"Bearer {SECRET}")] and query == []


def test_query_injection_needs_allow_secret_in_url(tmp_path, monkeypatch):
    rules = _rules(tmp_path, monkeypatch, {"inject_query": {"token": "${secret:GH_TOKEN}"},
                                           "allow_secret_in_url": True})
    bound = bound_credentials(rules, rules.agent("coder"), "api.github.com", 443, "https", "GET", "/repos/x", True)
    assert injections(bound)[1] == [("token", SECRET)]


def test_missing_secret_names_the_credential(tmp_path, monkeypatch):
    monkeypatch.delenv("GH_TOKEN", raising=False)
    doc = {"agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
           "policies": {"p": {"allow": [{"host": "a.test"}],
                              "credentials": [{"id": "gh-cred", "host": "a.test",
                                               "inject": {"Authorization": "Bearer ${secret:GH_TOKEN_MISSING}"}}]}}}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RuleSetError) as e:
        load_ruleset(tmp_path)
    assert "gh-cred" in str(e.value)


@pytest.mark.parametrize("form", [
    SECRET,
    base64.b64encode(SECRET.encode()).decode(),
    base64.b64encode(SECRET.encode()).decode().rstrip("="),
    base64.urlsafe_b64encode(SECRET.encode()).decode(),
    base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("="),
    base64.b64encode(b"user:" + SECRET.encode()).decode(),  # Basic auth: secret at another alignment
    base64.b64encode(b"x" + SECRET.encode() + b"y").decode(),
    quote(SECRET, safe=""),
    re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(SECRET, safe="")),
    json.dumps({"token": SECRET}),
], ids=["raw", "b64", "b64-nopad", "b64url", "b64url-nopad", "basic", "b64-shifted", "urlenc", "urlenc-lower",
        "json"])
def test_leak_found_in_every_encoding(tmp_path, monkeypatch, form):
    rules = _rules(tmp_path, monkeypatch)
    scanner = scanner_for(rules)
    data = f"prefix {form} suffix".encode()
    leak = scanner.find_leak(data, frozenset(), "body")
    assert leak is not None and leak.kind == "secret" and leak.credentials == ("github",)
    assert SECRET not in leak.message() and form not in leak.message()
    assert scanner.find_leak(data, frozenset({"github"}), "body") is None  # bound: not a leak


def test_placeholder_and_other_agents_secret(tmp_path, monkeypatch):
    rules = _rules(tmp_path, monkeypatch)
    scanner = scanner_for(rules)
    assert scanner is scanner_for(rules)  # built once per RuleSet
    leak = scanner.find_leak(headers_text([("X-T", PLACEHOLDER)]), frozenset(), "headers")
    assert leak is not None and leak.kind == "placeholder"
    assert scanner.find_leak(f"k={OTHER}".encode(), frozenset({"github"}), "body").credentials == ("other",)
    assert scanner.find_leak(b"nothing to see here", frozenset(), "body") is None
    bound = bound_credentials(rules, rules.agent("coder"), "api.github.com", 443, "https", "GET", "/repos/x", True)
    assert replace_placeholders(f"token {PLACEHOLDER}", bound) == f"token {SECRET}"


def test_redaction_all_encodings_and_redact_response_false(tmp_path, monkeypatch):
    rules = _rules(tmp_path, monkeypatch)
    scanner = scanner_for(rules)
    b64 = base64.b64encode(SECRET.encode())
    out, n = scanner.redact(b'{"a":"' + SECRET.encode() + b'","b":"' + b64 + b'"}')
    assert n == 2 and SECRET.encode() not in out and b64 not in out and out.count(REDACTED) == 2
    out, n = scanner.redact(OTHER.encode())  # redact_response: false
    assert n == 0 and out == OTHER.encode()


def test_stream_scanner_split_secret_never_forwarded(tmp_path, monkeypatch):
    rules = _rules(tmp_path, monkeypatch)
    scanner = scanner_for(rules)
    body = b"a" * 5000 + SECRET.encode() + b"b" * 100
    for split in (5001, 5010, 5000 + len(SECRET) - 1):
        s = StreamScanner(scanner, frozenset())
        sent = s.feed(body[:split])
        assert b"ghp_" not in sent and s.leak is None  # not even a prefix of the secret left
        sent += s.feed(body[split:])
        sent += s.feed(b"more after the leak") + s.feed(b"")
        assert s.leak is not None and SECRET not in repr(s.leak)
        assert len(sent) == len(body) + len(b"more after the leak")  # framing preserved
        assert sent == b"a" * 5000 + FILLER * (len(sent) - 5000)
    clean = b"x" * 70000
    s = StreamScanner(scanner, frozenset())
    assert s.feed(clean[:30000]) + s.feed(clean[30000:]) + s.feed(b"") == clean
    s = StreamScanner(scanner, frozenset({"github"}))  # bound: the secret passes
    assert s.feed(body[:5010]) + s.feed(body[5010:]) + s.feed(b"") == body


def _disguises(value: bytes) -> dict[str, bytes]:
    b64 = base64.b64encode(value)
    pct_all = "".join(f"%{b:02X}" for b in value).encode()
    json_u = "".join(f"\\u{b:04x}" for b in value).encode()
    return {
        "percent-every-byte": pct_all,
        "json-unicode-escapes": b'{"note":"' + json_u + b'"}',
        "mime-base64": b64[:8] + b"\r\n" + b64[8:20] + b"\r\n" + b64[20:],
        "base64-with-junk": b"!".join(b64[i:i + 3] for i in range(0, len(b64), 3)),
        "percent-encoded-json-escapes": "".join(f"%{b:02X}" for b in json_u).encode(),
        "percent-encoded-mime-base64": "".join(f"%{b:02X}" for b in b64[:8] + b"\n" + b64[8:]).encode(),
    }


@pytest.mark.parametrize("kind", list(_disguises(b"x")))
def test_disguised_secrets_and_placeholders_are_leaks(tmp_path, monkeypatch, kind):
    """A secret or placeholder written in the body's own syntax is found, buffered or streamed
    (split at every offset of the disguise: it needs no fixed prefix to be held back)."""
    scanner = scanner_for(_rules(tmp_path, monkeypatch))
    for value in (SECRET.encode(), PLACEHOLDER.encode()):
        disguised = _disguises(value)[kind]
        body = b"a=1&" * 300 + disguised + b"&z=2" * 300
        leak = scanner.find_disguised_leak(body, frozenset(), "body")
        assert leak is not None and leak.kind == ("secret" if value == SECRET.encode() else "placeholder")
        assert SECRET not in leak.message() and PLACEHOLDER not in leak.message()
        start = body.index(disguised)
        for split in range(start - 1, start + len(disguised) + 1, 7):
            s = StreamScanner(scanner, frozenset())
            sent = s.feed(body[:split]) + s.feed(body[split:]) + s.feed(b"")
            assert s.leak is not None, (kind, split)
            assert len(sent) == len(body)  # framing preserved
            assert disguised not in sent and disguised[:len(disguised) // 2] not in sent, (kind, split)


def test_disguise_views_leave_clean_bodies_clean(tmp_path, monkeypatch):
    scanner = scanner_for(_rules(tmp_path, monkeypatch))
    bodies = [json.dumps({"text": "caf\u00e9 \\ \"quoted\" 100% sure", "emoji": "\ud83d\ude00"}).encode(),
              b"q=a%20b%2Fc&x=%ZZ&y=%", base64.b64encode(b"hello world, nothing secret here" * 10),
              b"\\ud800 lone surrogate \\u12"]
    for body in bodies:
        assert scanner.find_disguised_leak(body, frozenset(), "body") is None, body
        s = StreamScanner(scanner, frozenset())
        assert s.feed(body[:11]) + s.feed(body[11:]) + s.feed(b"") == body
    assert disguise_views(b"plain") == []
    assert dict(disguise_views(b'"\\u00e9\\ud83d\\ude00"'))["JSON-unescaped"] == '"\u00e9\U0001f600"'.encode()
    # a bound credential's own secret stays allowed in its body, disguised or not
    assert scanner.find_disguised_leak(_disguises(SECRET.encode())["mime-base64"], frozenset({"github"}),
                                       "body") is None


def test_stream_redactor_split_secret(tmp_path, monkeypatch):
    rules = _rules(tmp_path, monkeypatch)
    scanner = scanner_for(rules)
    body = b"x" * 3000 + SECRET.encode() + b"y" * 3000 + SECRET.encode()
    for split in (3001, 3020, 6020):
        r = StreamRedactor(scanner)
        out = r.feed(body[:split]) + r.feed(body[split:]) + r.feed(b"")
        assert SECRET.encode() not in out and out.count(REDACTED) == 2 and r.count == 2
        assert out == b"x" * 3000 + REDACTED + b"y" * 3000 + REDACTED


def test_scanner_without_credentials_is_inert():
    s = Scanner([])
    assert s.find_leak(b"anything", frozenset(), "body") is None
    assert s.redact(b"anything") == (b"anything", 0)
    assert StreamScanner(s, frozenset()).feed(b"abc") == b"abc"
    assert len(encodings("abcdefghij")) > 3


def test_base64_alphabet_view_counts_only_base64_spellings(tmp_path, monkeypatch):
    """Dropping spaces joins words: a word-like placeholder must not match prose (red team 3),
    while MIME-wrapped base64 of it is still a leak."""
    scanner = scanner_for(_rules(tmp_path, monkeypatch, {"placeholder": "githubtoken"}))
    prose = b'{"text":"Create a github token in settings"}'
    assert scanner.find_disguised_leak(prose, frozenset(), "body") is None
    s = StreamScanner(scanner, frozenset())
    assert s.feed(prose[:9]) + s.feed(prose[9:]) + s.feed(b"") == prose and s.leak is None
    wrapped = base64.b64encode(b"githubtoken")
    assert scanner.find_disguised_leak(wrapped[:6] + b"\r\n" + wrapped[6:], frozenset(), "body") is not None


def test_stacked_percent_encoding_is_unwrapped(tmp_path, monkeypatch):
    scanner = scanner_for(_rules(tmp_path, monkeypatch))
    once = quote(SECRET, safe="").encode()
    twice = quote(once.decode(), safe="").encode()
    via_json = b'"' + b"".join(b"\\u0025" + once[i + 1:i + 3] if once[i:i + 1] == b"%" else once[i:i + 1]
                                for i in range(len(once)) if not (i and b"%" in once[max(0, i - 2):i])) + b'"'
    for body in (twice, via_json):
        assert scanner.find_disguised_leak(body, frozenset(), "body") is not None, body
