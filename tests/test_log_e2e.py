"""`warden log` on the audit log of a real `warden run`: lines, filters, --json, colour only on a
terminal, stdin and captured streams, and --follow that shows new denials promptly and keeps
going across the writer's rotation."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import WARDEN, Warden, curl, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def warden(origin_ca, origin_ca_file: Path, shared_confdir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warden]:
    work = tmp_path_factory.mktemp("log-e2e")
    with run_origin(ca=origin_ca) as tls:
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex("tok-coder")], "policies": ["p"]}],
            "policies": {"p": {"allow": [{"id": "api-ok", "host": "api.test", "ports": [tls.port], "paths": ["/ok"]}]}},
            "settings": {"hosts_file": str(hosts_file(work / "hosts")), "private_networks": "allow",
                         "audit": {"max_file_bytes": 4096}},  # rotates every few records
        }
        w = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents={"coder": "tok-coder"})
        w.port_tls = tls.port  # type: ignore[attr-defined]
        try:
            yield w
        finally:
            w.stop()


def get(w: Warden, path: str) -> None:
    proxy = w.proxy_url("coder")
    curl(["-o", "/dev/null", "--cacert", str(w.ca_cert), f"https://api.test:{w.port_tls}{path}"],  # type: ignore[attr-defined]
         env={"HTTPS_PROXY": proxy}, timeout=10)


def in_audit(w: Warden, needle: str) -> bool:
    return any(needle in p.read_text() for p in w.workdir.iterdir() if p.name.startswith("audit.jsonl"))


def wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class Collector:
    """Reads a subprocess's stdout lines in a thread, with the time each arrived."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode()))

    def arrived(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)


