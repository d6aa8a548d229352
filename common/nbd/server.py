"""The NBD server: its exports, its listeners and its clients.

Each client is a :class:`~common.nbd.connection.Connection`, an :class:`asyncio.BufferedProtocol`
that reads straight into the protocol's buffer, runs every request that arrived in that read
inline (see the threading contract in :mod:`common.nbd.backend`), and sends all the replies with
one ``writelines``. Two kinds leave the loop. Flushes run in a small thread pool, and each
connection group-commits them, so a flush and every FUA request that arrived while one was
running share the next ``fdatasync``. READs whose data the page cache does not hold (the
export's ``read_cached`` says None) are read as a batch after the rest, in another pool when the
disk is slow (:mod:`common.nbd.readpool`).

Ordering guarantees, per the spec: a flush starts only after every request that arrived before it
was executed (inline, so before the flush is even queued), and a FUA request is answered only after
a flush that started after its own write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from common.logs import get_logger
from common.nbd.backend import Export
from common.nbd.connection import Connection
from common.nbd.events import (
    TLSMode,
)
from common.nbd.sockets import clear_stale_socket
from common.tls.identities import Role
from common.tls.serving import Allowed

_log = get_logger(__name__)


class NBDServer:
    """Serves :class:`~common.nbd.backend.Export` objects over unix sockets and TCP.

    ``exports`` may be a mapping of name to export or an iterable of exports (keyed by their
    ``name``). ``default_export`` names the export a client gets when it asks for the empty name.
    With a ``tls_context``, TCP listeners require TLS (``NBD_OPT_STARTTLS``) before anything else;
    unix sockets do not unless asked (their file permissions are the access control).
    ``tls_context`` is either a context or a function returning a fresh one for each connection,
    normally ``functools.partial(common.tls.nbd_server_context, tls)``: a fresh context has an
    empty TLS 1.2 session cache, so no client can resume a session without its certificate being
    verified again (OpenSSL's session-ID cache cannot be switched off from Python). The function
    is called once here, so that unreadable certificate files fail at start-up. A TLS client must
    present a certificate with a Replikant identity (of ``allowed_roles``, one of
    ``allowed_identities``, when given); refusals are logged as ``tls_handshake_rejected``.
    """

    def __init__(
        self,
        exports: Mapping[str, Export] | Iterable[Export] = (),
        *,
        tls_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        max_connections: int = 100,
        handshake_timeout: float = 10.0,
        default_export: str | None = None,
        flush_threads: int = 4,
        read_threads: int = 8,
        allowed_roles: Collection[Role] | None = None,
        allowed_identities: Allowed | None = None,
    ) -> None:
        self._exports: dict[str, Export] = {}
        self.live_exports: Mapping[str, Export] = MappingProxyType(self._exports)
        items: Iterable[tuple[str, Export]] = (
            exports.items() if isinstance(exports, Mapping) else ((e.name, e) for e in exports)
        )
        for name, export in items:
            if name != export.name:
                raise ValueError(f"export {export.name!r} registered under the name {name!r}")
            self._add(export)
        if callable(tls_context):
            tls_context()
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.default_export = default_export
        self.allowed_roles = allowed_roles
        self.allowed_identities = allowed_identities
        self.flush_pool = ThreadPoolExecutor(
            max_workers=flush_threads, thread_name_prefix="nbd-flush"
        )
        self.read_pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="nbd-read")
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._connections: set[Connection] = set()
        self._by_export: dict[str, set[Connection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- exports ----------------------------------------------------------------------------------

    @property
    def exports(self) -> Mapping[str, Export]:
        """The exports being served (a read-only live view)."""
        return MappingProxyType(self._exports)

    def _add(self, export: Export) -> None:
        name = export.name
        if name in self._exports:
            raise ValueError(f"an export named {name!r} is already served")
        if len(name.encode()) > 4096 or "\0" in name:
            raise ValueError(f"export name {name!r} is not a valid NBD string")
        self._exports[name] = export

    def add_export(self, export: Export) -> None:
        """Start serving ``export``; clients negotiating right now can already pick it."""
        self._add(export)
        _log.info("nbd_export_added", export=export.name, size=export.size, ro=export.read_only)

    async def remove_export(self, name: str, *, grace: float = 10.0) -> Export:
        """Stop serving ``name`` and disconnect its clients.

        New clients cannot open it from the moment this is called. Each connected client gets the
        replies to everything it sent before (flushes in flight are waited for), then its
        connection is closed; a client that has not gone within ``grace`` seconds is aborted.
        When this returns no backend method of the export runs any more (short of a flush still
        stuck in the kernel past ``grace``), so the caller may close or delete it. Raises
        :class:`KeyError` for an unknown name.
        """
        export = self._exports.pop(name)
        clients = list(self._by_export.get(name, ()))
        await asyncio.gather(*(c.shutdown(grace) for c in clients))
        _log.info("nbd_export_removed", export=name, disconnected=len(clients))
        return export

    @property
    def connection_count(self) -> int:
        """Connected clients, negotiating or transmitting."""
        return len(self._connections)

    def clients_of(self, name: str) -> int:
        """How many clients are in transmission on export ``name``."""
        return len(self._by_export.get(name, ()))

    # --- listeners --------------------------------------------------------------------------------

    async def serve_unix(
        self, path: str | os.PathLike[str], *, mode: int | None = None, tls: bool = False
    ) -> None:
        """Listen on a unix socket at ``path``; returns once listening.

        A stale socket file is replaced; a socket some other server still listens on is not.

        ``mode`` sets the socket file's permissions (who may connect). ``tls=True`` requires TLS
        here too, which needs ``tls_context``.
        """
        tls_mode = self._tls_mode(tls)
        sock_path = Path(path)
        clear_stale_socket(sock_path)
        loop = asyncio.get_running_loop()
        listener = await loop.create_unix_server(
            lambda: Connection(self, tls_mode, "unix"), path=os.fspath(sock_path)
        )
        if mode is not None:
            os.chmod(sock_path, mode)
        self._listeners.append(listener)
        self._unix_paths.append(sock_path)
        _log.info("nbd_listening", socket=str(sock_path), tls=tls_mode is TLSMode.REQUIRED)

    async def serve_tcp(
        self, host: str, port: int, *, allow_plaintext: bool = False
    ) -> tuple[str, int]:
        """Listen on TCP; returns the bound (host, port), useful with port 0.

        TLS is required when the server has a ``tls_context``. Without one, plaintext TCP must be
        asked for explicitly with ``allow_plaintext`` so that no disk is exposed by accident.
        """
        if self.tls_context is None and not allow_plaintext:
            raise ValueError("refusing plaintext NBD over TCP: pass tls_context or allow_plaintext")
        tls_mode = TLSMode.REQUIRED if self.tls_context is not None else TLSMode.NONE
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: Connection(self, tls_mode, "tcp"), host=host, port=port, reuse_address=True
        )
        self._listeners.append(listener)
        bound = listener.sockets[0].getsockname()
        _log.info("nbd_listening", host=bound[0], port=bound[1], tls=tls_mode is TLSMode.REQUIRED)
        return str(bound[0]), int(bound[1])

    def _tls_mode(self, tls: bool) -> TLSMode:
        if not tls:
            return TLSMode.NONE
        if self.tls_context is None:
            raise ValueError("tls=True needs the server to have a tls_context")
        return TLSMode.REQUIRED

    async def close(self, *, grace: float = 10.0) -> None:
        """Stop listening, let every client's in-flight requests finish, and disconnect them.

        Clients still connected after ``grace`` seconds are aborted.
        """
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            listener.close()
        await asyncio.gather(*(c.shutdown(grace) for c in list(self._connections)))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Every flush and pool read was awaited by its connection's shutdown: no blocking here.
        self.flush_pool.shutdown(wait=True)
        self.read_pool.shutdown(wait=True)
        _log.info("nbd_server_closed")

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- bookkeeping used by connections ----------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        """Count a new client in, unless the server is closing or full."""
        if self._closed or len(self._connections) >= self.max_connections:
            return False
        self._connections.add(conn)
        return True

    def opened(self, conn: Connection, export: Export) -> bool:
        """A client entered transmission on ``export``; False if it is no longer served."""
        name = export.name
        if self._exports.get(name) is not export:
            return False
        self._by_export.setdefault(name, set()).add(conn)
        return True

    def forget(self, conn: Connection, name: str | None) -> None:
        """A client is gone."""
        self._connections.discard(conn)
        if name is not None:
            clients = self._by_export.get(name)
            if clients is not None:
                clients.discard(conn)
                if not clients:
                    del self._by_export[name]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the server cancels when it closes."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
