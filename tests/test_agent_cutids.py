"""The agent's cut ids and idleness statements, as the batches on the wire carry them.

A real :class:`agents.service.Agent` protects a two-disk VM and ships to the stand-in broker of
``tests/support_agent.py``, which records every batch header it accepts; guest writes go through
real NBD connections to the agent's exports.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agents.service import Agent
from common.config import AgentConfig, load_config
from common.hrl import BatchHeader
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


async def test_cut_ids_are_shared_by_disks_grow_and_survive_a_restart(tmp_path: Path) -> None:
    """Both disks' batches of a cut carry one cut id; ids grow; a failed batch's changes keep
    their first cut; a restarted agent continues above every id it used, stating nothing."""
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    vm = VMSpec(
        "vm1", [DiskSpec(d, make_image(tmp_path / f"{d}.img", 2 * MiB)) for d in ("d0", "d1")]
    )
    cfg_path = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[url],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "sock",
        policy_extra="block_size = 4096",
    )

    def last(disk: str) -> BatchHeader:
        return rx.replica(vm.uuid, disk).batches[-1].header

    async def cycle(agent: Agent) -> bool:
        worker = agent.workers[0]
        for rep in worker.replicators:
            if not rep.ready:
                await rep.prepare()
        return await worker.cycle(worker.replicators)

    def write(disk: str, offset: int) -> None:
        nbd = MiniNBD(tmp_path / "sock" / f"vm1-{disk}.sock", f"vm1-{disk}")
        try:
            nbd.write(offset, b"x" * 4096, fua=True)
        finally:
            nbd.close()

    agent = Agent(load_config(cfg_path, AgentConfig))
    await agent.start()
    try:
        for _ in range(3):  # the (empty) initial copy, then the first deltas
            assert await cycle(agent)
        first = [last(d) for d in ("d0", "d1")]
        assert first[0].cut_id == first[1].cut_id > 0
        # d0 changes, then its batch fails (and d1's too): d0's changes began at that cut.
        await asyncio.to_thread(write, "d0", 0)
        rx.reject_batches = 2
        assert not await cycle(agent)
        failed_cut = agent.workers[0].cuts.last
        assert failed_cut > first[0].cut_id
        assert await cycle(agent)
        h0, h1 = last("d0"), last("d1")
        assert h0.cut_id == h1.cut_id > failed_cut
        assert h0.first_change_cut == failed_cut, "the merged changes lost their first cut"
        assert h1.first_change_cut == h1.cut_id, "an idle disk must state it did not change"
        assert h0.seq == h1.seq == first[0].seq + 1
        # A write to d1 right before the next cut: its changes began at that very cut.
        await asyncio.to_thread(write, "d1", 8192)
        assert await cycle(agent)
        h0, h1 = last("d0"), last("d1")
        assert h1.first_change_cut == h1.cut_id == h0.cut_id == h0.first_change_cut
        used = h1.cut_id
    finally:
        await agent.stop()
    # A restart: ids continue above anything handed out before; the pending changes of unknown
    # age (the recovered dirty map) make no idleness statement.
    agent = Agent(load_config(cfg_path, AgentConfig))
    await agent.start()
    try:
        assert await cycle(agent)
        h0, h1 = last("d0"), last("d1")
        assert h0.cut_id == h1.cut_id > used
        assert h0.first_change_cut == h1.first_change_cut == 0
        assert (tmp_path / "state" / str(vm.uuid) / "_cuts.json").stat().st_mode & 0o777 == 0o600
    finally:
        await agent.stop()
        await rx.stop()
