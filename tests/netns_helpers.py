"""Network-namespace plumbing for tests/test_netns_isolation.py.

Topology (addresses from one random 10.200.N.0/29 so parallel runs rarely clash):

    [agent ns]  veth  10.200.N.2/30 --- 10.200.N.1/30  [warden ns]  10.200.N.5/30 --- 10.200.N.6/30  [internet ns]
    only a connected /30 route;                         ip_forward=0;                        origins bind here
    no default route, no resolver                       Warden listens on .1

The agent can reach exactly one address (Warden); Warden can reach the
origins; nothing forwards packets between the two veths.

This file is also a small CLI run *inside* namespaces via ``ip netns exec``
(``python netns_helpers.py https-static ...``), so module-level imports are
stdlib only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CMD_TIMEOUT_S = 15.0  # every ip/sysctl call; they normally take milliseconds
HELPER = Path(__file__).resolve()


def sh(
    argv: list[str], timeout: float = CMD_TIMEOUT_S, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kw)  # type: ignore[call-overload]


def netns_probe() -> str | None:
    """Return None if we can create and enter a namespace, else the reason why not."""
    if shutil.which("ip") is None:
        return "iproute2 'ip' not installed (Debian package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN + CAP_NET_ADMIN)"
    name = f"wdprobe-{secrets.token_hex(4)}"
    try:
        r = sh(["ip", "netns", "add", name], check=False)
        if r.returncode != 0:
            return f"'ip netns add' failed: {r.stderr.strip()}"
        # exec also needs a private mount namespace + sysfs remount.
        r = sh(["ip", "netns", "exec", name, "true"], check=False)
        if r.returncode != 0:
            return f"'ip netns exec' failed: {r.stderr.strip()}"
        return None
    finally:
        sh(["ip", "netns", "del", name], check=False)


@dataclass
class Topology:
    suffix: str
    subnet: int  # N in 10.200.N.0/29
    agent_ns: str = ""
    warden_ns: str = ""
    inet_ns: str = ""
    _created_ns: list[str] = field(default_factory=list)
    _root_links: list[str] = field(default_factory=list)
    _etc_dirs: list[Path] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.agent_ns = f"wd-agent-{self.suffix}"
        self.warden_ns = f"wd-warden-{self.suffix}"
        self.inet_ns = f"wd-inet-{self.suffix}"

    # Addresses -----------------------------------------------------------
    @property
    def warden_agent_side(self) -> str:
        return f"10.200.{self.subnet}.1"

    @property
    def agent_addr(self) -> str:
        return f"10.200.{self.subnet}.2"

    @property
    def inet_addr(self) -> str:
        return f"10.200.{self.subnet}.6"

    # Lifecycle -----------------------------------------------------------
    def create(self) -> None:
        s = self.suffix
        # veth names are limited to 15 chars (IFNAMSIZ-1).
        va, vwa, vwi, vi = f"wa{s}", f"wwa{s}", f"wwi{s}", f"wi{s}"
        for ns in (self.agent_ns, self.warden_ns, self.inet_ns):
            sh(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
        for a, b, ns_a, ns_b in (
            (va, vwa, self.agent_ns, self.warden_ns),
            (vwi, vi, self.warden_ns, self.inet_ns),
        ):
            sh(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            self._root_links.append(a)  # deleting one end deletes the pair, if still in root ns
            sh(["ip", "link", "set", a, "netns", ns_a])
            sh(["ip", "link", "set", b, "netns", ns_b])
            self._root_links.remove(a)
        n = self.subnet
        plan = [
            (self.agent_ns, va, f"10.200.{n}.2/30"),
            (self.warden_ns, vwa, f"10.200.{n}.1/30"),
            (self.warden_ns, vwi, f"10.200.{n}.5/30"),
            (self.inet_ns, vi, f"10.200.{n}.6/30"),
        ]
        for ns, dev, cidr in plan:
            sh(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
        for ns in (self.agent_ns, self.warden_ns, self.inet_ns):
            # lo up: Warden's metrics listen on 127.0.0.1 inside its namespace.
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Explicit, although new namespaces usually start with forwarding off:
        # the whole point is that the warden ns is not a router.
        # Written through /proc (per-namespace view under `ip netns exec`) rather than
        # sysctl(8), so procps is not a test dependency.
        for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
            sh(["ip", "netns", "exec", self.warden_ns, "sh", "-c", f"echo 0 > /proc/sys/{knob}"])
        # Agent: hermetic resolver config. `ip netns exec` bind-mounts
        # /etc/netns/<ns>/* over /etc/*. The nameserver is the internet ns
        # address, i.e. a resolver the agent *would* use if packets could get
        # out; hosts has no entry for the test names.
        etc = Path("/etc/netns") / self.agent_ns
        etc.mkdir(parents=True, exist_ok=False)
        self._etc_dirs.append(etc)
        (etc / "resolv.conf").write_text(f"nameserver {self.inet_addr}\noptions timeout:1 attempts:1\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")

    def destroy(self) -> None:
        """Best effort, never raises: runs in a finalizer, possibly after a half-built create()."""
        for p in reversed(self._procs):
            stop_process(p)
        self._procs.clear()
        for link in self._root_links:
            sh(["ip", "link", "del", link], check=False)
        for ns in self._created_ns:
            # Deleting a namespace destroys the veth ends inside it (and thus the pairs).
            sh(["ip", "netns", "del", ns], check=False)
        self._created_ns.clear()
        for d in self._etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._etc_dirs.clear()

    # Running things ------------------------------------------------------
    def run(
        self,
        ns: str,
        argv: list[str],
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
        )

    def spawn(
        self, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as fh:
            # New session so a stray child cannot take the test's terminal signals; we
            # still stop it by its own PID only.
            p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._procs.append(p)
        return p

    def wait_tcp(
        self, ns: str, host: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0
    ) -> None:
        """Block until host:port accepts a TCP connection *from inside ns* (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process exited {proc.returncode} before listening:\n{log.read_text(errors='replace')[-4000:]}"
                )
            remaining = max(1.0, deadline - time.monotonic())
            r = self.run(
                ns,
                [sys.executable, str(HELPER), "wait-tcp", host, str(port), "--timeout", "2"],
                timeout=remaining + 5,
            )
            if r.returncode == 0:
                return
        raise TimeoutError(
            f"{host}:{port} not accepting in {ns} after {timeout}s:\n{log.read_text(errors='replace')[-4000:]}"
        )


