"""One NBD client of the server: feeds :class:`~common.nbd.protocol.ServerConnection` the bytes
it sends and executes what that returns (the server's docstring says how, ``common/nbd/server.py``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Any, Final, Protocol, cast

import structlog

from common.logs import get_logger
from common.nbd.backend import Export
from common.nbd.constants import CmdFlag, Errno
from common.nbd.errors import ExportError, RemoteProtocolError, nbd_error_for
from common.nbd.events import (
    NEED_DATA,
    Aborted,
    Disconnect,
    Request,
    StartTLS,
    State,
    TLSMode,
    TransmissionStarted,
)
from common.nbd.protocol import ServerConnection
from common.nbd.readpool import Buffer, PoolReads
from common.nbd.sockets import peer_name
from common.tls.identities import Role, TLSError
from common.tls.serving import Allowed, accept_tls

_READ: Final = 0
_WRITE: Final = 1
_FLUSH: Final = 3
_TRIM: Final = 4
_CACHE: Final = 5
_WRITE_ZEROES: Final = 6
_BLOCK_STATUS: Final = 7
_FUA: Final = int(CmdFlag.FUA)
_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
_REQ_ONE: Final = int(CmdFlag.REQ_ONE)

# READ data collected in one batch before it is handed to the transport (see _process).
_MAX_UNSENT: Final = 4 * 1024 * 1024

# Backend error storms must not flood the log: the first few per connection are logged, the rest
# are counted and reported when the client disconnects.
_MAX_LOGGED_ERRORS: Final = 20


# The server's logger: a connection's events are the server's, as they always were.
_log = get_logger("common.nbd.server")


class Host(Protocol):
    """What a connection uses of its server (``common/nbd/server.py:NBDServer``)."""

    live_exports: Mapping[str, Export]
    default_export: str | None
    max_connections: int
    handshake_timeout: float
    tls_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None
    allowed_roles: Collection[Role] | None
    allowed_identities: Allowed | None

    @property
    def flush_pool(self) -> Executor:
        """Where flushes run."""

    @property
    def read_pool(self) -> Executor:
        """Where batches of READs the page cache lacks run when the disk is slow."""

    def admit(self, conn: Connection) -> bool:
        """Count a new client in, unless the server is closing or full."""

    def opened(self, conn: Connection, export: Export) -> bool:
        """A client entered transmission on ``export``; False if it is no longer served."""

    def forget(self, conn: Connection, name: str | None) -> None:
        """A client is gone."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the server cancels when it closes."""