def test_follow_shows_new_denials_within_a_second_across_rotation(warden: Warden) -> None:
    proc = subprocess.Popen([WARDEN, "log", "--follow", "--decision", "deny", str(warden.audit_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=warden.workdir)
    out = Collector(proc)
    try:
        get(warden, "/warm-up")  # shown once `warden log` has started (imports take a while on a busy machine)
        assert wait(lambda: out.arrived("/warm-up") is not None, 30), out.lines
        get(warden, "/first-denial")
        assert wait(lambda: in_audit(warden, "/first-denial"), 10)
        written = time.monotonic()
        assert wait(lambda: out.arrived("/first-denial") is not None, 5), out.lines
        seen = out.arrived("/first-denial")
        assert seen is not None and seen - written < 1.0, f"shown {seen - written:.2f}s after it was written"
        rotated_before = {p.name for p in warden.workdir.iterdir() if p.name.startswith("audit.jsonl.")}
        paths = [f"/denied-{i}" for i in range(12)]  # ~12 x 2 records of ~700 bytes: at least one rotation
        for path in paths:
            get(warden, path)
        assert wait(lambda: all(out.arrived(p + " ") or out.arrived(p + "\n") for p in paths), 10), out.lines
        rotated_after = {p.name for p in warden.workdir.iterdir() if p.name.startswith("audit.jsonl.")}
        assert rotated_after - rotated_before, "the test should have made the writer rotate"
        text = "".join(line for _, line in out.lines)
        for path in paths:  # each exactly once: nothing lost or repeated at the rotation
            assert text.count(f"{path} ") + text.count(f"{path}\n") == 1, text
        assert "ALLOW" not in text and "\x1b[" not in text  # filtered; no colour into a pipe
    finally:
        proc.terminate()
        proc.wait(10)
        out.thread.join(5)
        assert proc.stdout is not None
        proc.stdout.close()


def _all_files(w: Warden) -> list[str]:
    return [str(p) for p in w.workdir.iterdir() if p.name.startswith("audit.jsonl")]


def test_filters_json_and_colour(warden: Warden) -> None:
    get(warden, "/ok")
    get(warden, "/nope")
    assert wait(lambda: in_audit(warden, "/nope"), 10)
    files = _all_files(warden)
    plain = subprocess.run([WARDEN, "log", *files], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    ok = [line for line in plain.stdout.splitlines() if "/ok" in line]
    nope = [line for line in plain.stdout.splitlines() if "/nope" in line]
    assert ok and "ALLOW" in ok[-1] and "rule=api-ok" in ok[-1]
    assert nope and "DENY" in nope[-1] and "path_not_allowed" in nope[-1] and "coder" in nope[-1]
    assert "chain_start" not in plain.stdout  # bookkeeping hidden
    js = subprocess.run([WARDEN, "log", "--json", "--decision", "deny", "--host", "api.*", *files],
                        capture_output=True, text=True, timeout=60)
    records = [json.loads(line) for line in js.stdout.splitlines()]
    assert records and all(r["decision"] == "deny" and r["host"] == "api.test" for r in records)
    none = subprocess.run([WARDEN, "log", "--agent", "someone-else", "--since", "1d", *files],
                          capture_output=True, text=True, timeout=60)
    assert none.returncode == 0 and none.stdout == ""
    future = subprocess.run([WARDEN, "log", "--since", "2099-01-01", *files], capture_output=True, text=True,
                            timeout=60)
    assert future.stdout == ""
    # On a terminal, denials are highlighted.
    leader, follower = pty.openpty()
    try:
        tty = subprocess.run([WARDEN, "log", "--decision", "deny", *files], stdout=follower, stderr=subprocess.PIPE,
                             timeout=60)
        assert tty.returncode == 0
        os.close(follower)
        follower = -1
        data = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        assert b"\x1b[1;31m" in data and b"/nope" in data
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def test_stdin_and_captured_stream(warden: Warden) -> None:
    get(warden, "/from-stream")
    assert wait(lambda: in_audit(warden, "/from-stream"), 10)
    lines = [line for f in sorted(_all_files(warden)) for line in Path(f).read_text().splitlines()]
    stream = "".join(f"warden-1  | {line}\n" for line in lines) + "some other container output\n"
    out = subprocess.run([WARDEN, "log", "--reason", "path_not_allowed", "-"], input=stream, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "/from-stream" in out.stdout and "other container" not in out.stdout


def test_follower_reads_a_file_rotated_between_its_stat_and_its_open(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer rotates again in the instant between the follower seeing a new live file and
    opening it: the file it saw is by then a rotated one, and its lines must still be read (they
    were lost under load: a fresh-clone run missed denials)."""
    from egresswarden.cli.log import Follower

    live = tmp_path / "audit.jsonl"
    live.write_bytes(b'{"n": 1}\n')
    f = Follower(str(live))
    assert f.read() == [b'{"n": 1}']
    live.rename(tmp_path / "audit.jsonl.20261201T000000000001Z")
    live.write_bytes(b'{"n": 2}\n')  # what the follower's stat will see ...
    original_open = Follower._open

    def rotate_then_open(self: Follower) -> None:
        if not (tmp_path / "audit.jsonl.20261201T000000000002Z").exists():
            live.rename(tmp_path / "audit.jsonl.20261201T000000000002Z")  # ... rotated before the open
            live.write_bytes(b'{"n": 3}\n')
        original_open(self)
    monkeypatch.setattr(Follower, "_open", rotate_then_open)
    assert f.read() == [b'{"n": 2}', b'{"n": 3}']
    f.close()


def test_follower_reads_files_rotated_between_two_polls(tmp_path: Path) -> None:
    """Two rotations between polls (a busy proxy, a slow reader): the file rotated and
    rotated away while the follower slept is read whole, in order, nothing twice."""
    from egresswarden.cli.log import Follower

    live = tmp_path / "audit.jsonl"
    live.write_bytes(b'{"n": 1}\n')
    f = Follower(str(live))
    assert f.read() == [b'{"n": 1}']
    with live.open("ab") as out:
        out.write(b'{"n": 2}\n')
    live.rename(tmp_path / "audit.jsonl.20261201T000000000001Z")  # the held file, rotated
    (tmp_path / "audit.jsonl.20261201T000000000002Z").write_bytes(b'{"n": 3}\n{"n": 4}\n')  # and gone by
    live.write_bytes(b'{"n": 5}\n')
    assert f.read() == [b'{"n": 2}', b'{"n": 3}', b'{"n": 4}', b'{"n": 5}']
    with live.open("ab") as out:
        out.write(b'{"n": 6}\n')
    assert f.read() == [b'{"n": 6}']
    f.close()
