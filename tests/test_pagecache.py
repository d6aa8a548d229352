"""Replication's whole-image reads leave the image in single pages, on both sides.

The initial copy reads a whole disk. Read through the guest's descriptor, with its read-ahead,
it would leave the image in the page cache as large folios (ext4 on Linux 6.16 and later), and
every later 4 KiB guest write into one of them costs ~25 us of kernel time instead of ~3
(docs/bench.md). The agent reads for replication through a descriptor of its own, marked for
random access (:func:`agents.disk.replication_descriptor`). The broker hashes a whole replica
through a mapping for a resync; it drops what it read afterwards. Point-in-time exports read the
replica through the applier's descriptor, marked for random access too. Which pages sit in large
folios is read from the kernel's page tables (:mod:`tests.support_pagecache`: root only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import xxhash

from broker.pitexport import PointInTimeExport
from broker.service import BrokerService
from broker.store import Replica
from tests.support_agent import MiB, wait_until
from tests.support_broker import AgentClient, FakeSource, make_pki, running_broker
from tests.support_pagecache import PAGE, cached_pages, drop_from_cache
from tests.test_agent_ship import make_rig

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers are visible to root only"),
]


async def test_the_initial_copy_leaves_the_image_in_single_pages(tmp_path: Path) -> None:
    """The shipping process reads the 16 MiB of a cold image in order for the initial copy: all
    of it ends up cached, none of it in a large folio; read through a plain descriptor afterwards,
    the same file does fill large folios here (so the check can see them)."""
    rig = await make_rig(tmp_path)
    rig.image.write_bytes(os.urandom(rig.image.stat().st_size))  # one run of data, read in order
    drop_from_cache(rig.image)
    assert cached_pages(rig.image) == (0, 0)
    try:
        await rig.start()
        await wait_until(
            lambda: rig.rep.state is not None and rig.rep.state.initial_done, within=30
        )
        cached, large = cached_pages(rig.image)
    finally:
        await rig.halt()
        await rig.rx.stop()
    assert cached == 16 * MiB // PAGE  # the copy read the image through the page cache
    assert large == 0
    assert rig.replica.image.read_bytes() == rig.image.read_bytes()
    # The control: a sequential read with read-ahead, as the guest's descriptor would do it.
    drop_from_cache(rig.image)
    with rig.image.open("rb", buffering=0) as fh:
        while fh.read(MiB):
            pass
    assert cached_pages(rig.image)[1] > 0, "this kernel keeps no large folios: nothing to see"


@contextlib.asynccontextmanager
async def cold_replica(
    tmp_path: Path,
) -> AsyncIterator[tuple[BrokerService, AgentClient, FakeSource, Replica]]:
    """An in-process broker holding a 16 MiB replica of random data, applied and then dropped
    from the page cache; with the agent client that shipped it."""
    pki = make_pki(tmp_path / "pki")
    src = FakeSource(disk_size=16 * MiB)
    src.write(0, os.urandom(src.disk_size))
    async with (
        running_broker(pki, tmp_path / "store") as broker,
        AgentClient(broker.url, pki.agents["h1"]) as agent,
    ):
        await agent.enable(src)
        await agent.ship(src, src.cut(full=True, all_blocks=True))
        replica = broker.store.get(str(src.vm_uuid), src.disk_id)
        assert replica is not None
        async with asyncio.timeout(20):
            await broker.engines[replica.key].wait_for_state(
                (src.generation, replica.meta.durable_seq)
            )
        drop_from_cache(replica.image)
        yield broker, agent, src, replica


async def test_hashing_a_replica_leaves_none_of_it_in_large_folios(tmp_path: Path) -> None:
    """The broker hashes a 16 MiB replica of random data for a resync (``GET .../hashes``,
    through a mapping whose read-ahead makes large folios): afterwards none of its pages is
    in a large folio, and the hashes are right."""
    async with cold_replica(tmp_path) as (broker, agent, src, replica):
        assert agent.session is not None
        url = f"{broker.url}/v1/replicas/{src.vm_uuid}/{src.disk_id}/hashes?block_size=65536"
        async with agent.session.get(url) as resp:
            assert resp.status == 200
            raw = await resp.read()
        assert cached_pages(replica.image)[1] == 0
    assert raw == b"".join(
        struct.pack(">Q", xxhash.xxh3_64_intdigest(bytes(src.image[i : i + 65536])))
        for i in range(0, src.disk_size, 65536)
    )


async def test_reading_a_point_in_time_view_end_to_end_leaves_no_large_folios(
    tmp_path: Path,
) -> None:
    """A restore reads a point-in-time export of a cold 16 MiB replica in order, 64 KiB at a time,
    called as the NBD server calls it (``read_cached`` on the loop, ``read`` in a thread when
    that says the page cache lacks the range): the export reads ahead of it
    (common/readahead.py), all of it ends up cached, none of it in a large folio, so the applies
    that follow write into single pages; the bytes are the source's."""
    async with cold_replica(tmp_path) as (broker, _, src, replica):
        chunk = 64 * 1024
        engine = broker.engines[replica.key]
        export = PointInTimeExport(
            "pit",
            engine.open_view(),
            src.disk_size,
            tmp_path / "pit.cow",
            read_only=True,
            image_fd=engine.image_fd,
        )
        misses = 0

        def served(offset: int) -> bytes | bytearray | memoryview:
            nonlocal misses
            got = export.read_cached(offset, chunk)
            if got is None:
                misses += 1
                return export.read(offset, chunk)
            return got

        try:
            read = b"".join(served(off) for off in range(0, 4 * MiB, chunk))
            ahead = cached_pages(replica.image)[0] - 4 * MiB // PAGE
            read += b"".join(served(off) for off in range(4 * MiB, src.disk_size, chunk))
        finally:
            export.close()
        cached, large = cached_pages(replica.image)
    # Most reads find what was read ahead for them in the page cache, answered on the loop.
    assert 0 < misses < src.disk_size // chunk // 2, misses  # 12-16 of 256 here
    assert ahead > 0, "the view read nothing ahead of a reader in order"
    assert read == bytes(src.image)
    assert cached == src.disk_size // PAGE  # the view read through the page cache
    assert large == 0
