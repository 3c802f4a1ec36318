"""`warden run --admin-socket`: refuses an admin socket others could reach, and --workers > 1."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .harness import WARDEN, sha256_hex, start_warden

RULES = {"agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
         "policies": {"p": {"allow": [{"host": "example.com"}]}}}


def test_admin_socket_in_an_open_directory_stops_warden(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    w = start_warden(tmp_path, RULES, extra_args=["--admin-socket", str(open_dir / "w.sock")], expect_start=False)
    try:
        assert w.proc.wait(60) != 0
    finally:
        w.stop()
    assert "accessible to group or others" in w.output() and "chmod 700" in w.output()
    assert not (open_dir / "w.sock").exists()


def test_admin_socket_needs_one_worker(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text("agents: []\n")
    r = subprocess.run([WARDEN, "run", "--rules", str(tmp_path / "rules"), "--workers", "2",
                        "--admin-socket", str(tmp_path / "a" / "w.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs --workers 1" in r.stderr
