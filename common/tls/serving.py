"""Accepting TLS connections for our servers, with every refusal logged.

Servers started with ``ssl=`` by asyncio or aiohttp drop handshake failures silently (asyncio logs
them only in debug mode), so the servers here accept each socket themselves and run the handshake
through ``loop.connect_accepted_socket``, where a failure can be caught:

- :func:`start_tls_server` for stream servers, :func:`serve_tls` for protocol-based ones (and
  :class:`common.tls.web.MutualTLSSite` for aiohttp, built on :func:`serve_tls`);
- :func:`accept_tls` for a STARTTLS upgrade of a connection that is already open (NBD's
  ``NBD_OPT_STARTTLS``).

Both paths share the handshake timeout, the identity check and the rejection event.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from common.logs import get_logger
from common.tls.diagnosis import Side, TLSHandshakeError, describe_tls_error, format_peer
from common.tls.identities import (
    Identity,
    Role,
    TLSError,
    TLSIdentityError,
    peer_identity,
    require_listed,
    require_role,
)

HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a peer gets to complete the handshake before it is dropped (slowloris guard)."""

_log = get_logger("common.tls")


@dataclass(frozen=True)
class Allowed:
    """Exactly which identities (URIs) may pass, for surfaces where a role is too wide, and
    what a refused peer's operator should do about it."""

    uris: frozenset[str]
    fix: str


def check_identity(
    source: object,
    allowed_roles: Collection[Role] | None,
    *,
    side: Side,
    peer: str | None,
    allowed: Allowed | None = None,
) -> Identity:
    """Return the TLS peer's identity if it holds one of ``allowed_roles`` (any, when ``None``)
    and, when ``allowed`` is given, is one of its identities.

    On refusal logs one ``tls_handshake_rejected`` event and raises :class:`TLSHandshakeError`;
    closing the connection is the caller's job.
    """
    try:
        identity = peer_identity(source)
        if allowed_roles is not None:
            require_role(identity, allowed_roles)
        if allowed is not None:
            require_listed(identity, sorted(allowed.uris), fix=allowed.fix)
    except TLSIdentityError as exc:
        rejection = describe_tls_error(exc, side=side, peer=peer)
        rejection.log()
        raise TLSHandshakeError(rejection) from None
    return identity


async def accept_tls(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    peer: str | None = None,
    allowed: Allowed | None = None,
) -> tuple[asyncio.Transport, Identity]:
    """Run the server side of the TLS handshake on an open connection.

    For STARTTLS-style upgrades: the peer must be waiting for our go-ahead, since bytes it sent
    before this call are not part of the handshake. (For connections that are TLS from the
    first byte use :func:`serve_tls`.) Returns the TLS transport (``protocol`` receives its data
    from now on) and the peer's identity. On failure, logs one ``tls_handshake_rejected``
    event, closes the connection and raises :class:`TLSHandshakeError`. The event names the peer
    by its address, or by ``peer`` when it has none (unix sockets).
    """
    loop = asyncio.get_running_loop()
    peer = format_peer(transport.get_extra_info("peername")) or peer
    try:
        async with asyncio.timeout(handshake_timeout):
            tls_transport = await loop.start_tls(transport, protocol, ctx, server_side=True)
    except (OSError, TimeoutError, EOFError) as exc:
        # start_tls has already closed the connection.
        rejection = describe_tls_error(exc, side="server", peer=peer)
        rejection.log()
        raise TLSHandshakeError(rejection) from None
    if tls_transport is None:  # pragma: no cover - only for transports without TLS support
        transport.close()
        raise TLSError("the transport cannot be upgraded to TLS", reason="handshake_failed")
    try:
        identity = check_identity(
            tls_transport, allowed_roles, side="server", peer=peer, allowed=allowed
        )
    except TLSHandshakeError:
        tls_transport.close()
        raise
    return tls_transport, identity


class _IdentityGate(asyncio.Protocol):
    """The first protocol of a fresh TLS connection: checks the peer, then hands over.

    The loop calls ``connection_made`` right after the handshake; the check and the hand-over
    happen there, synchronously, so the application protocol sees every byte the peer sends.
    """

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        allowed_roles: Collection[Role] | None,
        peer: str | None,
    ) -> None:
        self._factory = factory
        self._allowed_roles = allowed_roles
        self._peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Check the peer's identity; hand the connection to a new application protocol."""
        try:
            check_identity(transport, self._allowed_roles, side="server", peer=self._peer)
        except TLSHandshakeError:
            transport.close()
            return
        app = self._factory()
        transport.set_protocol(app)
        app.connection_made(transport)


