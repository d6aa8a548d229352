"""The streamed body of a batch upload: plan, read, check, compress and frame a cut's extents.

:func:`batch_body` plans the cut once (the totals for the header and the extents to read come
from the same pass, kept in memory up to :data:`_KEEP_PLAN` extents), then reads one planned
extent at a time (:meth:`agents.cut.Cut.read`, synchronous so no guest write slips in),
checksums it right after the read, compresses it (large extents on worker threads, several at
once: :class:`agents.compress.BigExtents`) and yields the encoded records coalesced into
chunks. A batch is never held whole in memory: at most one hop of extents plus aiohttp's send
buffer.

Run on the shipping loop (decision 025) the body sees the cut through
:class:`agents.shiploop.LoopCut`: reads hop to the NBD loop, planning does not (decision 027).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Protocol
from uuid import UUID

from agents.compress import BigExtents
from agents.cut import Cut, PlannedExtent
from agents.dirtymap import DATA, ZERO
from common.fsio import is_zero
from common.hrl import (
    BatchEncoder,
    BatchHeader,
    Compression,
    Consistency,
    xxh64_of,
)

MAX_EXTENT = 1024 * 1024  # extents are read (atomically, in the loop) one at a time: keep short
_THREAD_MIN = 256 * 1024  # compress bigger extents on worker threads
_FLUSH_AT = 256 * 1024  # coalesce small records into chunks of about this size
# Extents are read in hops (:meth:`agents.cut.Cut.fetch`): at most this many, of at most this
# many bytes together (a payload-free extent weighs _NODATA_WEIGHT). One hop is one step of the
# NBD loop, so a guest request waits for one at most; more, smaller hops cost more wake-ups.
# On the NBD loop itself (no shipping loop), a hop is also when other tasks get a turn.
_HOP_EXTENTS = 32
_HOP_BYTES = 256 * 1024
_NODATA_WEIGHT = 4096
# Plans up to this many extents are kept from the totals pass for the body (~100 bytes each,
# times 100 disks in flight); a bigger one (a huge backlog) is planned again rather than held.
_KEEP_PLAN = 8192


class Pacer(Protocol):
    """What paces the upload (:class:`agents.ship.TokenBucket`)."""

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent."""


@dataclasses.dataclass
class BatchStats:
    """What one batch carried."""

    extents: int = 0
    data_bytes: int = 0  # logical bytes (all extents)
    payload_bytes: int = 0  # DATA bytes read from the disk
    zero_extents: int = 0
    wire_bytes: int = 0  # bytes of the encoded stream


def _planned(cut: Cut, max_extent: int) -> tuple[Iterable[PlannedExtent], int, int]:
    """``(extents, extent_count, data_bytes)`` of the cut's plan, planned once if it is small."""
    kept: list[PlannedExtent] | None = []
    count = total = 0
    for ext in cut.plan(max_extent):
        count += 1
        total += ext.length
        if kept is not None:
            kept.append(ext)
            if count > _KEEP_PLAN:
                kept = None
    return (cut.plan(max_extent) if kept is None else kept), count, total


def _hops(plan: Iterable[PlannedExtent]) -> Iterator[list[PlannedExtent]]:
    """The plan in consecutive hops (an extent of ``_HOP_BYTES`` or more is a hop of its own)."""
    hop: list[PlannedExtent] = []
    weight = 0
    for ext in plan:
        w = ext.length if ext.kind == DATA else _NODATA_WEIGHT
        if hop and (len(hop) >= _HOP_EXTENTS or weight + w > _HOP_BYTES):
            yield hop
            hop, weight = [], 0
        hop.append(ext)
        weight += w
    if hop:
        yield hop


