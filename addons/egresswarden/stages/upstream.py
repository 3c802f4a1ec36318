"""UpstreamGuard addon: every upstream connection goes to an address the policy checked.

`Policy` resolves and checks names before it allows a CONNECT or a plain-HTTP request and
records the checked address on the client connection. Here, in `server_connect`, the
connection is pinned to that address (so a second DNS lookup cannot rebind it) and the
upstream TLS SNI is set to the checked name (never the client's SNI). A connection to an
address nobody checked (another addon rewrote the destination, a code path we did not
foresee) is refused: fail closed.
"""

from __future__ import annotations

from mitmproxy.proxy import server_hooks

from egresswarden.core.hostnames import HostError, normalize_host, parse_ip
from egresswarden.runtime.context import Connections


class UpstreamGuard:
    def __init__(self, connections: Connections) -> None:
        self.connections = connections

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or server.address is None:
            return
        state = self.connections.peek(data.client)
        host, port = str(server.address[0]), int(server.address[1])
        if state is None:
            server.error = "warden: upstream connection without a checked client"
            return
        ip = parse_ip(host)
        if ip is not None:
            # Plain HTTP pins request.host to the checked address already; tunnels to IP literals
            # were checked as such.
            if ip in state.pinned.values():
                if server.tls and (server.sni is None or server.sni == host):
                    # A plain-proxy https:// request: Policy pinned request.host to the address,
                    # from which mitmproxy took the SNI (and so the name it verifies). Verify the
                    # name that was checked (red team 22: a certificate with an IP SAN passed
                    # without its name, and every other certificate failed).
                    name = state.tls_names.get((ip, port))
                    if name is not None:
                        server.sni = name
                        return
                names = [name for (name, p), addr in state.pinned.items() if addr == ip and p == port]
                if names and server.sni is None and parse_ip(names[0]) is None:
                    server.sni = names[0]
                return
            server.error = f"warden: {host}:{port} was not checked by policy"
            return
        try:
            name = normalize_host(host)
        except HostError:
            server.error = "warden: invalid upstream host"
            return
        pinned = state.pinned.get((name, port))
        if pinned is None:
            server.error = f"warden: {name}:{port} was not checked by policy"
            return
        server.address = (str(pinned), port)
        if server.sni is None:
            server.sni = name
