"""kill -9 of the agent, 50 times, under a continuous write load: nothing lost, no full copy.

The agent runs as a real ``replikant agent run`` process and ships to a real ``replikant broker
run`` process over HTTPS with mutual TLS. A writer thread writes random blocks through the agent's
NBD export and remembers every acknowledged write. The agent is killed with SIGKILL at a random
instant (mid-write, mid-cut or mid-upload), restarted at once, and the broker's replica image must
then converge to a byte-identical copy of the source image, having been sent only a bounded delta
(no FULL batch after the initial copy). A write that failed because the agent died is retried
after the restart, so the image's final contents are known exactly and checked at the end.

Evidence comes from the real parts: the replica image and the sequence audit ``applied.log`` in
the broker's store, the broker's replica state over its HTTPS API, and the agent's
``batch_acked`` log events (what each agent process shipped, and how much).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.tls import client_context
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    NBDClientError,
    ReplikantProc,
    VMSpec,
    agent_process,
    broker_config,
    export_ready,
    free_port,
    log_events,
    make_image,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KILLS = 50
INTERVAL = 0.25
SIZE = 64 * MiB
PAGE = 4096
REGION = 4 * MiB


class Writer:
    """Writes random pages into one hot region per burst; remembers what was acknowledged."""

    def __init__(self, sock: Path, export: str, seed: int, pages: tuple[int, ...]) -> None:
        self.sock = sock
        self.pages = pages
        self.export = export
        self.rng = random.Random(seed)
        self.model: dict[int, bytes] = {}
        self.pending: tuple[int, bytes] | None = None
        self.acked = 0

    def burst(self, stop: threading.Event, region: int) -> None:
        """Write until ``stop`` or until the agent dies (the failed write stays pending)."""
        try:
            nbd = MiniNBD(self.sock, self.export, timeout=5)
        except (OSError, NBDClientError):
            return
        try:
            if self.pending is not None:
                self._write(nbd, *self.pending)
            while not stop.is_set():
                pages = self.rng.choice(self.pages)
                first = self.rng.randrange(0, REGION // PAGE - pages)
                offset = region * REGION + first * PAGE
                self._write(nbd, offset, self.rng.randbytes(pages * PAGE))
        except (OSError, NBDClientError):
            return
        finally:
            nbd.sock.close()

    def _write(self, nbd: MiniNBD, offset: int, data: bytes) -> None:
        self.pending = (offset, data)
        nbd.write(offset, data, fua=self.rng.random() < 0.02)
        self.pending = None
        self.acked += 1
        for k in range(0, len(data), PAGE):
            self.model[offset + k] = data[k : k + PAGE]


def _same(a: Path, b: Path) -> bool:
    try:
        with a.open("rb") as fa, b.open("rb") as fb:
            while True:
                x = fa.read(8 * MiB)
                if x != fb.read(8 * MiB):
                    return False
                if not x:
                    return True
    except FileNotFoundError:  # the broker has not created the replica yet
        return False


def _alive(*procs: ReplikantProc) -> None:
    for p in procs:
        assert p.proc is not None
        if p.proc.poll() is not None:
            raise AssertionError(f"{p.args[0]} exited with {p.proc.returncode}; see {p.log}")


async def _start_agent(agent: ReplikantProc, broker: ReplikantProc, sock: Path, export: str) -> int:
    """Start the agent; return the agent log's size at the start (where its events begin)."""
    start = agent.log.stat().st_size if agent.log.exists() else 0
    agent.start()
    deadline = time.monotonic() + 20
    # Ready when the export answers (a stale socket file refuses connections).
    while not await asyncio.to_thread(export_ready, sock, export):
        _alive(agent, broker)
        if time.monotonic() > deadline:
            raise AssertionError(f"agent did not start; see {agent.log}")
        await asyncio.sleep(0.02)
    return start


async def _converge(
    http: aiohttp.ClientSession,
    state_url: str,
    replica: Path,
    image: Path,
    procs: tuple[ReplikantProc, ReplikantProc],
) -> int:
    """Wait until the broker's replica image equals ``image`` and everything durable is applied.

    Returns the broker's ``durable_seq`` after the comparison: every batch needed for the copy
    is at or below it. The images are compared when the broker has applied something new (and
    at least every second): reading 128 MiB on every poll would starve the agent and broker.
    """
    deadline = time.monotonic() + 20
    compared: tuple[int, float] | None = None  # (applied_seq, when) of the last comparison
    while True:
        _alive(*procs)
        try:
            async with http.get(state_url) as resp:
                state = await resp.json() if resp.status == 200 else None
        except aiohttp.ClientConnectionError:
            state = None  # the broker process may still be starting up (it was just launched)
        if state is not None and state["applied_seq"] == state["durable_seq"]:
            seq = int(state["durable_seq"])
            now = time.monotonic()
            if compared is None or compared[0] != seq or now - compared[1] > 1:
                if await asyncio.to_thread(_same, replica, image):
                    # Whatever made the copy equal is durable now (asked again, after it).
                    async with http.get(state_url) as resp:
                        assert resp.status == 200, await resp.text()
                        return int((await resp.json())["durable_seq"])
                compared = (seq, now)
        if time.monotonic() > deadline:
            raise AssertionError(f"replica did not converge; see {procs[0].log}, {procs[1].log}")
        await asyncio.sleep(0.02)


VARIANTS = {"mixed-writes": (1, 1, 2, 4, 16), "4k-writes": (1,)}


