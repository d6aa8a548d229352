"""The asyncio NBD server with our Python client and raw sockets (no external tools)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from common.nbd.backend import FileExport
from common.nbd.client import NBDClient, NBDClientError, NBDRequestError
from common.nbd.constants import (
    IHAVEOPT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
)
from common.nbd.server import NBDServer
from common.tls import TLSError, TLSMaterial, client_context, nbd_server_context
from tests.fixtures_pki import make_pki
from tests.support_pagecache import drop_from_cache

SIZE = 8 * 1024 * 1024
pytestmark = pytest.mark.timeout(30)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An 8 MiB sparse image with 1 MiB of data at 1 MiB."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    return path


@pytest.fixture
async def served(tmp_path: Path, image: Path) -> AsyncIterator[tuple[NBDServer, Path]]:
    """A server exporting ``image`` as ``disk`` on a unix socket."""
    export = FileExport(image, "disk")
    server = NBDServer([export], handshake_timeout=5)
    sock = tmp_path / "nbd.sock"
    await server.serve_unix(sock)
    yield server, sock
    await server.close()
    export.close()


# --- raw client helpers ---------------------------------------------------------------------------


async def raw_go(
    sock: Path, name: str = "disk"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Negotiate ``name`` with simple replies by hand, for tests that then misbehave."""
    reader, writer = await asyncio.open_unix_connection(os.fspath(sock))
    await reader.readexactly(18)
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    writer.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.GO, len(data)) + data)
    while True:
        _magic, _opt, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if rep == 1:  # ACK
            return reader, writer
        assert rep < 0x80000000, f"option error {rep:x}"