async def batch_body(
    cut: Cut,
    header: BatchHeader,
    *,
    level: int,
    bucket: Pacer | None,
    stats: BatchStats,
    max_extent: int = MAX_EXTENT,
) -> AsyncGenerator[bytes, None]:
    """Yield the encoded batch for ``cut``; ``header``'s extent totals are planned here.

    Big extents compress on worker threads while the loop reads and hashes the next ones, so
    the work overlaps on several cores. Records in the stream stay in extent order: finished
    big extents are drained before any other record is encoded.
    """
    plan, count, total = _planned(cut, max_extent)
    encoder = BatchEncoder(
        dataclasses.replace(header, extent_count=count, data_bytes=total), level=level
    )
    # Records and payloads (views of what was read) wait here and are copied once, by the join.
    pending: list[bytes | memoryview] = [encoder.header_bytes()]
    size = len(pending[0])
    compress = header.compression is Compression.ZSTD
    big = BigExtents(encoder, level, adapt=header.full)

    def add(parts: tuple[bytes | memoryview, ...]) -> bytes | None:
        """Queue a record; return the coalesced output once it is worth a write."""
        nonlocal size
        pending.extend(parts)
        size += sum(len(p) for p in parts)
        if size < _FLUSH_AT:
            return None
        out = b"".join(pending)
        pending.clear()
        size = 0
        stats.wire_bytes += len(out)
        return out

    try:
        for hop in _hops(plan):
            if cut.closed:
                # The upload was abandoned (its blocks merged back) while aiohttp's writer task
                # still held this generator: stop without touching the released frozen map.
                return
            wanted = [ext for ext in hop if ext.kind == DATA]
            contents = iter(await cut.fetch(wanted) if wanted else ())  # atomic w.r.t. the guest
            await asyncio.sleep(0)  # the loop's other tasks (the guest's, on the NBD loop) go on
            for ext in hop:
                data: bytes | bytearray | None = None
                checksum = 0
                if ext.kind == DATA:
                    read = next(contents)
                    stats.payload_bytes += ext.length
                    if is_zero(read):
                        stats.zero_extents += 1
                    else:
                        data = read
                        checksum = xxh64_of(read)
                stats.extents += 1
                stats.data_bytes += ext.length
                records: list[tuple[bytes | memoryview, ...]] = []
                threaded = data is not None and compress and ext.length >= _THREAD_MIN
                if threaded and data is not None:
                    records.extend(await big.submit(ext.offset, data, checksum))
                else:
                    if big:  # records stay in extent order: big extents in flight go first
                        records.extend(await big.drain())
                    if data is not None:
                        records.append(encoder.data_parts(ext.offset, data, checksum=checksum))
                    elif ext.kind in (DATA, ZERO):  # DATA that read as zeroes travels as ZERO
                        records.append((encoder.zero(ext.offset, ext.length),))
                    else:
                        records.append((encoder.trim(ext.offset, ext.length),))
                for record in records:
                    out = add(record)
                    if out is not None:
                        if bucket is not None:
                            await bucket.take(len(out))
                        yield out
        for record in await big.drain():
            pending.extend(record)  # goes out with the trailer below
    finally:
        big.cancel()  # abandoned mid-compression: the workers run to their end, unread
    pending.append(encoder.end())
    out = b"".join(pending)
    stats.wire_bytes += len(out)
    if bucket is not None:
        await bucket.take(len(out))
    yield out


def make_header(
    *,
    vm_uuid: UUID,
    disk_id: str,
    generation: int,
    seq: int,
    cut: Cut,
    consistency: Consistency,
    compression: Compression,
    full: bool,
    first_change_cut: int = 0,
) -> BatchHeader:
    """The header for ``cut`` as seq ``seq``, without its extent totals.

    :func:`batch_body` plans the cut and fills in ``extent_count`` and ``data_bytes``: off the
    NBD loop, and in the same pass that plans the extents it reads. The batch carries
    ``cut.cut_id``; ``first_change_cut`` is the agent's idleness statement (see
    :attr:`agents.sequence.Sequencer.change_cut`).
    """
    return BatchHeader(
        vm_uuid=vm_uuid,
        disk_id=disk_id,
        generation=generation,
        seq=seq,
        base_seq=seq - 1,
        cut_time_ns=cut.cut_time_ns,
        disk_size=cut.size,
        block_size=cut.block_size,
        consistency=consistency,
        compression=compression,
        full=full,
        extent_count=0,
        data_bytes=0,
        cut_id=cut.cut_id,
        first_change_cut=first_change_cut,
    )


__all__ = ["MAX_EXTENT", "BatchStats", "Pacer", "batch_body", "make_header"]