class Connection(asyncio.BufferedProtocol):
    """One client: feeds the sans-I/O connection and executes what it returns."""

    def __init__(self, server: Host, tls_mode: TLSMode, kind: str) -> None:
        self._server = server
        self._kind = kind
        self._conn = ServerConnection(
            server.live_exports, tls=tls_mode, default_export=server.default_export
        )
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._log: structlog.stdlib.BoundLogger = _log
        self.peer = "?"
        self._export: Export | None = None
        self._export_name: str | None = None
        self._admitted = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        # Group commit: requests waiting for the next flush, and the flush in progress.
        self._waiters: list[tuple[int, int]] = []
        self._flush: asyncio.Future[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._lost = self._loop.create_future()
        self._disconnecting = False  # DISC received: close once flushes are answered
        self._shutting_down = False
        self._write_paused = False
        self._processing = False
        self._unsent = 0  # READ payload bytes collected in this batch but not yet written
        self._pool = PoolReads(server.read_pool)
        self._errors = 0
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0

    # --- asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.peer = peer_name(transport, self._kind)
        self._log = _log.bind(peer=self.peer)
        if not self._server.admit(self):
            self._log.warning(
                "nbd_connection_refused",
                reason="too_many_connections",
                limit=self._server.max_connections,
            )
            transport.abort()
            return
        self._admitted = True
        self._log.info("nbd_client_connected")
        self._handshake_timer = self._loop.call_later(
            self._server.handshake_timeout, self._handshake_timed_out
        )
        transport.writelines(self._conn.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._conn.buffer_updated(nbytes)
        if not self._shutting_down:
            self._process()

    def eof_received(self) -> bool:
        if self._flush is None and not self._waiters and not self._pool.count:
            return False  # a half-closed client is done: close our side too
        # It may still read the answers to requests in flight: send them, then close (as DISC).
        self._disconnecting = True
        return True

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it catches up.
        self._write_paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        transport = self._transport
        if (
            transport is not None
            and not transport.is_closing()
            and not self._shutting_down
            and self._conn.state in (State.OPTIONS, State.TRANSMISSION)
        ):
            transport.resume_reading()
            if not self._processing:
                self._process()  # requests left in the buffer when we paused

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if not self._lost.done():
            self._lost.set_result(None)
        if not self._admitted:
            return
        self._admitted = False
        self._server.forget(self, self._export_name)
        if self._export is not None:
            try:
                self._export.client_closed(self.peer)
            except Exception:
                self._log.exception("nbd_export_hook_failed", hook="client_closed")
        fields: dict[str, Any] = {}
        if self._export_name is not None:
            fields.update(
                requests=self.requests, bytes_read=self.bytes_read, bytes_written=self.bytes_written
            )
        if self._errors > _MAX_LOGGED_ERRORS:
            fields["errors_not_logged"] = self._errors - _MAX_LOGGED_ERRORS
        if exc is not None:
            fields["error"] = str(exc)
        self._log.info("nbd_client_disconnected", **fields)

    # --- the request loop -------------------------------------------------------------------------

    def _process(self) -> None:
        """Run every complete request in the buffer, replying with as few writes as possible."""
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False
            if self._pool.queued and self._export is not None:
                self._pool.submit(self._export.read, self._export.cache, self._pool_reads_done)

    def _process_events(self) -> None:
        conn = self._conn
        out: list[Any] = []
        execute = self._execute
        while not self._write_paused:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                self._log.warning("nbd_protocol_error", reason=exc.reason, detail=str(exc))
                out += conn.data_to_send()
                self._send(out)
                self._close()
                return
            if event is NEED_DATA:
                break
            if type(event) is Request:
                execute(event, out)
                if self._unsent >= _MAX_UNSENT:
                    # Many READs in one buffer: hand their data to the transport now, so that
                    # pause_writing can stop us before the replies outgrow the client's reading.
                    self._send(out)
                    out = []
            elif isinstance(event, TransmissionStarted):
                out += conn.data_to_send()  # the GO reply must precede any request's reply
                if not self._start_transmission(event):
                    self._send(out)
                    self._close()
                    return
            elif isinstance(event, StartTLS):
                out += conn.data_to_send()
                self._send(out)
                self._start_tls()
                return
            elif isinstance(event, Aborted):
                out += conn.data_to_send()
                self._send(out)
                self._log.info("nbd_client_aborted")
                self._close()
                return
            elif isinstance(event, Disconnect):
                self._disconnecting = True
                break
        out += conn.data_to_send()
        self._send(out)
        if self._waiters and self._flush is None:
            self._start_flush()
        if self._disconnecting:
            self._settle()

    def _execute(self, request: Request, out: list[Any]) -> None:
        cmd, flags, handle, offset, length, data = request
        export = self._export
        assert export is not None
        self.requests += 1
        try:
            if cmd == _WRITE:
                assert data is not None
                export.write(offset, data, flags & _FUA != 0)
                self.bytes_written += length
            elif cmd == _READ:
                room = self._pool.has_room(length)
                buf = export.read_cached(offset, length) if room else export.read(offset, length)
                if buf is None:
                    self._pool.add(request)  # submitted once the batch is worked through
                    self._idle.clear()
                    return
                if len(buf) != length:
                    raise ExportError(Errno.EIO, f"backend returned {len(buf)} of {length} bytes")
                self.bytes_read += length
                self._unsent += length
                out += self._conn.reply_read(handle, offset, buf)
                return
            elif cmd == _FLUSH:
                self._waiters.append((handle, cmd))
                return
            elif cmd == _TRIM:
                if length:
                    export.trim(offset, length, flags & _FUA != 0)
            elif cmd == _WRITE_ZEROES:
                if length:
                    export.write_zeroes(offset, length, not flags & _NO_HOLE, flags & _FUA != 0)
            elif cmd == _BLOCK_STATUS:
                extents = export.block_status(offset, length)
                out.append(
                    self._conn.reply_block_status(
                        handle, length, extents, req_one=bool(flags & _REQ_ONE)
                    )
                )
                return
            elif cmd == _CACHE:
                export.cache(offset, length)
                out.append(self._conn.reply_ok(handle))
                return
        except Exception as exc:
            out.append(self._backend_error(exc, request))
            return
        if flags & _FUA:
            self._waiters.append((handle, cmd))
        else:
            out.append(self._conn.reply_ok(handle))

    def _backend_error(self, exc: Exception, request: Request) -> bytes:
        error = nbd_error_for(exc)
        self._errors += 1
        if self._errors <= _MAX_LOGGED_ERRORS:
            unexpected = not isinstance(exc, OSError | ExportError)
            self._log.warning(
                "nbd_backend_error",
                cmd=request.cmd,
                offset=request.offset,
                length=request.length,
                error=error.name,
                detail=str(exc),
                exc_info=unexpected,  # a non-I/O exception is a bug in the backend: keep the trace
            )
        return self._conn.reply_error(request.handle, request.cmd, error, str(exc))

    def _pool_reads_done(self, results: Sequence[tuple[Request, Buffer | Exception]]) -> None:
        out: list[Any] = []
        for request, result in results:
            if isinstance(result, Exception):
                out.append(self._backend_error(result, request))
            else:
                self.bytes_read += request.length
                out += self._conn.reply_read(request.handle, request.offset, result)
        self._send(out)
        self._settle()

    def _settle(self) -> None:
        """Once no flush and no pool read is in flight: idle, and closed after a DISC."""
        if self._flush is None and not self._pool.count:
            self._idle.set()
            if self._disconnecting:
                self._close()

    def _send(self, out: list[Any]) -> None:
        self._unsent = 0
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            transport.writelines(out)

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()  # sends what is buffered first

    # --- flushes ----------------------------------------------------------------------------------

    def _start_flush(self) -> None:
        export = self._export
        assert export is not None
        waiters, self._waiters = self._waiters, []
        self._idle.clear()
        try:
            fut = self._loop.run_in_executor(self._server.flush_pool, export.flush)
        except RuntimeError as exc:  # the executor is shut down: the server is closing
            self._answer(waiters, exc)
            self._settle()
            return
        self._flush = fut
        fut.add_done_callback(partial(self._flush_done, waiters))

    def _flush_done(self, waiters: list[tuple[int, int]], fut: asyncio.Future[None]) -> None:
        self._flush = None
        exc = fut.exception() if not fut.cancelled() else ExportError(Errno.ESHUTDOWN)
        self._answer(waiters, exc)
        if self._waiters and not self._transport_closing():
            self._start_flush()
            return
        self._settle()

    def _answer(self, waiters: list[tuple[int, int]], exc: BaseException | None) -> None:
        conn = self._conn
        if exc is None:
            out = [conn.reply_ok(handle) for handle, _cmd in waiters]
        else:
            error = nbd_error_for(exc)
            self._log.warning("nbd_flush_failed", error=error.name, detail=str(exc))
            out = [conn.reply_error(handle, cmd, error, str(exc)) for handle, cmd in waiters]
        self._send(out)

    def _transport_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    # --- negotiation ------------------------------------------------------------------------------

    def _start_transmission(self, event: TransmissionStarted) -> bool:
        export = event.export
        name = export.name
        if not self._server.opened(self, export):
            # The lookup and this check run in one callback, so this cannot race with
            # remove_export; refuse anyway rather than serve an export that is not registered.
            self._log.warning("nbd_export_vanished", export=name)
            return False
        self._export, self._export_name = export, name
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._log = self._log.bind(export=name)
        try:
            export.client_opened(self.peer)
        except Exception:
            self._log.exception("nbd_export_hook_failed", hook="client_opened")
        self._log.info(
            "nbd_export_opened",
            flags=f"0x{event.transmission_flags:04x}",
            structured=event.structured_replies,
            base_allocation=event.base_allocation,
            tls=self._conn.tls_active,
        )
        return True

    def _start_tls(self) -> None:
        transport = self._transport
        assert transport is not None
        # Nothing may be read as plaintext any more; start_tls takes over the transport.
        transport.pause_reading()
        self._server.spawn(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        source = self._server.tls_context
        assert source is not None
        try:
            context = source() if callable(source) else source
        except (TLSError, OSError) as exc:
            # The certificate files went bad since start-up: refuse, and say what to fix.
            self._log.error("nbd_tls_context_failed", error=str(exc))
            transport.abort()
            return
        try:
            new, identity = await accept_tls(
                transport,
                self,
                context,
                allowed_roles=self._server.allowed_roles,
                allowed=self._server.allowed_identities,
                handshake_timeout=self._server.handshake_timeout,
                peer=self.peer,
            )
        except TLSError:
            # accept_tls has logged the one tls_handshake_rejected event and closed the
            # connection; abort makes sure no half-closed TLS shutdown lingers.
            transport.abort()
            return
        self._transport = new
        self._conn.tls_established()
        self._log = self._log.bind(client=str(identity))
        ssl_object = new.get_extra_info("ssl_object")
        cipher = ssl_object.cipher()
        self._log.info(
            "nbd_tls_established",
            tls_version=ssl_object.version(),
            cipher=cipher[0] if cipher else None,
        )
        if self._conn.buffered:
            # Options sent right behind the client's Finished arrived before this point.
            self._process()

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self._conn.state is not State.TRANSMISSION and self._transport is not None:
            self._log.warning("nbd_handshake_timeout", timeout=self._server.handshake_timeout)
            self._transport.abort()

    # --- shutdown ---------------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop reading, answer what is in flight, close; abort if that takes over ``grace``."""
        self._shutting_down = True
        transport = self._transport
        if transport is None:
            return
        if not transport.is_closing():
            transport.pause_reading()
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
                self._close()
                await self._lost
        except TimeoutError:
            self._log.warning("nbd_shutdown_timeout", grace=grace)
            transport.abort()
            if self._transport is not None and self._transport is not transport:
                self._transport.abort()