def req(cmd: int, offset: int = 0, length: int = 0, *, handle: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (server-side state has no event to wait on) for up to 5 s."""
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - nothing to await: we watch server counters
            await asyncio.sleep(0.01)


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True once the server has closed the connection (EOF or reset); closes our side too."""
    try:
        async with asyncio.timeout(5):
            await reader.read()
    except ConnectionError:
        pass
    writer.close()
    return True


# --- the happy path -------------------------------------------------------------------------------


async def test_every_command_round_trips_through_our_client(
    served: tuple[NBDServer, Path], image: Path
) -> None:
    """READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES and BLOCK_STATUS reach the file correctly."""
    _, sock = served
    async with await NBDClient.open_unix(os.fspath(sock), "disk") as client:
        assert client.info.size == SIZE
        assert client.info.base_allocation_id is not None
        await client.write(4096, b"A" * 8192)
        await client.write(65536, b"B" * 512, fua=True)
        await client.flush()
        assert await client.read(4096, 8192) == b"A" * 8192
        with image.open("rb") as f:
            f.seek(65536)
            assert f.read(512) == b"B" * 512
        await client.write_zeroes(1 << 20, 4096, no_hole=True)
        await client.write_zeroes(2 << 20, 8192)
        await client.trim(3 << 20, 1 << 20)
        assert await client.read(1 << 20, 4096) == bytes(4096)
        extents = await client.block_status(4 << 20, 1 << 20)
        assert extents == [(1 << 20, STATE_HOLE | STATE_ZERO)]
        extents = await client.block_status(0, SIZE)
        assert sum(length for length, _ in extents) == SIZE
        assert any(flags == 0 for _, flags in extents)


async def test_simple_replies_without_structured_negotiation(
    served: tuple[NBDServer, Path],
) -> None:
    """A client that never asks for structured replies gets simple ones for everything."""
    _, sock = served
    async with await NBDClient.open_unix(os.fspath(sock), "disk", structured=False) as client:
        assert not client.info.structured
        await client.write(0, b"xyz")
        assert await client.read(0, 3) == b"xyz"
        with pytest.raises(NBDRequestError) as err:
            await client.read(SIZE - 1, 2)
        assert err.value.error == Errno.EINVAL
        assert await client.read(1, 2) == b"yz"  # the connection survived the error


async def test_pipelined_requests_are_all_answered(
    served: tuple[NBDServer, Path], image: Path
) -> None:
    """A thousand writes in one send are executed and answered, one reply each."""
    _, sock = served
    reader, writer = await raw_go(sock)
    count = 1000
    writer.write(
        b"".join(req(Cmd.WRITE, i * 4096, 8, handle=i) + struct.pack(">Q", i) for i in range(count))
    )
    handles = set()
    for _ in range(count):
        magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
        assert (magic, error) == (SIMPLE_REPLY_MAGIC, 0)
        handles.add(handle)
    assert handles == set(range(count))
    writer.write(req(Cmd.DISC))
    assert await closed_by_server(reader, writer)
    data = await asyncio.to_thread(image.read_bytes)
    assert all(data[i * 4096 : i * 4096 + 8] == struct.pack(">Q", i) for i in range(count))


async def test_a_client_that_stops_reading_is_paused_not_buffered(
    served: tuple[NBDServer, Path],
) -> None:
    """64 MiB of READ replies to a client that reads nothing yet all arrive once it reads."""
    server, sock = served
    reader, writer = await raw_go(sock)
    count, length = 256, 256 * 1024
    writer.write(b"".join(req(Cmd.READ, 0, length, handle=i) for i in range(count)))
    await asyncio.sleep(0.3)  # the server fills the socket and must pause, not hoard replies
    [conn] = server._connections
    assert conn._transport is not None
    assert conn._transport.get_write_buffer_size() < 8 * 1024 * 1024
    for _ in range(count):
        _magic, error, _handle = struct.unpack(">IIQ", await reader.readexactly(16))
        assert error == 0
        await reader.readexactly(length)
    writer.close()


# --- flush ordering -------------------------------------------------------------------------------


class SlowFlushExport(FileExport):
    """Flush blocks until the test releases it, and records the order of calls."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(path, name)
        self.release = threading.Event()
        self.flushing = threading.Event()
        self.calls: list[str] = []

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.calls.append(f"write{'+fua' if fua else ''}")
        super().write(offset, data, fua)

    def flush(self) -> None:
        self.calls.append("flush-start")
        self.flushing.set()
        assert self.release.wait(10)
        super().flush()
        self.calls.append("flush-end")


async def test_fua_reply_waits_for_the_flush_while_the_loop_keeps_serving(
    tmp_path: Path, image: Path
) -> None:
    """A FUA write is answered after a flush that started after it; other clients go on."""
    export = SlowFlushExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    async with NBDServer([export]) as server:
        await server.serve_unix(sock)
        writer_client = await NBDClient.open_unix(os.fspath(sock), "disk")
        reader_client = await NBDClient.open_unix(os.fspath(sock), "disk")
        fua = asyncio.create_task(writer_client.write(0, b"durable", fua=True))
        await asyncio.to_thread(export.flushing.wait, 5)
        # The flush is stuck in its thread; the event loop still answers the other client.
        assert await reader_client.read(0, 7) == b"durable"
        assert not fua.done()
        export.release.set()
        await fua
        assert export.calls == ["write+fua", "flush-start", "flush-end"]
        await writer_client.disconnect()
        await reader_client.disconnect()
    export.close()


async def test_remove_export_waits_for_flushes_then_disconnects(
    tmp_path: Path, image: Path
) -> None:
    """Removing an export answers the flush in flight, closes its clients and hides it."""
    export = SlowFlushExport(image, "disk")
    other = FileExport(image, "other", read_only=True)
    sock = tmp_path / "nbd.sock"
    async with NBDServer([export, other]) as server:
        await server.serve_unix(sock)
        client = await NBDClient.open_unix(os.fspath(sock), "disk")
        bystander = await NBDClient.open_unix(os.fspath(sock), "other")
        flush = asyncio.create_task(client.flush())
        await asyncio.to_thread(export.flushing.wait, 5)
        removal = asyncio.create_task(server.remove_export("disk"))
        await asyncio.sleep(0.1)
        assert not removal.done()  # still waiting for the flush
        export.release.set()
        assert await removal is export
        await flush  # answered before the close
        assert server.clients_of("disk") == 0
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await client.read(0, 1)
        await client.disconnect()
        with pytest.raises(NBDClientError, match="ERR_UNKNOWN"):
            await NBDClient.open_unix(os.fspath(sock), "disk")
        assert await bystander.read(0, 4) == (await asyncio.to_thread(image.read_bytes))[:4]
        added = FileExport(image, "disk2")
        server.add_export(added)
        async with await NBDClient.open_unix(os.fspath(sock), "disk2") as again:
            assert again.info.size == SIZE
        await bystander.disconnect()
    for e in (export, other, added):
        e.close()


# --- reads that wait for the disk -----------------------------------------------------------------


class GatedReadExport(FileExport):
    """A disk the page cache never answers for, where reads at ``SLOW`` take 20 ms and reads at
    0 wait until the test releases them (a test double: a slow disk cannot be had on demand;
    the bytes are the real file's). Records the thread of every read."""

    SLOW = 2 << 20

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(path, name)
        self.release = threading.Event()
        self.waiting = threading.Event()
        self.threads: list[str] = []

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        self.threads.append(threading.current_thread().name)
        if offset == self.SLOW:
            time.sleep(0.02)
        if offset == 0:
            self.waiting.set()
            assert self.release.wait(10)
        return super().read(offset, length)


async def test_reads_the_cache_lacks_stay_on_the_loop_until_the_disk_is_slow(
    tmp_path: Path, image: Path
) -> None:
    """Reads that miss the page cache are read on the loop while the disk answers fast (a
    hand-off would cost as much); after a slow one they are read in the server's threads."""
    export = GatedReadExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    data = await asyncio.to_thread(image.read_bytes)
    async with NBDServer([export]) as server:
        await server.serve_unix(sock)
        async with await NBDClient.open_unix(os.fspath(sock), "disk") as client:
            for off in (1 << 20, 3 << 20, 4 << 20):
                assert await client.read(off, 4096) == data[off : off + 4096]
            assert export.threads == ["MainThread"] * 3
            assert await client.read(export.SLOW, 4096) == data[export.SLOW : export.SLOW + 4096]
            for off in (1 << 20, 3 << 20):
                assert await client.read(off, 4096) == data[off : off + 4096]
            assert export.threads[3] == "MainThread"  # the slow one, before anyone knew
            assert all(t.startswith("nbd-read") for t in export.threads[4:]), export.threads
    export.close()


async def slow_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: GatedReadExport
) -> None:
    """One read of the slow range (simple replies), which sends later reads to the threads."""
    writer.write(req(Cmd.READ, export.SLOW, 512, handle=99))
    assert _simple_reply(await reader.readexactly(16)) == (0, 99)
    await reader.readexactly(512)


def _simple_reply(raw: bytes) -> tuple[int, int]:
    """(error, handle) of a simple reply header."""
    magic, error, handle = struct.unpack(">IIQ", raw)
    assert magic == SIMPLE_REPLY_MAGIC
    return error, handle


async def test_a_read_waiting_for_the_disk_holds_up_no_other_request(
    tmp_path: Path, image: Path
) -> None:
    """While one READ waits for the disk in a read thread, later requests on the same connection
    are answered before it (out of order, by handle), and so are other clients; then it is
    answered with the file's bytes."""
    export = GatedReadExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    data = (await asyncio.to_thread(image.read_bytes))[: 1 << 21]
    async with NBDServer([export]) as server:
        await server.serve_unix(sock)
        reader, writer = await raw_go(sock)
        await slow_read(reader, writer, export)  # from now on, reads go to the threads
        writer.write(req(Cmd.READ, 0, 4096, handle=1))
        await asyncio.to_thread(export.waiting.wait, 5)
        writer.write(req(Cmd.READ, 1 << 20, 4096, handle=2))
        writer.write(req(Cmd.WRITE, 8192, 4, handle=3) + b"next")
        answered = set()
        for _ in range(2):  # the READ from another thread, the WRITE from the loop: any order
            error, handle = _simple_reply(await reader.readexactly(16))
            assert error == 0
            if handle == 2:
                assert await reader.readexactly(4096) == data[1 << 20 : (1 << 20) + 4096]
            answered.add(handle)
        assert answered == {2, 3}
        async with await NBDClient.open_unix(os.fspath(sock), "disk") as other:
            assert await other.read(8192, 4) == b"next"
        export.release.set()
        assert _simple_reply(await reader.readexactly(16)) == (0, 1)
        assert await reader.readexactly(4096) == data[:4096]
        writer.write(req(Cmd.DISC, handle=4))
        assert await closed_by_server(reader, writer)
    export.close()


async def test_disconnect_and_export_removal_wait_for_reads_in_threads(
    tmp_path: Path, image: Path
) -> None:
    """A client that sends DISC behind a READ still gets the READ's reply before the close, and
    removing the export waits for a READ in a thread: once removal returns, no read of the
    export runs any more."""
    export = GatedReadExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    first = (await asyncio.to_thread(image.read_bytes))[:512]
    async with NBDServer([export]) as server:
        await server.serve_unix(sock)
        reader, writer = await raw_go(sock)
        await slow_read(reader, writer, export)
        writer.write(req(Cmd.READ, 0, 512, handle=7) + req(Cmd.DISC, handle=8))
        await asyncio.to_thread(export.waiting.wait, 5)
        await asyncio.sleep(0.1)
        assert not reader.at_eof()
        export.release.set()
        assert _simple_reply(await reader.readexactly(16)) == (0, 7)
        assert await reader.readexactly(512) == first
        assert await closed_by_server(reader, writer)

        export.release.clear()
        export.waiting.clear()
        client = await NBDClient.open_unix(os.fspath(sock), "disk")
        await client.read(export.SLOW, 512)
        read = asyncio.create_task(client.read(0, 512))
        await asyncio.to_thread(export.waiting.wait, 5)
        removal = asyncio.create_task(server.remove_export("disk"))
        await asyncio.sleep(0.1)
        assert not removal.done()  # the read is still in its thread
        export.release.set()
        assert await removal is export
        assert await read == first  # answered before the close
        await client.disconnect()
    export.close()


def test_file_export_answers_from_the_page_cache_only_what_it_holds(
    tmp_path: Path, image: Path
) -> None:
    """``read_cached`` gives the bytes the page cache holds and None for the rest (the server
    then reads in a thread); on a file system that cannot tell (tmpfs) it reads as always."""
    export = FileExport(image, "disk")
    try:
        drop_from_cache(image)
        expect = (image.read_bytes())[1 << 20 : (1 << 20) + 4096]
        drop_from_cache(image)
        assert export.read_cached(1 << 20, 4096) is None
        assert export.read(1 << 20, 4096) == expect
        assert export.read_cached(1 << 20, 4096) == expect
    finally:
        export.close()
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    on_tmpfs = shm / f"replikant-test-{os.getpid()}.img"
    on_tmpfs.write_bytes(b"t" * 8192)
    try:
        export = FileExport(on_tmpfs, "shm")
        assert export.read_cached(4096, 16) == b"t" * 16
        assert export.read_cached(0, 16) == b"t" * 16
        export.close()
    finally:
        on_tmpfs.unlink()


# --- errors ---------------------------------------------------------------------------------------


class FailingExport(FileExport):
    """Writes fail like a full disk; reads fail like a backend bug: in ``read_cached`` at offset
    0, in ``read`` (a READ the page cache lacks) elsewhere."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise OSError(errno.EDQUOT, "quota exceeded")

    def read_cached(self, offset: int, length: int) -> bytes | None:
        if offset == 0:
            raise RuntimeError("backend bug")
        return None

    def read(self, offset: int, length: int) -> bytes:
        raise RuntimeError("backend bug past the cache")


async def test_backend_errors_become_nbd_errors(tmp_path: Path, image: Path) -> None:
    """EDQUOT maps to ENOSPC, an unexpected exception to EIO; both are logged, none is fatal."""
    export = FailingExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    with capture_logs() as logs:
        async with NBDServer([export]) as server:
            await server.serve_unix(sock)
            async with await NBDClient.open_unix(os.fspath(sock), "disk") as client:
                with pytest.raises(NBDRequestError) as err:
                    await client.write(0, b"x")
                assert err.value.error == Errno.ENOSPC
                with pytest.raises(NBDRequestError) as err:
                    await client.read(0, 1)
                assert err.value.error == Errno.EIO
                assert "backend bug" in err.value.message
                with pytest.raises(NBDRequestError) as err:
                    await client.read(4096, 1)
                assert err.value.error == Errno.EIO
                assert "backend bug past the cache" in err.value.message
                await client.flush()
    export.close()
    errors = [e for e in logs if e["event"] == "nbd_backend_error"]
    assert [e["error"] for e in errors] == ["ENOSPC", "EIO", "EIO"]
    assert errors[0]["export"] == "disk"


async def test_garbage_disconnects_cleanly_without_touching_the_image(
    served: tuple[NBDServer, Path], image: Path
) -> None:
    """An HTTP request, random bytes, or a bad request magic close the connection; image intact."""
    server, sock = served
    before = sha256(image)
    with capture_logs() as logs:
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await closed_by_server(reader, writer)
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock))
        writer.write(struct.pack(">I", 3) + os.urandom(4096))
        assert await closed_by_server(reader, writer)
        reader, writer = await raw_go(sock)
        writer.write(b"\xff" * 28 + b"x" * 4096)
        assert await closed_by_server(reader, writer)
        await wait_until(lambda: server.connection_count == 0)
    assert sha256(image) == before
    reasons = [e["reason"] for e in logs if e["event"] == "nbd_protocol_error"]
    assert reasons == ["unknown_client_flags", "bad_option_magic", "bad_request_magic"]


async def test_disconnect_mid_write_payload_writes_nothing(
    served: tuple[NBDServer, Path], image: Path
) -> None:
    """A client that dies halfway through a WRITE payload leaves the image unchanged."""
    server, sock = served
    before = sha256(image)
    _, writer = await raw_go(sock)
    writer.write(req(Cmd.WRITE, 0, 65536) + b"\xaa" * 32768)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()
    await wait_until(lambda: server.connection_count == 0)
    assert sha256(image) == before


async def test_write_beyond_the_end_is_enospc_and_read_only_is_eperm(
    tmp_path: Path, image: Path
) -> None:
    """Out-of-range writes are ENOSPC; a read-only export refuses writes with EPERM."""
    export = FileExport(image, "ro", read_only=True)
    sock = tmp_path / "nbd.sock"
    before = sha256(image)
    async with NBDServer([export]) as server:
        await server.serve_unix(sock)
        async with await NBDClient.open_unix(os.fspath(sock), "ro") as client:
            with pytest.raises(NBDRequestError) as err:
                await client.raw_request(Cmd.WRITE, 0, 3, b"abc")
            assert err.value.error == Errno.EPERM
            with pytest.raises(NBDRequestError) as err:
                await client.raw_request(Cmd.READ, SIZE, 1)
            assert err.value.error == Errno.EINVAL
            with pytest.raises(NBDRequestError) as err:
                await client.raw_request(Cmd.READ, 0, 1, flags=CmdFlag.FAST_ZERO)
            assert err.value.error == Errno.EINVAL
    export.close()
    assert sha256(image) == before


# --- limits ---------------------------------------------------------------------------------------


async def test_connections_over_the_limit_are_refused(tmp_path: Path, image: Path) -> None:
    """With max_connections=2 a third client is dropped before the greeting."""
    export = FileExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    async with NBDServer([export], max_connections=2) as server:
        await server.serve_unix(sock)
        held = [await asyncio.open_unix_connection(os.fspath(sock)) for _ in range(2)]
        for reader, _ in held:
            await reader.readexactly(18)
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock))
        assert await reader.read() == b""
        writer.close()
        assert server.connection_count == 2
        for _, writer in held:
            writer.close()
        await wait_until(lambda: server.connection_count == 0)
        async with await NBDClient.open_unix(os.fspath(sock), "disk"):
            pass
    export.close()


async def test_idle_handshake_times_out(tmp_path: Path, image: Path) -> None:
    """A client that connects and never negotiates is dropped after handshake_timeout."""
    export = FileExport(image, "disk")
    sock = tmp_path / "nbd.sock"
    async with NBDServer([export], handshake_timeout=0.2) as server:
        await server.serve_unix(sock)
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock))
        await reader.readexactly(18)
        assert await closed_by_server(reader, writer)
        # A client in transmission is not subject to the timeout.
        async with await NBDClient.open_unix(os.fspath(sock), "disk") as client:
            await asyncio.sleep(0.4)
            assert len(await client.read(0, 16)) == 16
    export.close()


async def test_unix_socket_files_stale_replaced_live_refused(tmp_path: Path, image: Path) -> None:
    """A stale socket file is replaced; one another server listens on is left alone."""
    sock = tmp_path / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(sock))
    stale.close()
    export = FileExport(image, "disk")
    async with NBDServer([export]) as first:
        await first.serve_unix(sock, mode=0o600)
        assert sock.stat().st_mode & 0o777 == 0o600
        second = NBDServer([export])
        with pytest.raises(OSError, match="another server is listening"):
            await second.serve_unix(sock)
        await second.close()
        async with await NBDClient.open_unix(os.fspath(sock), "disk"):
            pass
    assert not sock.exists()
    export.close()


# --- TCP and TLS ----------------------------------------------------------------------------------


async def test_plaintext_tcp_needs_an_explicit_opt_in(image: Path) -> None:
    """Without TLS, serve_tcp refuses unless allow_plaintext is passed."""
    export = FileExport(image, "disk")
    async with NBDServer([export]) as server:
        with pytest.raises(ValueError, match="plaintext"):
            await server.serve_tcp("127.0.0.1", 0)
        host, port = await server.serve_tcp("127.0.0.1", 0, allow_plaintext=True)
        async with await NBDClient.open_tcp(host, port, "disk") as client:
            assert client.info.size == SIZE
    export.close()


async def test_starttls_with_mutual_certificates(tmp_path: Path, image: Path) -> None:
    """TCP requires STARTTLS; a client with our CA's certificate gets in, others are refused."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other-pki")
    export = FileExport(image, "disk")
    with capture_logs() as logs:
        async with NBDServer(
            [export], tls_context=partial(nbd_server_context, pki.agent.tls)
        ) as server:
            host, port = await server.serve_tcp("127.0.0.1", 0)
            tls = client_context(pki.broker.tls)
            async with await NBDClient.open_tcp(host, port, "disk", tls=tls) as client:
                await client.write(0, b"secret")
                assert await client.read(0, 6) == b"secret"
            with pytest.raises(NBDClientError, match="ERR_TLS_REQD"):
                await NBDClient.open_tcp(host, port, "disk")
            foreign = client_context((pki.ca, other.broker.cert_path, other.broker.key_path))
            with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
                await NBDClient.open_tcp(host, port, "disk", tls=foreign)
            await wait_until(lambda: server.connection_count == 0)
    export.close()
    established = [e for e in logs if e["event"] == "nbd_tls_established"]
    assert [e["client"] for e in established] == ["replikant://broker/c1/b1"]
    rejected = [e for e in logs if e["event"] == "tls_handshake_rejected"]
    assert [e["reason"] for e in rejected] == ["unknown_ca"]


async def test_allowed_roles_refuse_other_identities(tmp_path: Path, image: Path) -> None:
    """With allowed_roles, a valid certificate of another role is refused after the handshake."""
    pki = make_pki(tmp_path / "pki")
    export = FileExport(image, "disk")
    with capture_logs() as logs:
        async with NBDServer(
            [export],
            tls_context=partial(nbd_server_context, pki.agent.tls),
            allowed_roles=["broker"],
        ) as server:
            host, port = await server.serve_tcp("127.0.0.1", 0)
            with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
                await NBDClient.open_tcp(host, port, "disk", tls=client_context(pki.admin.tls))
            async with await NBDClient.open_tcp(
                host, port, "disk", tls=client_context(pki.broker.tls)
            ) as client:
                assert client.info.size == SIZE
    export.close()
    rejected = [e for e in logs if e["event"] == "tls_handshake_rejected"]
    assert [e["reason"] for e in rejected] == ["wrong_role"]


# --- TLS versions ---------------------------------------------------------------------------------


def _starttls(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLSocket:
    """Negotiate up to STARTTLS by hand and run the TLS handshake with ``ctx`` (blocking)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        greeting = raw.recv(18, socket.MSG_WAITALL)
        assert greeting[:16] == struct.pack(">QQ", 0x4E42444D41474943, IHAVEOPT)
        raw.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.STARTTLS, 0))
        _magic, opt, rep, length = struct.unpack(">QIII", raw.recv(20, socket.MSG_WAITALL))
        assert (opt, rep, length) == (Opt.STARTTLS, 1, 0)
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise


def _client_at(
    tls: TLSMaterial, version: ssl.TLSVersion, ciphers: str | None = None
) -> ssl.SSLContext:
    """Our client context pinned to one TLS version (and optionally some TLS 1.2 suites)."""
    ctx = client_context(tls)
    with warnings.catch_warnings():
        # TLS 1.1 is deprecated in Python: that is the point, we play an old client.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


async def test_nbd_accepts_tls_1_2_with_aead_suites_and_tls_1_3(
    tmp_path: Path, image: Path
) -> None:
    """NBD over TLS 1.2 (ECDHE + AES-GCM or ChaCha20) and 1.3 reads back what it wrote."""
    pki = make_pki(tmp_path / "pki")
    export = FileExport(image, "disk")
    clients = [
        _client_at(pki.broker.tls, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256"),
        _client_at(pki.broker.tls, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305"),
        _client_at(pki.broker.tls, ssl.TLSVersion.TLSv1_3),
    ]
    with capture_logs() as logs:
        async with NBDServer(
            [export], tls_context=partial(nbd_server_context, pki.agent.tls)
        ) as server:
            host, port = await server.serve_tcp("127.0.0.1", 0)
            for i, tls in enumerate(clients):
                async with await NBDClient.open_tcp(host, port, "disk", tls=tls) as client:
                    data = os.urandom(4096)
                    await client.write(i * 4096, data, fua=True)
                    assert await client.read(i * 4096, 4096) == data
    export.close()
    established = [
        (e["tls_version"], e["cipher"], e["client"])
        for e in logs
        if e["event"] == "nbd_tls_established"
    ]
    assert established[:2] == [
        ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "replikant://broker/c1/b1"),
        ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305", "replikant://broker/c1/b1"),
    ]
    # Python cannot pin a TLS 1.3 suite; every one of them is AEAD.
    version, cipher, client = established[2]
    assert (version, client) == ("TLSv1.3", "replikant://broker/c1/b1")
    assert cipher.startswith("TLS_")


async def test_nbd_refuses_old_tls_weak_suites_resumption_and_anonymous_clients(
    tmp_path: Path, image: Path
) -> None:
    """TLS 1.1, TLS 1.2 without AEAD or without a client certificate are refused; a TLS 1.2
    session is never resumed (each connection re-verifies the certificate)."""
    pki = make_pki(tmp_path / "pki")
    export = FileExport(image, "disk")
    old = _client_at(pki.broker.tls, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    cbc = _client_at(
        pki.broker.tls, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA"
    )
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=pki.ca)
    anonymous.maximum_version = ssl.TLSVersion.TLSv1_2
    good = _client_at(pki.broker.tls, ssl.TLSVersion.TLSv1_2)
    with capture_logs() as logs:
        async with NBDServer(
            [export], tls_context=partial(nbd_server_context, pki.agent.tls)
        ) as server:
            _host, port = await server.serve_tcp("127.0.0.1", 0)
            for ctx in (old, cbc, anonymous):
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await asyncio.to_thread(_starttls, port, ctx)
            first = await asyncio.to_thread(_starttls, port, good)
            session = first.session
            first.close()
            second = await asyncio.to_thread(_starttls, port, good, session)
            assert second.version() == "TLSv1.2"
            assert not second.session_reused
            second.close()
            await wait_until(lambda: server.connection_count == 0)
    export.close()
    rejected = [
        (e["reason"], e.get("ssl_reason")) for e in logs if e["event"] == "tls_handshake_rejected"
    ]
    assert rejected == [
        ("protocol_version", "UNSUPPORTED_PROTOCOL"),
        ("handshake_failed", "NO_SHARED_CIPHER"),
        ("no_client_certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ]


async def test_tls_context_factory_fails_early_and_per_connection(
    tmp_path: Path, image: Path
) -> None:
    """Unreadable certificate files stop the server at start-up; files lost later refuse the
    connection with an nbd_tls_context_failed event instead of serving it."""
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "agent.key"
    shutil.copy(pki.agent.key_path, key)
    material = (pki.ca, pki.agent.cert_path, key)
    export = FileExport(image, "disk")
    with pytest.raises(TLSError, match="does not exist"):
        NBDServer(
            [export],
            tls_context=partial(
                nbd_server_context, (pki.ca, pki.agent.cert_path, tmp_path / "none")
            ),
        )
    with capture_logs() as logs:
        async with NBDServer([export], tls_context=partial(nbd_server_context, material)) as server:
            host, port = await server.serve_tcp("127.0.0.1", 0)
            async with await NBDClient.open_tcp(
                host, port, "disk", tls=client_context(pki.broker.tls)
            ) as client:
                assert client.info.size == SIZE
            key.unlink()
            with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
                await NBDClient.open_tcp(host, port, "disk", tls=client_context(pki.broker.tls))
    export.close()
    failed = [e for e in logs if e["event"] == "nbd_tls_context_failed"]
    assert len(failed) == 1
    assert str(key) in failed[0]["error"]
