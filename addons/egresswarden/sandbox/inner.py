"""Process 1 inside the sandbox (standard library only; run as `python -I -S inner.py`).

bubblewrap starts this as PID 1 of the sandbox's PID namespace (`--as-pid-1`). It:

1. listens on 127.0.0.1:BRIDGE_PORT of the sandbox's own network namespace and relays each
   connection to the bind-mounted unix socket, whose other end (outside) is Warden: the
   proxy variables inside point here;
2. sets no_new_privs (bubblewrap does too; this makes it independent of bwrap's mode);
3. runs CMD, forwards the signals it receives to CMD, and reaps every orphan (it is init);
4. when CMD ends, writes `{"exit_status": N, "signal": NAME|null}` to the status fd and exits
   with CMD's status (128+N for a signal). PID 1 exiting makes the kernel kill everything
   else in the namespace, so nothing CMD started outlives it.

`pump` is also the outer bridge's relay loop (bridge.py), so both ends behave the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import NoReturn

BRIDGE_PORT = 3128
BUFFER = 256 * 1024
MAX_CONNECTIONS = 512
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGWINCH, signal.SIGCONT, signal.SIGALRM)
PR_SET_NO_NEW_PRIVS = 38


def pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore | None = None) -> None:
    """Copy src -> dst until EOF or error, then half-close dst (both directions end cleanly)."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(view[:n])
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        if done is not None:
            done.release()


def relay_pair(a: socket.socket, b: socket.socket) -> None:
    """Relay both directions between two connected sockets; close both when both ended."""
    finished = threading.Semaphore(0)
    threading.Thread(target=pump, args=(a, b, finished), daemon=True).start()
    pump(b, a, finished)
    finished.acquire()
    finished.acquire()
    a.close()
    b.close()


def _serve_bridge(listener: socket.socket, unix_path: str) -> None:
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if not slots.acquire(blocking=False):
            conn.close()  # bounded: a runaway client cannot exhaust threads
            continue

        def handle(client: socket.socket = conn) -> None:
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    upstream.connect(unix_path)
                except OSError:
                    upstream.close()
                    client.close()
                    return
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                relay_pair(client, upstream)
            finally:
                slots.release()

        threading.Thread(target=handle, daemon=True).start()


def _no_new_privs() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # bubblewrap has set it already; this is a second lock on the same door


def main(argv: list[str]) -> int:
    # argv: SOCKET STATUS_FD -- CMD [ARGS...]
    if len(argv) < 4 or argv[2] != "--":
        print("warden sandbox (inner): usage: inner.py SOCKET STATUS_FD -- CMD [ARGS...]", file=sys.stderr)
        return 125
    unix_path, status_fd, cmd = argv[0], int(argv[1]), argv[3:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", BRIDGE_PORT))
    listener.listen(128)
    os.set_inheritable(status_fd, False)
    threading.Thread(target=_serve_bridge, args=(listener, unix_path), daemon=True).start()
    _no_new_privs()

    child_pid = 0
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signum)
        else:
            pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        # subprocess forks and execs in C: safe with the relay threads already running.
        child = subprocess.Popen(cmd, close_fds=True)
    except FileNotFoundError:
        print(f"warden sandbox: {cmd[0]}: command not found", file=sys.stderr)
        return _finish(status_fd, 127, None)
    except OSError as e:
        print(f"warden sandbox: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return _finish(status_fd, 126, None)
    child_pid = child.pid
    for signum in pending:
        forward(signum, None)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # PID 1 reaps every orphan too
        except ChildProcessError:
            status = 0
            break
        if pid == child_pid:
            break
    exit_status = os.waitstatus_to_exitcode(status)
    sig_name = None
    if exit_status < 0:
        sig_name = signal.Signals(-exit_status).name
        exit_status = 128 - exit_status
    return _finish(status_fd, exit_status, sig_name)


def _finish(status_fd: int, exit_status: int, sig_name: str | None) -> NoReturn:
    with contextlib.suppress(OSError):
        os.write(status_fd, json.dumps({"exit_status": exit_status, "signal": sig_name}).encode() + b"\n")
    sys.stdout.flush()
    os._exit(exit_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
