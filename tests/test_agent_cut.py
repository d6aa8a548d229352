"""Crash-consistent cuts: every shipped batch, applied in order, equals a real point-in-time image.

The image's exact contents are recorded *at the cut instant*, in the same event-loop step as the
cut, so "before the cut" and "after the cut" are exactly what the guest's requests saw. Guest
writes keep hammering overlapping blocks while each batch is being read, so copy-on-write is
exercised on every cut, including its spill file.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import pytest

from agents.body import BatchStats, batch_body
from agents.cut import Cut
from agents.disk import TrackedExport
from agents.replicate import DiskReplicator
from agents.service import Agent
from common.config import AgentConfig, load_config
from common.hrl import Compression, ExtentKind, decode_batch
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    Receiver,
    VMSpec,
    make_image,
    write_agent_config,
)
from tests.support_body import cut_header

pytestmark = pytest.mark.timeout(120)


def _apply(replica: bytearray, batch: bytes) -> tuple[int, bool]:
    header, extents, _end = decode_batch(batch)
    for ext in extents:
        data = ext.data if ext.kind is ExtentKind.DATA else bytes(ext.length)
        assert data is not None
        replica[ext.offset : ext.offset + ext.length] = data
    return header.seq, header.full


async def _guest(
    export: TrackedExport, stop: asyncio.Event, rng: random.Random, *, small: bool
) -> int:
    """Random overlapping writes, zeroes and trims, straight into the export, inline.

    ``small``: 4 KiB-aligned requests of 4 KiB (a database's pattern) instead of any length up
    to three blocks.
    """
    ops = 0
    bs = export.block_size
    size = export.size
    hot = size // 4  # most requests go to a quarter of the disk: lots of overlap
    while not stop.is_set():
        kind = rng.random()
        if small:
            length = 4096
            offset = rng.randrange(0, (hot if rng.random() < 0.8 else size) // 4096) * 4096
        else:
            length = rng.randint(1, 3 * bs)
            offset = rng.randrange(0, (hot if rng.random() < 0.8 else size) - length)
        if kind < 0.8:
            export.write(offset, memoryview(rng.randbytes(length)), False)
        elif kind < 0.9:
            export.write_zeroes(offset, length, rng.random() < 0.5, False)
        else:
            export.trim(offset, length, False)
        ops += 1
        if ops % 4 == 0:
            # A few requests per turn: the batch body gives the loop a turn only every 64 KiB
            # of reads, and copy-on-write must still be hit hard.
            await asyncio.sleep(0)
    return ops


@pytest.mark.parametrize(
    ("block_size", "small"),
    [(4096, False), (65536, False), (65536, True)],
    ids=["4k-blocks", "64k-blocks", "64k-blocks-4k-writes"],
)
async def test_hammered_cuts_equal_point_in_time_images(
    tmp_path: Path, block_size: int, small: bool
) -> None:
    """Batches cut under a storm of overlapping guest requests each equal the image at their cut.

    One batch in four is abandoned half-way (a lost upload): its blocks merge back and the next
    batch must still produce the exact image of *its* cut. With 64 KiB blocks the batches carry
    only the changed 4 KiB grains, and blocks are read in several extents.
    """
    rng = random.Random(1234)
    size = 4 * MiB
    image = make_image(tmp_path / "d.img", size, fill=lambda i: rng.randbytes(MiB))
    export = TrackedExport(
        image,
        "d",
        block_size=block_size,
        map_path=tmp_path / "d.map",
        cow_memory_limit=64 * 1024,  # force the spill file early
        spill_path=tmp_path / "d.cow",
    )
    export.open()
    replica = bytearray(image.read_bytes())  # as after a completed initial copy
    stop = asyncio.Event()
    guest = asyncio.create_task(_guest(export, stop, rng, small=small))
    seq = 0
    cuts = applied = abandoned = spilled = copied = 0
    try:
        for _ in range(60):
            await asyncio.sleep(rng.uniform(0, 0.01))
            cut: Cut = export.begin_cut()
            snapshot = image.read_bytes()  # same loop step as the cut: the point in time
            cuts += 1
            header = cut_header(cut, compression=Compression.ZSTD, full=False, seq=seq + 1)
            body = batch_body(
                cut, header, level=1, bucket=None, stats=BatchStats(), max_extent=64 * 1024
            )
            chunks: list[bytes] = []
            abandon = rng.random() < 0.25
            async for chunk in body:
                chunks.append(chunk)
                await asyncio.sleep(0)  # the guest runs between every chunk
                if abandon and len(chunks) > 1:
                    break
            spilled += cut.cow.spilled_blocks
            copied += cut.cow.copied_blocks
            if abandon:
                await body.aclose()
                export.end_cut(acked=False)
                abandoned += 1
                continue
            got_seq, _full = _apply(replica, b"".join(chunks))
            assert got_seq == seq + 1
            seq = got_seq
            export.end_cut(acked=True)
            applied += 1
            assert replica == snapshot, f"batch {seq} differs from the image at its cut"
    finally:
        stop.set()
        ops = await guest
        export.close()
    assert applied > 30
    assert abandoned > 5
    assert copied > 100, "copy-on-write was never exercised"
    assert spilled > 0, "the spill file was never exercised"
    assert ops > 1000


@pytest.mark.parametrize("block_size", [4096, 65536])
async def test_cuts_through_real_nbd_clients_and_broker(tmp_path: Path, block_size: int) -> None:
    """Three NBD clients hammer overlapping blocks while the full agent stack cuts and ships.

    Every batch the (stand-in) broker applies is compared with the image recorded at that
    batch's cut instant, before the broker acks it (with 64 KiB blocks, through grain-precise
    extents).
    """
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    size = 8 * MiB
    image = make_image(tmp_path / "d.img", size, fill=lambda i: os.urandom(MiB))
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    cfg_path = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[url],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "sock",
        policy_extra=f"block_size = {block_size}",
    )
    agent = Agent(load_config(cfg_path, AgentConfig))
    await agent.start()
    worker = agent.workers[0]
    rep: DiskReplicator = agent.replicators[0]
    snapshots: dict[int, bytes] = {}
    original = rep.begin_cut

    def begin_cut_and_record(cut_time_ns: int, cut_id: int) -> Cut:
        cut = original(cut_time_ns, cut_id)
        snapshots[cut_time_ns] = image.read_bytes()  # same loop step as the cut
        return cut

    rep.begin_cut = begin_cut_and_record  # type: ignore[method-assign]
    checked: list[int] = []
    mismatches: list[int] = []
    apply = rx._apply

    def apply_and_check(rec: object, extents: list) -> None:  # type: ignore[type-arg]
        apply(rec, extents)  # type: ignore[arg-type]
        replica = rx.replica(vm.uuid, "disk0")
        cut_ns = max(snapshots)  # the batch being applied is of the newest cut
        if replica.image.read_bytes() != snapshots[cut_ns]:
            mismatches.append(cut_ns)
        checked.append(cut_ns)

    rx._apply = apply_and_check  # type: ignore[method-assign]
    stop = threading.Event()
    sock = tmp_path / "sock" / "vm1-disk0.sock"

    def client(seed: int) -> int:
        rnd = random.Random(seed)
        nbd = MiniNBD(sock, "vm1-disk0")
        n = 0
        try:
            while not stop.is_set():
                length = rnd.choice([512, 4096, 4096, 4096, 6000, 16384, 70000])
                offset = rnd.randrange(0, 2 * MiB - length)  # all three overlap here
                if length == 4096:
                    offset &= ~4095  # the 4 KiB writes are aligned, as a database's are
                op = rnd.random()
                if op < 0.85:
                    nbd.write(offset, rnd.randbytes(length), fua=rnd.random() < 0.05)
                elif op < 0.95:
                    nbd.write_zeroes(offset, length)
                else:
                    nbd.trim(offset, length)
                n += 1
        finally:
            nbd.close()
        return n

    try:
        await rep.prepare()  # initial copy of the random image
        assert await worker.cycle([rep])
        snapshots.clear()
        checked.clear()
        clients = [asyncio.create_task(asyncio.to_thread(client, s)) for s in range(3)]
        rx.lose_acks = 0
        for i in range(25):
            if i % 6 == 5:
                rx.lose_acks = 1  # a durable batch whose ack never arrives
            ok = await worker.cycle([rep])
            if not ok:
                await rep.prepare()
            await asyncio.sleep(0.02)
        stop.set()
        writes = sum(await asyncio.gather(*clients))
        # A final cut with the clients gone: the replica must equal the image exactly.
        if not await worker.cycle([rep]):
            await rep.prepare()
            assert await worker.cycle([rep])
        lost_acks = rep.status.errors
    finally:
        stop.set()
        await agent.stop()
        await rx.stop()
    assert not mismatches, f"{len(mismatches)} of {len(checked)} batches differ from their cut"
    assert len(checked) >= 20
    assert writes > 200
    assert lost_acks >= 3, "the lost-ack path was not exercised"
    assert rx.replica(vm.uuid, "disk0").image.read_bytes() == image.read_bytes()
    seqs = [b.header.seq for b in rx.replica(vm.uuid, "disk0").batches]
    assert seqs == list(range(1, len(seqs) + 1))
