"""Connections to a site's checked address that keep serving the site's name.

An https:// request sent without CONNECT (absolute-form) keeps its site's name as its host, so
that mitmproxy names the site in SNI and checks its certificate against it; the gateway's
`server_connect` then opens the connection to the address it checked for that name (the SSRF
pin). mitmproxy reuses a connection only for a request whose address equals the connection's,
and that is now the checked address: every such request opened a new TCP and TLS connection,
the old one left idle until the site closed it (a connection per request, kept open).

`NAMED` holds, per such connection, the (name, port) it was opened for; `install()` lets
mitmproxy reuse it for a request to that name instead of one to its address. Nothing else of
the match changes (TLS, upstream proxy, transport), and a connection opened for one name is
never taken for another name on the same address, nor for a request to the address itself (an
IP literal): the certificate was checked for the name.
"""

from __future__ import annotations

import inspect
import weakref

from mitmproxy.connection import Address
from mitmproxy.connection import Client
from mitmproxy.connection import Connection
from mitmproxy.connection import Server
from mitmproxy.proxy.layers import http as _http

from addons.patches import install_once

NAMED: weakref.WeakKeyDictionary[Server, Address] = weakref.WeakKeyDictionary()
# The same, by client connection and name: a client's server connections are its own, and
# forgetting one client's must neither touch another's nor scan them all.
_BY_CLIENT: weakref.WeakKeyDictionary[Client, dict[Address, weakref.WeakSet[Server]]] = (
    weakref.WeakKeyDictionary()
)


def remember(client: Client, server: Server, name: Address) -> None:
    """`server`, a connection of `client`'s, was opened for `name`: it is reused for it."""
    NAMED[server] = name
    _BY_CLIENT.setdefault(client, {}).setdefault(name, weakref.WeakSet()).add(server)


def forget(client: Client, name: Address, *, unless_at: Address | None = None) -> None:
    """The connections `client` opened for `name`, but those to `unless_at` (the address now
    checked for it), are no longer taken for it: a reload moved the name, say, and the policy
    in force connects it to `unless_at` only."""
    names = _BY_CLIENT.get(client)
    servers = names.get(name) if names is not None else None
    if names is None or servers is None:
        return
    for server in list(servers):
        if server.address != unless_at:
            NAMED.pop(server, None)
            servers.discard(server)
    if not servers:
        del names[name]


def _looks_as_expected() -> bool:
    command = getattr(_http, "GetHttpConnection", None)
    matches = getattr(command, "connection_spec_matches", None)
    if matches is None:
        return False
    source = inspect.getsource(matches)
    return "self.address == connection.address" in source and "self.via == connection.via" in source


@install_once(_looks_as_expected)
def install() -> None:
    """Wrap GetHttpConnection.connection_spec_matches (once per process); False if this
    mitmproxy's differs from what is expected (connections for names are then not reused)."""
    original = _http.GetHttpConnection.connection_spec_matches

    def connection_spec_matches(self: _http.GetHttpConnection, connection: Connection) -> bool:
        if not isinstance(connection, Server) or (named := NAMED.get(connection)) is None:
            return original(self, connection)
        # Only for its name: not for a request to its address (an IP literal), whose
        # certificate check it never had.
        return (
            named == self.address
            and self.tls == connection.tls
            and self.via == connection.via
            and self.transport_protocol == connection.transport_protocol
        )

    _http.GetHttpConnection.connection_spec_matches = connection_spec_matches  # type: ignore[method-assign]
