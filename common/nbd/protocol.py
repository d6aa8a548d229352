"""The NBD protocol, server side, without I/O.

:class:`ServerConnection` takes the bytes a client sends and returns events; it takes the results
of executed requests and returns the bytes to send. It owns the receive buffer, so the asyncio
layer can read straight into it (``get_buffer`` / ``buffer_updated``, the shape of
:class:`asyncio.BufferedProtocol`) and hand WRITE payloads to the backend as memoryviews without a
copy. Everything the spec lets us decide without touching the disk is decided here: option
negotiation, which transmission flags an export gets, and the validation of every request (bad
flags, out-of-range offsets, read-only exports, oversized payloads). Those refusals are answered
here too; the server only ever sees requests it must execute.

The wire constants are in :mod:`common.nbd.constants`, the events this core returns in
:mod:`common.nbd.events`, its errors in :mod:`common.nbd.errors`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from common.nbd.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    IHAVEOPT,
    MAX_EXTENTS,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from common.nbd.errors import (
    LocalProtocolError,
    RemoteProtocolError,
)
from common.nbd.events import (
    NEED_DATA,
    Aborted,
    Disconnect,
    Event,
    NeedData,
    Request,
    StartTLS,
    State,
    TLSMode,
    TransmissionStarted,
)

if TYPE_CHECKING:
    from common.nbd.backend import Export

_REQUEST_SIZE: Final = 28
_OPTION_HEADER_SIZE: Final = 16

_GREETING = struct.Struct(">QQH")
_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + the offset of an OFFSET_DATA payload
_ERROR_PAYLOAD = struct.Struct(">IH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")

# Hot-path aliases: plain ints, so comparisons do not go through enum machinery.
_READ: Final = 0
_WRITE: Final = 1
_DISC: Final = 2
_FLUSH: Final = 3
_TRIM: Final = 4
_CACHE: Final = 5
_WRITE_ZEROES: Final = 6
_BLOCK_STATUS: Final = 7
_EINVAL: Final = 22
_EPERM: Final = 1
_ENOSPC: Final = 28
_FUA: Final = 1
_DONE: Final = REPLY_FLAG_DONE
_MUTATING: Final = frozenset({_WRITE, _TRIM, _WRITE_ZEROES})
_WRITING: Final = frozenset({_WRITE, _WRITE_ZEROES})

_INITIAL_BUFFER: Final = 256 * 1024
_MIN_FREE: Final = 16 * 1024
_BOUNDED_READ: Final = 64 * 1024


def transmission_flags(export: Export, *, structured: bool) -> int:
    """The transmission flags we advertise for ``export``.

    FUA is advertised exactly when FLUSH is: the server implements FUA as the write followed by a
    flush, so a backend never has to block its caller for durability.
    """
    flags = TransmissionFlag.HAS_FLAGS
    if export.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        if export.can_flush:
            flags |= TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        if export.can_trim:
            flags |= TransmissionFlag.SEND_TRIM
        if export.can_write_zeroes:
            flags |= TransmissionFlag.SEND_WRITE_ZEROES
            if export.can_fast_zero:
                flags |= TransmissionFlag.SEND_FAST_ZERO
    if structured:
        # We always answer a READ with a single data chunk, so "don't fragment" costs nothing.
        flags |= TransmissionFlag.SEND_DF
    if export.can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    if export.can_cache:
        flags |= TransmissionFlag.SEND_CACHE
    return int(flags)


def _allowed_flags(tflags: int, *, structured: bool, base_allocation: bool) -> dict[int, int]:
    """Map each command we accept on this connection to the request flags valid for it."""
    fua = _FUA if tflags & TransmissionFlag.SEND_FUA else 0
    # Clients are known to set FUA on commands that do not write; the spec says to accept it.
    allowed = {_READ: fua, _DISC: fua}
    if structured:
        allowed[_READ] |= CmdFlag.DF
    if not tflags & TransmissionFlag.READ_ONLY:
        allowed[_WRITE] = fua
    if tflags & TransmissionFlag.SEND_FLUSH:
        allowed[_FLUSH] = fua
    if tflags & TransmissionFlag.SEND_TRIM:
        allowed[_TRIM] = fua
    if tflags & TransmissionFlag.SEND_WRITE_ZEROES:
        allowed[_WRITE_ZEROES] = fua | CmdFlag.NO_HOLE
        if tflags & TransmissionFlag.SEND_FAST_ZERO:
            allowed[_WRITE_ZEROES] |= CmdFlag.FAST_ZERO
    if tflags & TransmissionFlag.SEND_CACHE:
        allowed[_CACHE] = fua
    if structured and base_allocation:
        allowed[_BLOCK_STATUS] = fua | CmdFlag.REQ_ONE
    return {cmd: int(mask) for cmd, mask in allowed.items()}


class ServerConnection:
    """One client connection, server side, as a state machine over bytes.

    Feed input with :meth:`get_buffer` + :meth:`buffer_updated` (zero copy) or
    :meth:`receive_data`; pull events with :meth:`next_event` until it returns
    :data:`NEED_DATA`; send what :meth:`data_to_send` returns. Replies to executed requests are
    built with the ``reply_*`` methods, which return the bytes (so the caller can batch them).

    ``exports`` is consulted live, so exports added or removed while a client negotiates are
    seen by that client. ``default_export`` names the export the empty name refers to.
    """

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        tls: TLSMode = TLSMode.NONE,
        default_export: str | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self._exports = exports
        self._tls_mode = tls
        self._default_export = default_export
        self._max_payload = max_payload
        self.state = State.CLIENT_FLAGS
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.export: Export | None = None
        self.transmission_flags = 0
        self.base_allocation = False
        # SET_META_CONTEXT applies to one export name; GO on another name forgets it.
        self._meta_export: str | None = None
        self._meta_selected = False
        self._size = 0
        self._allowed: dict[int, int] = {}
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._discard = 0  # payload bytes of a refused oversized WRITE still to be skipped
        self._discard_handle = 0  # ... and the handle its EINVAL goes to once they are gone
        self._want = 0  # size of the WRITE (header + payload) being received, 0 if none
        self._out: list[bytes] = [
            _GREETING.pack(
                NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
            )
        ]

    # --- input ------------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return writable space at the end of the receive buffer (``BufferedProtocol`` style).

        Invalidates the ``data`` views of requests returned earlier.
        """
        start, end = self._start, self._end
        if start == end and start:
            self._start = self._end = start = end = 0  # everything consumed: rewind for free
        want = self._want
        if want >= _BOUNDED_READ and start + want > end:
            # A large WRITE is arriving: read only up to its end, so that the buffer usually
            # empties (and rewinds) after it instead of keeping a partial next request that
            # would have to be moved to the front.
            if start + want > len(self._buf):
                self._reserve(want)
            return self._view[self._end : self._start + want]
        if len(self._buf) - end < _MIN_FREE:
            self._reserve(end - start + _MIN_FREE)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Record that ``nbytes`` were written into the space :meth:`get_buffer` returned."""
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the receive buffer (a copy; for tests and plain transports)."""
        n = len(data)
        if len(self._buf) - self._end < n:
            self._reserve(self._end - self._start + n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return self._end - self._start

    def _reserve(self, total: int) -> None:
        """Make room for ``total`` bytes counted from the first unconsumed byte."""
        start, end = self._start, self._end
        pending = end - start
        size = len(self._buf)
        if start + total <= size:
            return
        if total <= size:
            # Same-length slice assignment never resizes the bytearray, so views handed out
            # earlier stay legal; overlapping ranges go through a copy because the slice
            # assignment uses memcpy, which is undefined for overlaps.
            src = self._view[start:end]
            self._buf[0:pending] = src if pending <= start else bytes(src)
            self._start, self._end = 0, pending
            return
        # Double (or make room for two requests this size) so regrowth is rare, but never beyond
        # what one maximum-size request needs.
        limit = self._max_payload + _REQUEST_SIZE + _MIN_FREE
        new = bytearray(max(total, min(max(2 * size, 2 * total), limit)))
        new[0:pending] = self._view[start:end]
        self._buf = new
        self._view = memoryview(new)
        self._start, self._end = 0, pending

    # --- output -----------------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Return (and forget) the bytes queued by negotiation and by refused requests."""
        out, self._out = self._out, []
        return out

    # --- events -----------------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """Parse the next event, or return :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` when the client broke the protocol beyond answering;
        the connection is then :attr:`State.CLOSED` and must be dropped.
        """
        state = self.state
        if state is State.TRANSMISSION:
            return self._next_request()
        if state is State.OPTIONS:
            return self._next_option()
        if state is State.CLIENT_FLAGS:
            return self._client_flags()
        if state is State.CLOSED:
            self._start = self._end  # input after DISC/ABORT/an error is dropped unread
        return NEED_DATA

    def tls_established(self) -> None:
        """The I/O layer finished the TLS handshake; negotiation continues encrypted."""
        if self.state is not State.TLS_PENDING:
            raise LocalProtocolError(f"tls_established() in state {self.state.value}")
        self.tls_active = True
        self.state = State.OPTIONS

    def _fail(self, reason: str, message: str) -> RemoteProtocolError:
        self.state = State.CLOSED
        return RemoteProtocolError(reason, message)

    def _client_flags(self) -> Event | NeedData:
        if self._end - self._start < 4:
            return NEED_DATA
        (flags,) = _U32.unpack_from(self._buf, self._start)
        self._start += 4
        # Plain ints: ~ on an IntFlag complements only within its members, which would be 0 here.
        if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
            raise self._fail("unknown_client_flags", f"client flags 0x{flags:08x} are not ours")
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self.state = State.OPTIONS
        return self._next_option()

    def _next_option(self) -> Event | NeedData:
        while self.state is State.OPTIONS:
            avail = self._end - self._start
            if avail < _OPTION_HEADER_SIZE:
                return NEED_DATA
            magic, opt, length = _OPT_HDR.unpack_from(self._buf, self._start)
            if magic != IHAVEOPT:
                raise self._fail("bad_option_magic", f"option magic 0x{magic:016x}")
            if length > MAX_OPTION_LENGTH:
                raise self._fail("option_too_long", f"option {opt} carries {length} bytes")
            if avail < _OPTION_HEADER_SIZE + length:
                return NEED_DATA
            begin = self._start + _OPTION_HEADER_SIZE
            data = bytes(self._view[begin : begin + length])
            self._start = begin + length
            event = self._option(opt, data)
            if event is not None:
                return event
        return NEED_DATA

    def _reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(payload)) + payload)

    def _error(self, opt: int, rep: Rep, message: str) -> None:
        self._reply(opt, rep, message.encode()[:MAX_STRING])

    def _resolve(self, name: str) -> tuple[str, Export | None]:
        if name == "" and self._default_export is not None:
            name = self._default_export
        return name, self._exports.get(name)

    def _option(self, opt: int, data: bytes) -> Event | None:
        if (
            self._tls_mode is TLSMode.REQUIRED
            and not self.tls_active
            and opt not in (Opt.STARTTLS, Opt.ABORT)
        ):
            if opt == Opt.EXPORT_NAME:
                # EXPORT_NAME cannot be answered with an error: the spec says to hang up.
                raise self._fail("tls_required", "NBD_OPT_EXPORT_NAME before STARTTLS")
            self._error(opt, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            return None
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if opt in (Opt.GO, Opt.INFO):
            return self._opt_info(opt, data)
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self.state = State.CLOSED
            return Aborted()
        if opt == Opt.LIST:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for name in list(self._exports):
                encoded = name.encode()
                self._reply(opt, Rep.SERVER, _U32.pack(len(encoded)) + encoded)
            self._reply(opt, Rep.ACK)
            return None
        if opt == Opt.STARTTLS:
            return self._opt_starttls(data)
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.structured = True
            self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._opt_meta_context(opt, data)
            return None
        # EXTENDED_HEADERS (QEMU >= 8.2 falls back cleanly), PEEK_EXPORT and anything newer.
        self._error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported by this server")
        return None

    def _opt_starttls(self, data: bytes) -> Event | None:
        opt = Opt.STARTTLS
        if data:
            self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        if self.tls_active:
            self._error(opt, Rep.ERR_INVALID, "TLS is already active")
            return None
        if self._tls_mode is TLSMode.NONE:
            self._error(opt, Rep.ERR_POLICY, "TLS is not offered on this listener")
            return None
        if self._end != self._start:
            # Bytes after STARTTLS were sent before our ACK: a client may not pipeline here, and
            # treating plaintext as part of the TLS session would be a downgrade hole.
            raise self._fail("data_after_starttls", "client sent data before the STARTTLS reply")
        self._reply(opt, Rep.ACK)
        self.state = State.TLS_PENDING
        return StartTLS()

    def _opt_export_name(self, data: bytes) -> Event:
        try:
            requested = data.decode()
        except UnicodeDecodeError:
            raise self._fail("bad_export_name", "export name is not UTF-8") from None
        name, export = self._resolve(requested)
        if export is None:
            raise self._fail("unknown_export", f"no export named {requested!r}")
        flags = self._enter(name, export)
        reply = _EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            reply += bytes(124)
        self._out.append(reply)
        return self._started()

    def _opt_info(self, opt: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._error(opt, Rep.ERR_INVALID, "option too short")
            return None
        (name_len,) = _U32.unpack_from(data, 0)
        if 4 + name_len + 2 > len(data):
            self._error(opt, Rep.ERR_INVALID, "export name length exceeds the option")
            return None
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * count:
            self._error(opt, Rep.ERR_INVALID, "information request count does not match length")
            return None
        try:
            requested = data[4 : 4 + name_len].decode()
        except UnicodeDecodeError:
            self._error(opt, Rep.ERR_INVALID, "export name is not UTF-8")
            return None
        wanted = set(struct.unpack_from(f">{count}H", data, 4 + name_len + 2))
        name, export = self._resolve(requested)
        if export is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"no export named {requested!r}")
            return None
        # Flags depend on whether structured replies were negotiated; compute as GO would.
        flags = transmission_flags(export, structured=self.structured)
        self._reply(opt, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in wanted:
            self._reply(opt, Rep.INFO, _U16.pack(Info.NAME) + name.encode()[:MAX_STRING])
        if Info.DESCRIPTION in wanted and export.description:
            self._reply(
                opt,
                Rep.INFO,
                _U16.pack(Info.DESCRIPTION) + export.description.encode()[:MAX_STRING],
            )
        if Info.BLOCK_SIZE in wanted:
            self._reply(
                opt,
                Rep.INFO,
                _INFO_BLOCK_SIZE.pack(
                    Info.BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, self._max_payload
                ),
            )
        self._reply(opt, Rep.ACK)
        if opt == Opt.INFO:
            return None
        self._enter(name, export)
        return self._started()

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._error(opt, Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(opt, Rep.ERR_INVALID, "malformed meta context request")
            return
        requested, queries = parsed
        name, export = self._resolve(requested)
        if export is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"no export named {requested!r}")
            return
        if opt == Opt.LIST_META_CONTEXT:
            # No query lists everything; "base:" lists every base context; otherwise exact names.
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._reply(opt, Rep.META_CONTEXT, _U32.pack(0) + BASE_ALLOCATION.encode())
            self._reply(opt, Rep.ACK)
            return
        selected = BASE_ALLOCATION in queries
        self._meta_export, self._meta_selected = name, selected
        if selected:
            self._reply(
                opt, Rep.META_CONTEXT, _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
            )
        self._reply(opt, Rep.ACK)

    def _enter(self, name: str, export: Export) -> int:
        self.export = export
        self._size = export.size
        self.base_allocation = self._meta_selected and self._meta_export == name
        self.transmission_flags = transmission_flags(export, structured=self.structured)
        self._allowed = _allowed_flags(
            self.transmission_flags,
            structured=self.structured,
            base_allocation=self.base_allocation,
        )
        self.state = State.TRANSMISSION
        return self.transmission_flags

    def _started(self) -> TransmissionStarted:
        assert self.export is not None
        return TransmissionStarted(
            export=self.export,
            transmission_flags=self.transmission_flags,
            structured_replies=self.structured,
            base_allocation=self.base_allocation,
        )

    # --- transmission -----------------------------------------------------------------------------

    def _next_request(self) -> Request | Disconnect | NeedData:
        # The hot path: one struct unpack, a few integer comparisons, one tuple.
        buf = self._buf
        while True:
            start = self._start
            avail = self._end - start
            if self._discard:
                skip = min(self._discard, avail)
                self._discard -= skip
                self._start = start + skip
                if self._discard:
                    return NEED_DATA
                # Only now: a client matches a reply to a request it has finished sending
                # (libnbd drops the connection on an earlier one).
                self._queue_error(
                    self._discard_handle, _WRITE, _EINVAL, "write larger than the maximum"
                )
                continue
            if avail < _REQUEST_SIZE:
                return NEED_DATA
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(buf, start)
            if magic != REQUEST_MAGIC:
                raise self._fail("bad_request_magic", f"request magic 0x{magic:08x}")
            data: memoryview | None = None
            if cmd == _WRITE:
                if length > self._max_payload:
                    # Skip the payload rather than buffer it: keeps us in sync without the memory.
                    # The error is sent once the payload is gone (above).
                    self._start = start + _REQUEST_SIZE
                    self._discard = length
                    self._discard_handle = handle
                    continue
                total = _REQUEST_SIZE + length
                if avail < total:
                    self._want = total
                    return NEED_DATA
                data = self._view[start + _REQUEST_SIZE : start + total]
                self._start = start + total
                self._want = 0
            else:
                self._start = start + _REQUEST_SIZE
            allowed = self._allowed.get(cmd)
            if allowed is None:
                if cmd in _MUTATING and self.transmission_flags & TransmissionFlag.READ_ONLY:
                    self._queue_error(handle, cmd, _EPERM, "export is read-only")
                elif cmd == _BLOCK_STATUS:
                    self._queue_error(handle, cmd, _EINVAL, "no metadata context negotiated")
                else:
                    self._queue_error(handle, cmd, _EINVAL, f"command {cmd} not supported")
                continue
            if flags & ~allowed:
                self._queue_error(handle, cmd, _EINVAL, f"flags 0x{flags:04x} invalid here")
                continue
            if cmd == _DISC:
                self.state = State.CLOSED
                return Disconnect()
            if cmd == _FLUSH:
                return Request(cmd, flags, handle, 0, 0, None)
            if offset + length > self._size:
                # The spec's Error values: ENOSPC for writes past the end; a TRIM past the end
                # asks to discard what does not exist, which is EINVAL like a READ.
                err = _ENOSPC if cmd in _WRITING else _EINVAL
                self._queue_error(handle, cmd, err, "request beyond the end of the export")
                continue
            if cmd == _READ and length > self._max_payload:
                self._queue_error(handle, cmd, _EINVAL, "read larger than the maximum")
                continue
            if cmd == _BLOCK_STATUS and length == 0:
                self._queue_error(handle, cmd, _EINVAL, "block status of zero bytes")
                continue
            return Request(cmd, flags, handle, offset, length, data)

    def _queue_error(self, handle: int, cmd: int, error: int, message: str) -> None:
        self._out.append(self.reply_error(handle, cmd, error, message))

    # --- replies ----------------------------------------------------------------------------------

    def reply_ok(self, handle: int) -> bytes:
        """A successful reply without payload (every command but READ and BLOCK_STATUS)."""
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, cmd: int, error: int, message: str = "") -> bytes:
        """An error reply; with structured replies, an error chunk carrying ``message``."""
        if not self.structured:
            return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)
        text = message.encode()[:MAX_STRING]
        return (
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.ERROR, handle, 6 + len(text))
            + _ERROR_PAYLOAD.pack(error, len(text))
            + text
        )

    def reply_read(
        self, handle: int, offset: int, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """A successful READ reply as (header, data), to be written in that order."""
        if not self.structured:
            return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle), data
        n = len(data)
        if n == 0:
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.NONE, handle, 0), b""
        header = _CHUNK_DATA.pack(
            STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, handle, 8 + n, offset
        )
        return header, data

    def reply_block_status(
        self, handle: int, length: int, extents: Sequence[tuple[int, int]], *, req_one: bool
    ) -> bytes:
        """A BLOCK_STATUS reply for the ``base:allocation`` context.

        ``extents`` are (length, flags) from the request's offset on; they are clipped so the
        reply never describes more than ``length`` bytes, zero-length extents are dropped, and
        an empty list becomes one "allocated, not known to be zero" extent, which the spec says
        is always a safe answer.
        """
        words: list[int] = []
        remaining = length
        limit = 1 if req_one else MAX_EXTENTS
        for ext_len, ext_flags in extents:
            if remaining <= 0 or len(words) >= 2 * limit:
                break
            if ext_len <= 0:
                continue
            take = min(ext_len, remaining)
            words += (take, ext_flags & 0xFFFFFFFF)
            remaining -= take
        if not words:
            words = [length, 0]
        payload = struct.pack(f">I{len(words)}I", BASE_ALLOCATION_ID, *words)
        return (
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.BLOCK_STATUS, handle, len(payload))
            + payload
        )


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Parse (export name, queries) of LIST/SET_META_CONTEXT; None if malformed."""
    try:
        pos = 0
        (name_len,) = _U32.unpack_from(data, pos)
        pos += 4
        if name_len > MAX_STRING or pos + name_len > len(data):
            return None
        name = data[pos : pos + name_len].decode()
        pos += name_len
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(count):
            (q_len,) = _U32.unpack_from(data, pos)
            pos += 4
            if q_len > MAX_STRING or pos + q_len > len(data):
                return None
            queries.append(data[pos : pos + q_len].decode())
            pos += q_len
    except (struct.error, UnicodeDecodeError):
        return None
    if pos != len(data):
        return None
    return name, queries