class TLSServer(asyncio.AbstractServer):
    """A listening mutual-TLS server that completes each handshake itself and logs rejections.

    ``asyncio``'s and ``aiohttp``'s ``ssl=`` servers drop failed handshakes silently, and
    ``loop.start_tls`` on a freshly accepted connection races the client's first bytes (uvloop
    reads them before anyone can pause the transport). So this server accepts sockets itself
    and hands each one to :meth:`asyncio.loop.connect_accepted_socket` with the TLS context,
    which raises when the handshake fails. Build one with :func:`serve_tls` or
    :func:`start_tls_server`; it has ``sockets``, ``close()`` and ``wait_closed()`` like
    :class:`asyncio.Server`.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ctx: ssl.SSLContext,
        *,
        allowed_roles: Collection[Role] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._factory = protocol_factory
        self._ctx = ctx
        self._allowed_roles = allowed_roles
        self._timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._accepting: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def listen(self, host: str | None, port: int, *, backlog: int = 128) -> None:
        """Bind every address of ``host`` (all interfaces when ``None``) and start accepting."""
        infos = await self._loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[Any, ...]] = set()
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            listener = socket.socket(family, kind, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # One socket per family, as asyncio's create_server does.
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # port 0 on several addresses: bind them all to the port the first one got.
                bound = (address[0], self.port or address[1], *address[2:])
                listener.bind(bound)
                listener.listen(backlog)
                listener.setblocking(False)
            except OSError:
                listener.close()
                self.close()
                raise
            self._listeners.append(listener)
        for listener in self._listeners:
            self._spawn(self._accepting, self._accept(listener))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return tuple(self._listeners)

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0); 0 before :meth:`listen`."""
        return int(self._listeners[0].getsockname()[1]) if self._listeners else 0

    def _spawn(self, tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, address = await self._loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() == -1:
                    return
                # Out of file descriptors and the like: say so, breathe, keep serving.
                _log.error("tls_accept_failed", error=str(exc), errno=exc.errno)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._handshakes, self._handshake(conn, format_peer(address)))

    async def _handshake(self, conn: socket.socket, peer: str | None) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._loop.connect_accepted_socket(
                    lambda: _IdentityGate(self._factory, self._allowed_roles, peer),
                    conn,
                    ssl=self._ctx,
                )
        except (OSError, TimeoutError, EOFError) as exc:
            # The loop has closed the connection already.
            describe_tls_error(exc, side="server", peer=peer).log()

    def close(self) -> None:
        """Stop accepting and abandon handshakes in progress; live connections stay open."""
        for task in (*self._accepting, *self._handshakes):
            task.cancel()
        for listener in self._listeners:
            listener.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has been called and its tasks have ended."""
        await self._closed.wait()
        await asyncio.gather(*self._accepting, *self._handshakes, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether it is accepting connections."""
        return bool(self._accepting)

    async def start_serving(self) -> None:
        """Nothing to do: :meth:`listen` starts serving."""

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` (or cancellation)."""
        try:
            await self._closed.wait()
        finally:
            self.close()


async def serve_tls(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    backlog: int = 128,
) -> TLSServer:
    """Serve a protocol over mutual TLS; the protocol sees only peers that passed.

    The protocol's ``connection_made`` gets the TLS transport; ``peer_identity(transport)`` says
    who is on the other end. Every refused peer is logged as ``tls_handshake_rejected``.
    """
    server = TLSServer(
        protocol_factory, ctx, allowed_roles=allowed_roles, handshake_timeout=handshake_timeout
    )
    await server.listen(host, port, backlog=backlog)
    return server


TLSStreamHandler: TypeAlias = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, Identity], Awaitable[None]
]


async def start_tls_server(
    handler: TLSStreamHandler,
    host: str | None,
    port: int,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    backlog: int = 128,
) -> TLSServer:
    """Start a mutual-TLS stream server; ``handler(reader, writer, identity)`` runs per peer.

    Only peers that complete the handshake and (if ``allowed_roles`` is given) hold one of those
    roles reach ``handler``; every other one is logged as ``tls_handshake_rejected``. The writer
    is closed when ``handler`` returns.
    """

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer, peer_identity(writer))
        finally:
            writer.close()
            try:
                async with asyncio.timeout(handshake_timeout):
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                pass  # the peer is gone either way

    def stream_protocol() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), on_connect)

    return await serve_tls(
        stream_protocol,
        host,
        port,
        ctx,
        allowed_roles=allowed_roles,
        handshake_timeout=handshake_timeout,
        backlog=backlog,
    )
