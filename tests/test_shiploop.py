"""Shipping on its own loop (decision 025): the hand-off keeps every cut point-in-time.

Batches are encoded on the shipping loop's thread while a guest hammers overlapping blocks on
the NBD (home) loop. Every plan step and every extent read must run on the home loop's thread,
where they cannot interleave with a guest request's copy-on-write; each batch, applied in order,
must equal the image recorded in the loop step of its cut; an abandoned batch must never read
its released cut.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

import pytest

from agents.body import BatchStats, batch_body
from agents.cut import Cut
from agents.disk import TrackedExport
from agents.service import Agent
from agents.shiploop import LoopCut, ShipLoop
from common.config import AgentConfig, load_config
from common.hrl import Compression
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    Receiver,
    VMSpec,
    local_agent_config,
    make_image,
)
from tests.support_body import cut_header
from tests.test_agent_cut import _apply, _guest

pytestmark = pytest.mark.timeout(120)


async def _encode(cut: Cut, header_cut: Cut, seq: int, abandon_after: int) -> list[bytes]:
    """Run on the shipping loop: the batch body of ``cut`` (its first chunks only, if asked)."""
    header = cut_header(header_cut, compression=Compression.ZSTD, full=False, seq=seq)
    body = batch_body(cut, header, level=1, bucket=None, stats=BatchStats(), max_extent=64 * 1024)
    chunks: list[bytes] = []
    async for chunk in body:
        chunks.append(chunk)
        await asyncio.sleep(0.001)  # let the guest run on the home loop meanwhile
        if abandon_after and len(chunks) >= abandon_after:
            await body.aclose()
            break
    return chunks


@pytest.mark.parametrize("small", [False, True], ids=["any-writes", "4k-writes"])
async def test_batches_encoded_on_the_shipping_loop_equal_the_image_at_their_cut(
    tmp_path: Path, small: bool
) -> None:
    """Under a guest storm, reads hop to the home loop, and each batch equals its cut's image."""
    rng = random.Random(77)
    # The guest task draws from rng at times that vary from run to run: abandons come from a
    # generator of their own, so every run abandons the same cycles (a flake had 16 of 30).
    which = random.Random(78)
    size = 4 * MiB
    image = make_image(tmp_path / "d.img", size, fill=lambda i: rng.randbytes(MiB))
    home_thread = threading.get_ident()
    readers: set[int] = set()
    export = TrackedExport(
        image,
        "d",
        block_size=4096,
        map_path=tmp_path / "d.map",
        cow_memory_limit=64 * 1024,
        spill_path=tmp_path / "d.cow",
    )
    export.open()
    replica = bytearray(image.read_bytes())
    ship = ShipLoop()
    stop = asyncio.Event()
    guest = asyncio.create_task(_guest(export, stop, rng, small=small))
    seq = applied = abandoned = copied = 0
    try:
        for _ in range(30):
            await asyncio.sleep(rng.uniform(0, 0.01))
            cut = export.begin_cut()
            snapshot = image.read_bytes()  # same loop step as the cut: the point in time
            inner = cut.reader
            cut.reader = lambda off, n, inner=inner: (
                readers.add(threading.get_ident()),
                inner(off, n),
            )[1]
            abandon = which.random() < 0.25
            chunks = await ship.run(
                _encode(LoopCut(cut, asyncio.get_running_loop()), cut, seq + 1, 2 if abandon else 0)
            )
            copied += cut.cow.copied_blocks
            if abandon:
                export.end_cut(acked=False)
                abandoned += 1
                continue
            got, _full = _apply(replica, b"".join(chunks))
            assert got == seq + 1
            seq = got
            export.end_cut(acked=True)
            applied += 1
            assert replica == snapshot, f"batch {seq} differs from the image at its cut"
        # A read that reaches the home loop after its cut was released fails the stream.
        cut = export.begin_cut()
        export.write(0, memoryview(b"x" * 4096), False)
        view = LoopCut(cut, asyncio.get_running_loop())
        planned = await ship.run(asyncio.to_thread(lambda: list(view.plan(64 * 1024))))
        export.end_cut(acked=False)
        with pytest.raises(ConnectionAbortedError):
            await ship.run(asyncio.to_thread(view.read, planned[0]))
    finally:
        stop.set()
        ops = await guest
        await ship.close()
        export.close()
    assert readers == {home_thread}, "a cut was read off the home loop"
    assert applied > 15
    assert abandoned > 2
    assert copied > 50, "copy-on-write was never exercised"
    assert ops > 500


