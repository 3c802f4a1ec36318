#!/usr/bin/env python3
"""Passthrough relay cost (issue 17): runtime/relay.SpliceRelay vs an asyncio-streams relay.

    .venv/bin/python bench/relay_bench.py [--mib 256] [--rounds 3]

One process, 127.0.0.1 only: a producer thread writes `--mib` MiB into a socket, the relay
(on an asyncio loop in its own thread) copies it to a second socket, a consumer thread
reads it all. Reported per relay: CPU seconds of the loop thread per GiB moved
(`time.thread_time`, user + system, so the splice syscalls count) and wall MiB/s; rounds
alternate A B / B A. The streams relay is a lower bound for what mitmproxy's TCP layer
costs: mitmproxy also turns every chunk into layer events.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from benchlib.report import f, table  # noqa: E402
from benchlib.results import write_results  # noqa: E402
from egresswarden.runtime.relay import SpliceRelay  # noqa: E402

CHUNK = 1 << 16


async def streams_relay(client: socket.socket, server: socket.socket) -> tuple[int, int]:
    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> int:
        n = 0
        while data := await r.read(CHUNK):
            w.write(data)
            await w.drain()
            n += len(data)
        w.write_eof()
        return n

    cr, cw = await asyncio.open_connection(sock=client)
    sr, sw = await asyncio.open_connection(sock=server)
    up, down = await asyncio.gather(pump(cr, sw), pump(sr, cw))
    cw.close()
    sw.close()
    return up, down


async def splice_relay(client: socket.socket, server: socket.socket) -> tuple[int, int]:
    up, down = await SpliceRelay(client, server).run()
    client.close()
    server.close()
    return up, down


def one_run(relay: Callable[[socket.socket, socket.socket], Awaitable[tuple[int, int]]], total: int
            ) -> tuple[float, float, int]:
    """(loop-thread CPU s, wall s, bytes the consumer got)."""
    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    got = [0]
    result: dict[str, float] = {}

    def consumer() -> None:
        conn, _ = back.accept()
        with conn:
            buf = bytearray(1 << 20)
            while n := conn.recv_into(buf):
                got[0] += n

    def producer() -> None:
        with socket.create_connection(front.getsockname()) as s:
            block = b"x" * (1 << 20)
            for _ in range(total >> 20):
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)  # the relay closes after the other side's EOF

    def loop_thread() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            client, _ = await loop.sock_accept(front)
            server = socket.create_connection(back.getsockname())
            t0, w0 = time.thread_time(), time.perf_counter()
            await relay(client, server)
            result["cpu"], result["wall"] = time.thread_time() - t0, time.perf_counter() - w0

        asyncio.run(main())

    threads = [threading.Thread(target=t) for t in (consumer, loop_thread, producer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    front.close()
    back.close()
    return result["cpu"], result["wall"], got[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    total = args.mib << 20
    relays = {"asyncio streams": streams_relay, "SpliceRelay": splice_relay}
    cpu: dict[str, list[float]] = {k: [] for k in relays}
    rate: dict[str, list[float]] = {k: [] for k in relays}
    for rnd in range(args.rounds):
        names = list(relays) if rnd % 2 == 0 else list(relays)[::-1]
        for name in names:
            c, w, got = one_run(relays[name], total)
            if got != total:
                raise SystemExit(f"{name}: consumer got {got} bytes, expected {total}")
            cpu[name].append(c / (total / 2**30))
            rate[name].append(total / 2**20 / w)
            print(f"relay_bench: {name:<16} r{rnd} {c / (total / 2**30):.3f} CPU s/GiB {total / 2**20 / w:,.0f} MiB/s")
    rows = [[name, f(statistics.median(cpu[name]), 3), f(min(cpu[name]), 3), f(statistics.median(rate[name]))]
            for name in relays]
    text = (f"# Passthrough relay: {args.mib} MiB one way, {args.rounds} rounds\n\n"
            + table(["relay", "loop CPU s/GiB (median)", "min", "MiB/s (median)"], rows))
    write_results("relay", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