async def test_fifty_kill9_under_write_load_converge_without_full_copy(tmp_path: Path) -> None:
    """50 SIGKILLs at random instants: every restart converges byte-identical with a delta.

    Two variants, each with its own agent, broker and image: random writes of 1-16 pages, and
    random single pages (4 KiB grains of the default 64 KiB blocks). Cycles are the shortest a
    policy allows (0.25 s): every life cuts and ships several batches, so a kill falls in any
    phase of one, and a restart converges sooner. The variants run side by side: a life mostly
    waits for a process to start, so together they take little more than one alone, which is
    what lets the suite afford 100 kills. A failure names its variant.
    """
    async with asyncio.TaskGroup() as group:
        for name, pages in VARIANTS.items():
            group.create_task(_kill_fifty_times(tmp_path / name, pages, name))


async def _kill_fifty_times(tmp_path: Path, pages: tuple[int, ...], name: str) -> None:
    """One variant: its own processes under ``tmp_path``; ``name`` prefixes its failures."""
    try:
        await _variant(tmp_path, pages)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from e


async def _variant(tmp_path: Path, pages: tuple[int, ...]) -> None:
    await asyncio.to_thread(tmp_path.mkdir)
    rng = random.Random(99)
    pki = await asyncio.to_thread(make_pki, tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    broker = ReplikantProc(
        ["broker", "run", "--config", str(broker_config(tmp_path / "b.toml", pki, store, bport))],
        tmp_path / "broker.log",
    )
    image = make_image(
        tmp_path / "disk0.img", SIZE, fill=lambda i: rng.randbytes(MiB) if i % 8 == 0 else b""
    )
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    url = f"https://127.0.0.1:{bport}"
    agent = agent_process(
        tmp_path,
        pki=pki,
        broker_urls=[url],
        vms=[vm],
        interval=INTERVAL,
    )
    sock = tmp_path / "sock" / "vm1-disk0.sock"
    export = "vm1-disk0"
    replica_dir = store / str(vm.uuid) / "disk0"
    replica = replica_dir / "replica.img"
    state_url = f"{url}/v1/replicas/{vm.uuid}/disk0"
    procs = (agent, broker)
    writer = Writer(sock, export, seed=7, pages=pages)
    # (log offset where an agent process's events begin, broker durable_seq at its convergence)
    lives: list[tuple[int, int]] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki.agent.tls)))
    broker.start()
    try:
        start = await _start_agent(agent, broker, sock, export)
        lives.append((start, await _converge(http, state_url, replica, image, procs)))
        initial = len(_applied(replica_dir))
        for _ in range(KILLS):
            stop = threading.Event()
            burst = asyncio.create_task(
                asyncio.to_thread(writer.burst, stop, rng.randrange(SIZE // REGION))
            )
            await asyncio.sleep(rng.uniform(0.02, 2 * INTERVAL))
            agent.kill9()
            stop.set()
            await burst
            start = await _start_agent(agent, broker, sock, export)
            lives.append((start, await _converge(http, state_url, replica, image, procs)))
        # Let the last failed write through, converge, then stop both cleanly.
        stop = threading.Event()
        stop.set()
        await asyncio.to_thread(writer.burst, stop, 0)
        final_seq = await _converge(http, state_url, replica, image, procs)
        assert await asyncio.to_thread(agent.stop) == 0
        assert await asyncio.to_thread(broker.stop) == 0
    finally:
        await http.close()
        for p in procs:
            p.kill9()

    assert writer.acked > 1000, "the write load was too light to mean anything"
    # The broker's sequence audit: seqs 1..N each applied exactly once, one generation, and no
    # FULL batch after the initial copy.
    applied = _applied(replica_dir)
    seqs = [int(r["seq"]) for r in applied]
    assert seqs == list(range(1, len(seqs) + 1)), "a batch was applied twice or skipped"
    assert seqs[-1] >= final_seq
    assert {int(r["generation"]) for r in applied} == {1}
    # The initial copy is a run of FULL batches (the batch that completes it may already be a
    # delta by the first convergence); after it, never a FULL batch again.
    first_delta = next(i for i, r in enumerate(applied) if not r["full"])
    assert first_delta >= 1, "the initial copy went as FULL batches"
    assert first_delta <= initial
    assert not any(r["full"] for r in applied[first_delta:]), "a FULL copy happened after a kill"
    # The agents' side agrees: every acked batch is applied, and no FULL one after the first life.
    ends = [s for s, _ in lives[1:]] + [None]
    shipped = [
        log_events(agent.log, "batch_acked", s, e) for (s, _), e in zip(lives, ends, strict=True)
    ]
    assert {int(e["seq"]) for life in shipped for e in life} <= set(seqs)
    assert not any(e["full"] for life in shipped[1:] for e in life), "a FULL batch after a kill"
    # Each restart shipped (until its convergence) at most the regions written since the last
    # ack: a bounded delta.
    shipped_after_restart = [
        sum(int(e["data_bytes"]) for e in life if int(e["seq"]) <= converged)
        for life, (_, converged) in zip(shipped[1:], lives[1:], strict=True)
    ]
    assert len(shipped_after_restart) == KILLS
    assert max(shipped_after_restart) <= SIZE // 4, shipped_after_restart
    assert sum(shipped_after_restart) / KILLS < SIZE / 8
    # Every acknowledged write is in the image (and so in the replica).
    fd = os.open(image, os.O_RDONLY)
    try:
        for offset, data in writer.model.items():
            assert os.pread(fd, PAGE, offset) == data, f"acknowledged write at {offset} lost"
    finally:
        os.close(fd)
    assert _same(replica, image)


def _applied(replica_dir: Path) -> list[dict[str, Any]]:
    """The broker's ``applied.log``: one JSON record per applied batch, oldest first."""
    lines = (replica_dir / "applied.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