async def test_a_read_hop_leaves_the_shipping_loop_free_while_the_nbd_loop_is_busy(
    tmp_path: Path,
) -> None:
    """A batch awaiting its read hop lets the shipping loop run other uploads meanwhile."""
    image = make_image(tmp_path / "d.img", 4 * MiB, fill=lambda i: bytes([i + 1]) * MiB)
    export = TrackedExport(image, "d", block_size=4096, map_path=tmp_path / "d.map")
    export.open()
    for offset in (0, MiB, 3 * MiB):
        export.write(offset, memoryview(b"w" * 4096), False)
    cut = export.begin_cut()
    view = LoopCut(cut, asyncio.get_running_loop())
    ship = ShipLoop()

    async def read_while_ticking() -> tuple[int, list[bytes | bytearray]]:
        wanted = list(view.plan(64 * 1024))
        hop = asyncio.ensure_future(view.fetch(wanted))
        ticks = 0  # another task of the shipping loop, as another disk's upload would be
        while not hop.done():
            await asyncio.sleep(0.005)
            ticks += 1
        return ticks, await hop

    try:
        running = asyncio.run_coroutine_threadsafe(read_while_ticking(), ship.loop)
        # The NBD loop is busy in one long step (what this test is about): the hop waits for it.
        time.sleep(0.3)  # noqa: ASYNC251
        ticks, contents = await asyncio.wrap_future(running)
    finally:
        export.end_cut(acked=True)
        await ship.close()
        export.close()
    assert contents == [b"w" * 4096] * 3
    assert ticks >= 10, f"the shipping loop ran only {ticks} steps while the hop waited"


async def test_shipping_threads_run_below_the_nbd_loop() -> None:
    """The shipping thread and its executor's threads are niced, the caller is not; while a VM
    is behind its interval they run at the process's priority, then below it again."""
    me = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, me)
    ship = ShipLoop(nice=7)

    async def priorities() -> tuple[int, int]:
        def worker() -> int:  # compression runs here (the shipping loop's default executor)
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return own, await asyncio.get_running_loop().run_in_executor(None, worker)

    low = min(19, base + 7)
    try:
        seen = [await ship.run(priorities())]
        ship.report("vm-a", behind=True)
        ship.report("vm-b", behind=True)
        seen.append(await ship.run(priorities()))
        ship.report("vm-a", behind=False)  # vm-b is still behind
        seen.append(await ship.run(priorities()))
        ship.report("vm-b", behind=False)
        seen.append(await ship.run(priorities()))
    finally:
        await ship.close()
    assert seen == [(low, low), (base, base), (base, base), (low, low)]
    assert os.getpriority(os.PRIO_PROCESS, me) == base


async def test_a_vm_past_half_its_rpo_brings_shipping_back_to_the_guests_priority(
    tmp_path: Path,
) -> None:
    """The worker's rule (decision 028): with acks 0.7 s late, a VM whose RPO is 1 s has less
    than half of it in reserve, and the shipping thread runs at the process's priority; once the
    acks are prompt again it runs 10 levels below (the agent's default ``shipping_nice``), and
    a VM whose loop ends while behind (failed over) does not hold it there. The shipping
    process (decision 029) follows the same rule."""
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    vm = VMSpec("vm1", [DiskSpec("d0", make_image(tmp_path / "d0.img", 2 * MiB))])
    cfg = local_agent_config(
        tmp_path, pki, url, [vm], interval=0.25, policy_extra="rpo_seconds = 1.0"
    )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    agent = Agent(load_config(cfg, AgentConfig))
    await agent.start()
    stop = asyncio.Event()
    worker = asyncio.create_task(agent.workers[0].run(stop))

    async def shipping_nice() -> int:
        """The shipping thread's nice value, if the shipping process (decision 029) has the
        same one."""

        async def own() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        assert agent.uploader is not None
        thread = await agent.uploader.ship.run(own())
        pid = agent.uploader.shipper.pid
        process = thread if pid is None else os.getpriority(os.PRIO_PROCESS, pid)
        return thread if process == thread else -100

    async def settles_at(nice: int) -> None:
        for _ in range(200):
            if await shipping_nice() == nice:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"shipping stayed at nice {await shipping_nice()}, not {nice}")

    try:
        await settles_at(min(19, base + 10))
        rx.ack_delay = 0.7
        await settles_at(base)
        assert agent.uploader is not None
        assert agent.uploader.shipper.pid is not None
        rx.ack_delay = 0.0
        await settles_at(min(19, base + 10))
        rx.ack_delay = 0.7
        await settles_at(base)
        stop.set()
        await worker
        await settles_at(min(19, base + 10))
    finally:
        stop.set()
        await worker
        await agent.stop()
        await rx.stop()