def stop_process(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop one process we started, by its PID (SIGTERM, then SIGKILL)."""
    if p.poll() is not None:
        return
    # `ip netns exec` execs the target in place (same PID), so this signals the server itself.
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=timeout)


# ---------------------------------------------------------------- in-namespace CLI


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _https_static(bind: str, port: int, cert: str, key: str, root: str) -> None:
    """Serve root over HTTPS on bind:port (a dumb-HTTP git repo lives in there)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    def handler(*a: object, **kw: object) -> _Quiet:
        return _Quiet(*a, directory=root, **kw)  # type: ignore[arg-type]

    srv = ThreadingHTTPServer((bind, port), handler)  # type: ignore[arg-type]
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown, daemon=True).start())
    srv.serve_forever(poll_interval=0.2)


def _udp_responder(bind: str, port: int) -> None:
    """Answers every datagram: if the agent could reach it, a DNS probe would get a reply."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        data, peer = s.recvfrom(4096)
        s.sendto(data[:2] + b"reply", peer)


def _wait_tcp(host: str, port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return 0
        except OSError:
            time.sleep(0.1)
    return 1


def _tcp_probe(host: str, port: int, timeout: float) -> int:
    """Print the outcome of one TCP connect: 'connected' or the errno name (e.g. ENETUNREACH)."""
    import errno

    try:
        with socket.create_connection((host, port), timeout=timeout):
            print("connected")
            return 0
    except TimeoutError:
        print("timeout")
        return 1
    except OSError as e:
        print(errno.errorcode.get(e.errno or 0, str(e)))
        return 1


def _udp_probe(host: str, port: int, timeout: float) -> int:
    """Exit 0 if a reply came back, 2 if sending failed (no route), 3 on timeout."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"\x12\x34probe", (host, port))
        s.recvfrom(4096)
        print("reply")
        return 0
    except TimeoutError:
        print("timeout")
        return 3
    except OSError as e:
        print(f"send failed: {e.strerror} (errno {e.errno})")
        return 2
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("https-static")
    a.add_argument("--bind", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--cert", required=True)
    a.add_argument("--key", required=True)
    a.add_argument("--root", required=True)
    b = sub.add_parser("udp-responder")
    b.add_argument("--bind", required=True)
    b.add_argument("--port", type=int, required=True)
    c = sub.add_parser("wait-tcp")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=2.0)
    d = sub.add_parser("udp-probe")
    d.add_argument("host")
    d.add_argument("port", type=int)
    d.add_argument("--timeout", type=float, default=2.0)
    e = sub.add_parser("tcp-probe")
    e.add_argument("host")
    e.add_argument("port", type=int)
    e.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "https-static":
        _https_static(args.bind, args.port, args.cert, args.key, args.root)
        return 0
    if args.cmd == "udp-responder":
        _udp_responder(args.bind, args.port)
        return 0
    if args.cmd == "wait-tcp":
        return _wait_tcp(args.host, args.port, args.timeout)
    if args.cmd == "tcp-probe":
        return _tcp_probe(args.host, args.port, args.timeout)
    return _udp_probe(args.host, args.port, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
