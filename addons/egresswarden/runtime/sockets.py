"""Client sockets through mitmproxy's own connection handler: close one, and close the ones
mitmproxy leaves open.

mitmproxy (12.3.1) closes a connection on `CloseConnection` by cancelling the task that reads
it; that task closes the socket when the cancellation reaches its `reader.read()` or its
drain. If the cancellation instead lands while the reader task waits in `server_event` for
the handler's event lock (the client kept sending while a hook, e.g. `next_layer`, decided
to close it), the `CancelledError` escapes `handle_connection` before `writer.close()`:
the client's socket stays open, silent, until garbage collection. A refused tunnel whose
client is still sending (a 70 KiB flood without a newline) then hangs the client instead
of closing it, and every such connection holds a file descriptor.

`LeftOpenSockets.client_disconnected` runs after mitmproxy has finished with the client
(its reader task is done) and closes a client transport that is still open. It is last in
the chain, after every stage that records the disconnect.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from mitmproxy import connection, ctx

from egresswarden.runtime import relay, splicing

logger = logging.getLogger("warden")


def connection_handler(client: connection.Client) -> Any | None:
    """mitmproxy's ConnectionHandler for `client`, or None once it is gone."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handlers = getattr(proxyserver, "connections", {})
    handler = handlers.get(client.id)
    if handler is None:  # keyed differently (e.g. UDP): find it by its client
        handler = next((h for h in handlers.values() if getattr(h, "client", None) is client), None)
    return handler


def close_client(client: connection.Client, abort: bool = False) -> bool:
    """Close `client` as a `CloseConnection` command would; False if it is already gone.

    A tunnel relayed in the kernel (runtime/splicing.py) is stopped first, synchronously, so
    no byte moves after this returns and its counts are in the tunnel for tunnel_close.

    `abort`: also drop every socket of the connection (the client's and the upstream's) at
    once, discarding what is still queued. mitmproxy's close is asyncio's `transport.close()`,
    which waits until the write buffer drained: a peer that does not read (an upstream that
    only sends, an agent that stopped reading) kept a revoked tunnel's sockets, and the
    connection to the revoked destination, open for as long as it liked."""
    splicing.revoke(client)
    handler = connection_handler(client)
    if handler is None or client not in handler.transports:
        return False
    handler.close_connection(client)
    if abort:
        for io in list(handler.transports.values()):
            transport = getattr(getattr(io, "writer", None), "transport", None)
            if transport is not None and hasattr(transport, "abort"):
                relay.reset_on_close(transport.get_extra_info("socket"))  # drop the kernel's queue too
                transport.abort()  # RST, no drain: the revocation is immediate
    return True


class LeftOpenSockets:
    def client_disconnected(self, client: connection.Client) -> None:
        handler = connection_handler(client)
        io = handler.transports.get(client) if handler is not None else None
        writer = getattr(io, "writer", None)
        if writer is None or writer.is_closing():
            return
        logger.debug("warden: closing a client socket mitmproxy left open (%s)", client.peername)
        with contextlib.suppress(OSError):
            writer.close()
