"""Big extents compressed on several worker threads (agents/compress.py, decision 015)."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from agents import compress
from agents.body import BatchStats
from agents.compress import ADAPT_MAX, BigExtents, next_level
from agents.disk import TrackedExport
from common.hrl import (
    BatchEncoder,
    BatchHeader,
    Compression,
    Consistency,
    ExtentChecksumMismatch,
    ExtentKind,
    decode_batch,
    xxh64_of,
)
from tests.support_agent import MiB, make_image
from tests.support_body import encode_cut


def _header(count: int, data_bytes: int, size: int) -> BatchHeader:
    return BatchHeader(
        vm_uuid=uuid.UUID(int=1),
        disk_id="d",
        generation=1,
        seq=1,
        base_seq=0,
        cut_time_ns=1,
        disk_size=size,
        block_size=64 * 1024,
        consistency=Consistency.CRASH,
        compression=Compression.ZSTD,
        full=True,
        extent_count=count,
        data_bytes=data_bytes,
        cut_id=1,
    )


async def test_full_batch_of_a_mixed_disk_decodes_to_its_bytes(tmp_path: Path) -> None:
    """A FULL batch whose big extents compress on worker threads decodes, in offset order, to
    exactly the disk's bytes (holes and zero MiBs included)."""
    rng = random.Random(3)
    text = b"".join(b"line %d of some text that compresses well\n" % i for i in range(30000))

    def fill(i: int) -> bytes:
        kind = i % 5
        if kind == 0:
            return rng.randbytes(MiB)
        if kind == 1:
            return text[i * 997 : i * 997 + MiB]
        if kind == 2:
            return bytes(MiB)
        if kind == 3:
            return rng.randbytes(4096) + text[: MiB - 8192]  # ends before the MiB does
        return b""  # a hole

    size = 24 * MiB
    image = make_image(tmp_path / "d.img", size, fill=fill)
    export = TrackedExport(image, "d", map_path=tmp_path / "d.map")
    export.open()
    try:
        cut = export.begin_cut()
        cut.add_full_range(0, size, export.fd)
        stats = BatchStats()
        body = await encode_cut(cut, compression=Compression.ZSTD, full=True, level=-3, stats=stats)
        export.end_cut(acked=True)
    finally:
        export.close()
    replica = bytearray(size)
    end = 0
    for ext in decode_batch(body)[1]:
        assert ext.offset >= end
        end = ext.end
        if ext.kind is ExtentKind.DATA:
            assert ext.data is not None
            replica[ext.offset : ext.end] = ext.data
    assert replica == image.read_bytes()
    assert stats.wire_bytes == len(body) < size // 2


async def test_mixed_levels_on_workers_keep_records_in_order() -> None:
    """Extents compressed at different zstd levels on three workers come back as records in
    the order they were submitted, and the batch decodes to the submitted bytes."""
    rng = random.Random(9)
    pieces = [
        rng.randbytes(512 * 1024) if i % 2 else bytes(range(256)) * 2048 * (1 + i % 3)
        for i in range(10)
    ]
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p) + 64 * 1024
    encoder = BatchEncoder(_header(len(pieces), sum(map(len, pieces)), at), level=1)
    big = BigExtents(encoder, -3, adapt=False, workers=3)
    parts: list[bytes | memoryview] = [encoder.header_bytes()]
    for offset, piece, level in zip(offsets, pieces, [-3, 3, 1, -1, 2] * 2, strict=True):
        big.level = level
        for record in await big.submit(offset, piece, xxh64_of(piece)):
            parts.extend(record)
    for record in await big.drain():
        parts.extend(record)
    parts.append(encoder.end())
    extents = decode_batch(b"".join(parts))[1]
    assert [(e.offset, e.data) for e in extents] == list(zip(offsets, pieces, strict=True))


async def test_data_changed_after_its_read_is_refused() -> None:
    """Bytes that no longer match the checksum taken at their read are refused when their
    record is made, as on the single-threaded path."""
    data = bytearray(random.Random(1).randbytes(MiB))
    checksum = xxh64_of(data)
    data[12345] ^= 1  # memory changed between the read and the compression
    encoder = BatchEncoder(_header(1, MiB, 2 * MiB), level=1)
    big = BigExtents(encoder, 1, adapt=False, workers=2)
    await big.submit(0, data, checksum)
    with pytest.raises(ExtentChecksumMismatch, match="changed in memory"):
        await big.drain()


@pytest.mark.parametrize(
    ("level", "waited", "idle", "expected"),
    [
        (-3, 0.0, 0.6, -1),  # link-bound, CPUs idle: two up
        (-2, 0.0, 0.6, 1),  # never 0 (zstd's "default", i.e. 3)
        (2, 0.0, 0.9, ADAPT_MAX),  # capped
        (1, 0.2, 0.9, -1),  # the loop waited on workers: one down, stepping over 0
        (-1, 0.0, 0.05, -2),  # host CPUs busy: one down
        (-3, 0.2, 0.05, -3),  # never below the configured level
        (1, 0.0, 0.2, 1),  # in between: stay
        (-3, 0.0, 0.35, -3),  # a CPU-bound copy on one host idles about this much: stay
    ],
)
def test_level_follows_the_bottleneck(
    level: int, waited: float, idle: float, expected: int
) -> None:
    """The level goes up while the host's CPUs idle and the workers keep up, and down when the
    loop waits on them or the CPUs are busy, between the configured floor (-3) and ADAPT_MAX."""
    assert next_level(level, -3, waited=waited, idle=idle) == expected


async def test_level_rises_on_an_idle_host_and_carries_to_the_next_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the host idles the level climbs to ADAPT_MAX extent after extent, the next batch
    starts there, and a busy host brings it back to the floor; every frame still decodes."""
    # A mock of /proc/stat: a test cannot make a shared CI host idle or busy at will.
    jiffies = {"idle": 0, "total": 0, "idle_share": 1.0}

    def host_cpu() -> tuple[int, int]:
        jiffies["total"] += 100
        jiffies["idle"] += int(100 * jiffies["idle_share"])
        return jiffies["idle"], jiffies["total"]

    monkeypatch.setattr(compress, "_host_cpu", host_cpu)
    monkeypatch.setattr(compress, "RETUNE_SECONDS", 0.0)
    # One worker, and each take follows its submit at once: the loop always waits a little.
    # The wait rule has its own cases above; here only the host decides.
    monkeypatch.setattr(compress, "WAIT_DOWN", 1.0)
    monkeypatch.setattr(compress, "_adapted", {})
    data = b"".join(b"record %d of a compressible extent\n" % i for i in range(40000))[:MiB]

    async def batch() -> list[int]:
        encoder = BatchEncoder(_header(4, 4 * MiB, 8 * MiB), level=-3)
        big = BigExtents(encoder, -3, adapt=True, workers=1)
        levels, parts = [big.level], [encoder.header_bytes()]
        for i in range(4):
            for record in await big.submit(i * 2 * MiB, data, xxh64_of(data)):
                parts.extend(record)
                levels.append(big.level)
        for record in await big.drain():
            parts.extend(record)
            levels.append(big.level)
        parts.append(encoder.end())
        assert all(e.data == data for e in decode_batch(b"".join(parts))[1])
        return levels

    assert await batch() == [-3, -1, 1, ADAPT_MAX, ADAPT_MAX]
    jiffies["idle_share"] = 0.0
    assert await batch() == [ADAPT_MAX, 2, 1, -1, -2]
