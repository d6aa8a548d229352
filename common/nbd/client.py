"""A small NBD client: fixed newstyle, optional STARTTLS, structured replies, ``base:allocation``.

Meant for tests and tools (reading a point-in-time export, checking an agent's export), not for
speed: one request at a time. Real guests use QEMU's or libnbd's clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass, field
from types import TracebackType

from common.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
)
from common.nbd.errors import ProtocolError

_REPLY_FLAG_DONE = 1


class NBDClientError(ProtocolError):
    """The server refused something during negotiation."""


class NBDRequestError(ProtocolError):
    """The server answered a request with an error (``error`` is the NBD error value)."""

    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(f"NBD error {error}{': ' + message if message else ''}")
        self.error = error
        self.message = message


@dataclass
class ExportInfo:
    """What the server told us about the export in ``NBD_OPT_GO``."""

    name: str
    size: int = 0
    flags: int = 0
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    structured: bool = False
    base_allocation_id: int | None = None
    contexts: dict[str, int] = field(default_factory=dict)


class NBDClient:
    """One connection to one export. Use :meth:`open_unix` or :meth:`open_tcp`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ExportInfo
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.info = info
        self._handle = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def open_unix(
        cls,
        path: str,
        name: str,
        *,
        structured: bool = True,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NBDClient:
        """Connect over a unix socket and negotiate ``name``."""
        reader, writer = await asyncio.open_unix_connection(path)
        return await cls._negotiate(reader, writer, name, structured, tls, server_hostname)

    @classmethod
    async def open_tcp(
        cls,
        host: str,
        port: int,
        name: str,
        *,
        structured: bool = True,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NBDClient:
        """Connect over TCP, upgrade with STARTTLS if ``tls`` is given, negotiate ``name``."""
        reader, writer = await asyncio.open_connection(host, port)
        return await cls._negotiate(
            reader, writer, name, structured, tls, server_hostname or (host if tls else None)
        )

    @classmethod
    async def _negotiate(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
        structured: bool,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> NBDClient:
        try:
            magic, opt_magic, hflags = struct.unpack(">QQH", await reader.readexactly(18))
            if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                raise NBDClientError("not a fixed newstyle NBD server")
            if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
                raise NBDClientError("server does not speak fixed newstyle")
            cflags = ClientFlag.C_FIXED_NEWSTYLE
            if hflags & HandshakeFlag.NO_ZEROES:
                cflags |= ClientFlag.C_NO_ZEROES
            writer.write(struct.pack(">I", cflags))
            if tls is not None:
                rep, data = await _option(reader, writer, Opt.STARTTLS, b"")
                if rep != Rep.ACK:
                    raise NBDClientError(f"server refused STARTTLS: {_rep_text(rep, data)}")
                await writer.start_tls(tls, server_hostname=server_hostname)
            info = ExportInfo(name=name)
            if structured:
                rep, _ = await _option(reader, writer, Opt.STRUCTURED_REPLY, b"")
                info.structured = rep == Rep.ACK
            encoded = name.encode()
            if info.structured:
                query = BASE_ALLOCATION.encode()
                payload = (
                    struct.pack(">I", len(encoded))
                    + encoded
                    + struct.pack(">II", 1, len(query))
                    + query
                )
                for rep, data in await _option_multi(reader, writer, Opt.SET_META_CONTEXT, payload):
                    if rep == Rep.META_CONTEXT:
                        (ctx_id,) = struct.unpack_from(">I", data)
                        info.contexts[data[4:].decode()] = ctx_id
                info.base_allocation_id = info.contexts.get(BASE_ALLOCATION)
            payload = (
                struct.pack(">I", len(encoded)) + encoded + struct.pack(">HH", 1, Info.BLOCK_SIZE)
            )
            for rep, data in await _option_multi(reader, writer, Opt.GO, payload):
                if rep == Rep.INFO:
                    (kind,) = struct.unpack_from(">H", data)
                    if kind == Info.EXPORT:
                        _, info.size, info.flags = struct.unpack(">HQH", data)
                    elif kind == Info.BLOCK_SIZE:
                        _, info.min_block, info.preferred_block, info.max_block = struct.unpack(
                            ">HIII", data
                        )
                elif rep != Rep.ACK:
                    raise NBDClientError(f"server refused export {name!r}: {_rep_text(rep, data)}")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, info)

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # --- requests ---------------------------------------------------------------------------------

    async def read(self, offset: int, length: int, *, flags: int = 0) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        return await self._request(Cmd.READ, offset, length, flags=flags)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (FUA: durable before the reply)."""
        await self._request(Cmd.WRITE, offset, len(data), data, flags=CmdFlag.FUA if fua else 0)

    async def flush(self) -> None:
        """Make every write answered so far durable."""
        await self._request(Cmd.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        """Discard a range."""
        await self._request(Cmd.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Zero a range (``no_hole``: keep it allocated)."""
        await self._request(
            Cmd.WRITE_ZEROES, offset, length, flags=CmdFlag.NO_HOLE if no_hole else 0
        )

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents from ``offset`` as (length, flags)."""
        result = await self._request(Cmd.BLOCK_STATUS, offset, length, want_extents=True)
        words = struct.unpack(f">{len(result) // 4}I", result)
        return list(zip(words[0::2], words[1::2], strict=True))

    async def raw_request(
        self, cmd: int, offset: int, length: int, data: bytes = b"", *, flags: int = 0
    ) -> bytes:
        """Send any request (tests send invalid ones); returns the payload, raises on error."""
        return await self._request(cmd, offset, length, data, flags=flags)

    async def disconnect(self) -> None:
        """Send ``NBD_CMD_DISC`` (unless the server already hung up) and close."""
        if not self._writer.is_closing():
            async with self._lock:
                self._handle += 1
                self._writer.write(
                    struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.DISC, self._handle, 0, 0)
                )
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await self._writer.drain()
                    await self._reader.read()  # the server closes after DISC
        self._writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self._writer.wait_closed()

    async def _request(
        self,
        cmd: int,
        offset: int,
        length: int,
        data: bytes = b"",
        *,
        flags: int = 0,
        want_extents: bool = False,
    ) -> bytes:
        async with self._lock:
            self._handle += 1
            handle = self._handle
            self._writer.write(
                struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data
            )
            await self._writer.drain()
            return await self._reply(cmd, handle, offset, length, want_extents)

    async def _reply(
        self, cmd: int, handle: int, offset: int, length: int, want_extents: bool
    ) -> bytes:
        reader = self._reader
        (magic,) = struct.unpack(">I", await reader.readexactly(4))
        if magic == SIMPLE_REPLY_MAGIC:
            errno, got = struct.unpack(">IQ", await reader.readexactly(12))
            _check_handle(got, handle)
            if errno:
                raise NBDRequestError(errno)
            return await reader.readexactly(length) if cmd == Cmd.READ else b""
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic 0x{magic:08x}")
        buf = bytearray(length if cmd == Cmd.READ else 0)
        extents = b""
        error: NBDRequestError | None = None
        while True:
            rflags, rtype, got, rlen = struct.unpack(">HHQI", await reader.readexactly(16))
            _check_handle(got, handle)
            payload = await reader.readexactly(rlen)
            if rtype == ReplyType.OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                buf[at - offset : at - offset + rlen - 8] = payload[8:]
            elif rtype == ReplyType.OFFSET_HOLE:
                at, size = struct.unpack(">QI", payload)
                buf[at - offset : at - offset + size] = bytes(size)
            elif rtype == ReplyType.BLOCK_STATUS:
                extents = payload[4:]
            elif rtype & 0x8000:
                err, mlen = struct.unpack_from(">IH", payload)
                error = NBDRequestError(err, payload[6 : 6 + mlen].decode(errors="replace"))
            if rflags & _REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        return extents if want_extents else bytes(buf)


def _check_handle(got: int, want: int) -> None:
    if got != want:
        raise ProtocolError(f"reply for handle {got}, expected {want}")


def _rep_text(rep: int, data: bytes) -> str:
    try:
        name = Rep(rep).name
    except ValueError:
        name = str(rep)
    return f"{name} {data.decode(errors='replace')}".strip()


async def _option(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opt: int, data: bytes
) -> tuple[int, bytes]:
    writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    await writer.drain()
    magic, got_opt, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
    if magic != OPTION_REPLY_MAGIC or got_opt != opt:
        raise ProtocolError(f"bad option reply (magic 0x{magic:x}, option {got_opt})")
    return rep, await reader.readexactly(length)


async def _option_multi(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opt: int, data: bytes
) -> list[tuple[int, bytes]]:
    """Send an option and collect replies up to the final one (ACK or an error)."""
    writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    await writer.drain()
    replies = []
    while True:
        magic, got_opt, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
        if magic != OPTION_REPLY_MAGIC or got_opt != opt:
            raise ProtocolError(f"bad option reply (magic 0x{magic:x}, option {got_opt})")
        replies.append((rep, await reader.readexactly(length)))
        if rep == Rep.ACK or rep & 0x80000000:
            return replies
