"""Batches of a cut as the agent's body encodes them, for tests that decode what it ships."""

from __future__ import annotations

import uuid

from agents.body import BatchStats, batch_body, make_header
from agents.cut import Cut
from common.hrl import BatchHeader, Compression, Consistency


def cut_header(cut: Cut, *, compression: Compression, full: bool, seq: int = 1) -> BatchHeader:
    """The header of ``cut`` as batch ``seq`` of VM 1's disk ``d`` (crash-consistent)."""
    return make_header(
        vm_uuid=uuid.UUID(int=1),
        disk_id="d",
        generation=1,
        seq=seq,
        cut=cut,
        consistency=Consistency.CRASH,
        compression=compression,
        full=full,
    )


async def encode_cut(
    cut: Cut, *, compression: Compression, full: bool, level: int, stats: BatchStats
) -> bytes:
    """The whole encoded batch of ``cut`` (batch 1 of VM 1's disk ``d``)."""
    header = cut_header(cut, compression=compression, full=full)
    body = batch_body(cut, header, level=level, bucket=None, stats=stats)
    return b"".join([chunk async for chunk in body])
