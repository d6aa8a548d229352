"""Real NBD clients (qemu-io, qemu-img, nbdcopy, fio) against the agent's tracked export.

Each test serves a :class:`TrackedExport` over a unix socket in this process and runs the client
as a subprocess, then checks the image *and* that tracking marked exactly the written ranges.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agents.dirtymap import DATA, TRIM, ZERO
from agents.disk import TrackedExport
from common.nbd.server import NBDServer
from tests.support_agent import MiB, MiniNBD, make_image

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(60)]

KiB = 1024


@dataclass
class Served:
    """A tracked export served on a unix socket."""

    export: TrackedExport
    image: Path
    sock: Path

    @property
    def uri(self) -> str:
        """The NBD URI clients use."""
        return f"nbd+unix:///{self.export.name}?socket={self.sock}"

    def runs(self) -> list[tuple[int, int, int]]:
        """The active map's runs, as (start block, end block, kind)."""
        return list(self.export.map.active.runs())


async def _run(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}):\n{text}"
    return text


async def _serve(tmp_path: Path, size: int, block_size: int) -> AsyncIterator[Served]:
    image = make_image(tmp_path / "disk.img", size)
    export = TrackedExport(image, "disk", block_size=block_size, map_path=tmp_path / "d.map")
    export.open()
    server = NBDServer([export], default_export="disk")
    sock = tmp_path / "disk.sock"
    await server.serve_unix(sock)
    try:
        yield Served(export, image, sock)
    finally:
        await server.close()
        export.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """A 32 MiB image tracked at 64 KiB."""
    async for s in _serve(tmp_path, 32 * MiB, 64 * KiB):
        yield s


@pytest.fixture
async def served4k(tmp_path: Path) -> AsyncIterator[Served]:
    """A 16 MiB image tracked at 4 KiB (so single writes map to single blocks)."""
    async for s in _serve(tmp_path, 16 * MiB, 4 * KiB):
        yield s


async def test_qemu_io_patterns_are_tracked_exactly(served: Served) -> None:
    """qemu-io writes, zeroes and discards; reads verify the patterns; the map holds just those."""
    out = await _run(
        "qemu-io",
        "-f",
        "raw",
        served.uri,
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -P 0xcd 5M 4k",
        "-c",
        "write -P 0xee 7M 100k",
        "-c",
        "write -z 8M 1M",
        "-c",
        "discard 10M 1M",
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "read -P 0xcd 5M 4k",
        "-c",
        "read -P 0xee 7M 100k",
        "-c",
        "read -P 0 8M 1M",
        "-c",
        "flush",
    )
    assert "Pattern verification failed" not in out
    blk = 64 * KiB
    assert served.runs() == [
        (MiB // blk, MiB // blk + 1, DATA),
        (5 * MiB // blk, 5 * MiB // blk + 1, DATA),
        (7 * MiB // blk, 7 * MiB // blk + 2, DATA),  # 100 KiB spans two blocks
        (8 * MiB // blk, 9 * MiB // blk, ZERO),
        (10 * MiB // blk, 11 * MiB // blk, TRIM),
    ]
    data = served.image.read_bytes()
    assert data[MiB : MiB + 64 * KiB] == b"\xab" * 64 * KiB
    assert data[7 * MiB : 7 * MiB + 100 * KiB] == b"\xee" * 100 * KiB


async def test_qemu_img_convert_into_the_export(served: Served, tmp_path: Path) -> None:
    """qemu-img convert copies an image into the export; every data block is tracked."""
    src = make_image(
        tmp_path / "src.img",
        32 * MiB,
        fill=lambda i: os.urandom(MiB) if i in (0, 3, 17, 31) else b"",
    )
    await _run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri)
    assert served.image.read_bytes() == src.read_bytes()
    data_blocks = {
        b for start, end, kind in served.runs() if kind == DATA for b in range(start, end)
    }
    per_mib = MiB // (64 * KiB)
    expected = {i * per_mib + k for i in (0, 3, 17, 31) for k in range(per_mib)}
    assert data_blocks == expected


async def test_nbdcopy_both_ways(served: Served, tmp_path: Path) -> None:
    """nbdcopy writes into the export (tracked) and reads it back (reads track nothing)."""
    src = make_image(
        tmp_path / "src.img", 32 * MiB, fill=lambda i: os.urandom(MiB) if i % 4 == 1 else b""
    )
    await _run("nbdcopy", str(src), served.uri)
    assert served.image.read_bytes() == src.read_bytes()
    marked = served.export.map.active.dirty
    assert marked >= 8 * MiB // (64 * KiB)
    out = tmp_path / "out.img"
    await _run("nbdcopy", served.uri, str(out))
    assert out.read_bytes() == src.read_bytes()
    assert served.export.map.active.dirty == marked


async def test_fio_random_writes_are_tracked_exactly(served4k: Served) -> None:
    """fio's nbd engine: the blocks whose contents changed are exactly the blocks marked."""
    before = served4k.image.read_bytes()
    await _run(
        "fio",
        "--name=interop",
        "--ioengine=nbd",
        f"--uri={served4k.uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--io_size=1M",
        "--iodepth=16",
        "--refill_buffers",
        "--randrepeat=0",
    )
    after = served4k.image.read_bytes()
    page = 4 * KiB
    changed = {
        i
        for i in range(len(after) // page)
        if after[i * page : (i + 1) * page] != before[i * page : (i + 1) * page]
    }
    marked = {b for s, e, _k in served4k.runs() for b in range(s, e)}
    assert len(changed) > 100
    assert changed == marked


async def test_garbage_and_half_requests_cannot_hurt_the_image(served: Served) -> None:
    """A client sending garbage, or dying in the middle of a write, changes nothing."""

    def garbage() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(served.sock))
            s.recv(18)
            s.sendall(os.urandom(4096))
            tail = b""
            try:
                while chunk := s.recv(4096):
                    tail += chunk
            except ConnectionResetError:
                pass
            return tail  # the server closed the connection

    def half_write() -> None:
        nbd = MiniNBD(served.sock, "disk")
        header = struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536)
        nbd.sock.sendall(header + b"x" * 32768)
        nbd.sock.close()

    await asyncio.to_thread(garbage)
    await asyncio.to_thread(half_write)
    await asyncio.sleep(0.2)
    assert served.image.read_bytes() == bytes(32 * MiB)
    assert served.export.map.active.dirty == 0
    # The export still works for well-behaved clients.

    def well_behaved() -> None:
        ok = MiniNBD(served.sock, "disk")
        ok.write(0, b"fine")
        ok.close()

    await asyncio.to_thread(well_behaved)
    assert served.image.read_bytes()[:4] == b"fine"
