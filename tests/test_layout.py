"""The package layout the issue asks for: one distinctive top-level package, nothing called
`addons` installed, and `mitmdump -s addons/warden.py` leaves `import mcp` meaning the SDK.

mitmproxy's script loader puts the script's folder (addons/) at the front of `sys.path` and
never takes it off, so any module in that folder shadows an installed one of the same name
in the whole mitmdump process. The tests pin the three facts that rule that out: the
installed distribution ships only `egresswarden`, addons/ holds nothing importable besides
that package and the entry script, and a real mitmdump running the script imports the MCP
SDK from site-packages while proxying (and governing) a request.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from .harness import MITMDUMP, REPO, curl, free_port, hosts_file, run_origin, sha256_hex, wait_for_port

ADDONS = REPO / "addons"
PACKAGE = "egresswarden"


def _clean_python(code: str, cwd: Path) -> str:
    """Run `code` in a fresh interpreter of this venv, outside the repository (pytest itself
    puts the repository root on sys.path, which would make `addons` importable here)."""
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_installed_distribution_ships_only_egresswarden(tmp_path: Path) -> None:
    dist = importlib.metadata.distribution(PACKAGE)
    assert (dist.read_text("top_level.txt") or "").split() == [PACKAGE]
    recorded = [str(f) for f in dist.files or ()]
    assert recorded, "the distribution lists no files (RECORD missing?)"
    assert not [f for f in recorded if f.split("/")[0] in ("addons", "addons.py")], recorded
    # What an installed interpreter (not pytest) can import: the package from addons/, no `addons`.
    found = json.loads(_clean_python(
        "import importlib.util, json; "
        f"print(json.dumps({{n: (s.origin if s else None) for n in ('addons', '{PACKAGE}') "
        "for s in [importlib.util.find_spec(n)]}))", tmp_path))
    assert found["addons"] is None, f"a top-level 'addons' is importable from {found['addons']}"
    assert found[PACKAGE] == str(ADDONS / PACKAGE / "__init__.py")


def test_addons_folder_holds_only_the_entry_script_and_the_package() -> None:
    """Anything importable in addons/ would shadow an installed module inside mitmdump."""
    importable = sorted(
        p.name for p in ADDONS.iterdir()
        if (p.is_dir() and p.name.isidentifier())
        or (p.is_file() and p.suffix in (".py", ".pyc", ".so", ".pyd") and p.stem.split(".")[0].isidentifier())
    )
    assert importable == [PACKAGE, "warden.py"]


PROBE = """\
# Loaded by mitmdump right after addons/warden.py: what does `import mcp` mean in there?
import json
import pathlib

import egresswarden
import mcp

pathlib.Path({out!r}).write_text(json.dumps({{"mcp": mcp.__file__, "egresswarden": egresswarden.__file__}}))
"""


@pytest.mark.e2e
def test_mitmdump_script_governs_traffic_and_keeps_the_mcp_sdk(tmp_path: Path) -> None:
    token = "layout-token"
    probe_out = tmp_path / "probe.json"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(out=str(probe_out)))
    audit = tmp_path / "audit.jsonl"
    with run_origin() as origin:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(yaml.safe_dump({
            "agents": [{"id": "layout", "token_sha256": [sha256_hex(token)], "policies": ["p"]}],
            # The origin is on 127.0.0.1: the SSRF guard needs a cidr rule to let it through.
            "policies": {"p": {"allow": [{"id": "ok", "host": "allowed.test", "ports": [origin.port]},
                                         {"id": "lo", "cidr": "127.0.0.1/32", "ports": [origin.port]}]}},
            "deny": [{"id": "no-denied", "host": "denied.test"}],
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))},
        }))
        port = free_port()
        argv = [MITMDUMP, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
                "--set", f"confdir={tmp_path / 'certs'}",
                "-s", str(ADDONS / "warden.py"), "-s", str(probe),
                "--set", f"warden_rules={rules}", "--set", f"warden_audit_log={audit}",
                "--set", f"warden_metrics_listen=127.0.0.1:{free_port()}"]
        log = tmp_path / "mitmdump.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
        try:
            wait_for_port(port, proc=proc, timeout=30)
            proxy = f"http://layout:{token}@127.0.0.1:{port}"
            allowed = curl(["-x", proxy, "-w", "\n%{http_code}", f"http://allowed.test:{origin.port}/through-mitmdump"])
            denied = curl(["-x", proxy, "-w", "\n%{http_code}", f"http://denied.test:{origin.port}/never"])
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        output = log.read_text(errors="replace")
        assert allowed.stdout.endswith("\n200"), (allowed.stdout, allowed.stderr, output)
        assert [s["path"] for s in origin.seen] == ["/through-mitmdump"], output
        # Warden, not bare mitmproxy, handled it: the denial and the audit trail show the policy ran.
        assert denied.stdout.endswith("\n403") and "deny_listed" in denied.stdout, (denied.stdout, output)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(r.get("path") == "/through-mitmdump" and r.get("decision") == "allow" for r in records), records
    assert "Traceback" not in output, output

    loaded = json.loads(probe_out.read_text())
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(loaded["mcp"]).resolve().is_relative_to(site_packages), loaded
    assert Path(loaded["egresswarden"]).resolve() == (ADDONS / PACKAGE / "__init__.py").resolve()
