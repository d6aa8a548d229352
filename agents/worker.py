"""The per-VM worker: one replication loop per VM that cuts all the VM's disks at one instant
every policy interval, ships the batches, and answers verify with hashes of one cut.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from agents.body import MAX_EXTENT
from agents.current import CurrentStatements
from agents.cut import Cut
from agents.errors import ShipError
from agents.hooks import FreezeHooks
from agents.replicate import REFUSED_CODES, DiskReplicator
from agents.sequence import Mode
from agents.ship import Backoff
from agents.state import CutClock
from common.blockhash import hash_blocks
from common.config import Policy, VMConfig
from common.hrl import Consistency
from common.logs import get_logger

log = get_logger("agents.worker")


class Pace(Protocol):
    """Told after each cycle whether the VM's lag passed half its RPO (:class:`agents.shiploop.
    ShipLoop` gives shipping an equal share of the CPU while any VM's does, decision 028)."""

    def report(self, vm: str, *, behind: bool) -> None:
        """``behind``: writes made just after the previous cut reached the broker later than
        half the policy's ``rpo_seconds`` after it."""


@dataclass
class VMWorker:
    """The replication loop of one VM: cut every disk at once, ship, repeat."""

    vm: VMConfig
    policy: Policy
    replicators: list[DiskReplicator]
    hooks: FreezeHooks
    cuts: CutClock
    cycles: int = 0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one cycle (or verify) at a time
    current: CurrentStatements | None = None  # idle disks' statements (made on first use)
    idle: bool = False  # the last cycle shipped no batch: the next one cuts on the shared tick
    pace: Pace | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Cycle until ``stop`` is set; failures back off, the dirty map keeps collecting.

        Runs as its own task: the VM bound to its context here names every event of the task,
        the libraries' (aiohttp's) as well.
        """
        structlog.contextvars.bind_contextvars(vm=self.vm.name)
        try:
            await self._run(stop)
        finally:
            if self.pace is not None:
                # A VM that leaves (failed over, agent stopping) must not hold shipping at the
                # guests' priority for the VMs that stay.
                self.pace.report(str(self.vm.uuid), behind=False)

    async def _run(self, stop: asyncio.Event) -> None:
        interval = self.policy.interval_seconds
        due = time.monotonic()  # the first cut right away: ship what the map recovered
        previous = 0.0  # when the last shipped cycle began (its cut)
        while not stop.is_set():
            if self.cuts.running_low:
                await self._reserve_cut_ids()
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                if stop.is_set():
                    return
            started = time.monotonic()
            unfenced = [r for r in self.replicators if r.fenced is None]
            # A refused disk (403) waits out its slow retry; the others go on.
            live = [r for r in unfenced if r.refused_until <= started]
            failed = not unfenced
            async with self.lock:  # not while a seed export or a verify holds the disks
                # All at once: in an outage every disk shows its own error at the same time,
                # instead of one after another behind each other's timeouts.
                pending = [r for r in live if not r.ready]
                results = await asyncio.gather(
                    *(r.prepare() for r in pending), return_exceptions=True
                )
                for rep, result in zip(pending, results, strict=True):
                    if not isinstance(result, BaseException):
                        continue
                    if not isinstance(result, ShipError):
                        raise result
                    if result.code in REFUSED_CODES:
                        continue  # logged as replication_refused; retried slowly
                    failed = True
                    rep.record_error(result)
                    rep.log.warning("broker_unavailable", error=result.message, code=result.code)
            ready = [r for r in live if r.ready]
            if not ready:
                # Disks awaiting seed media are no failure: look at the replica next interval.
                due = time.monotonic() + self.backoff.next_delay() if failed else started + interval
                continue
            ok = await self.cycle(ready)
            if ok:
                if self.pace is not None:
                    # The lag this cycle ended (from the previous cut to this one's ack) must
                    # leave half the RPO in reserve for shipping to keep yielding to the guest.
                    lag = time.monotonic() - (previous or started)
                    self.pace.report(str(self.vm.uuid), behind=lag > self.policy.rpo_seconds / 2)
                previous = started
                self.backoff.reset()
                backlog = any(r.backlog for r in ready)
                if backlog:
                    due = time.monotonic()
                else:
                    due = next_due(started, interval) if self.idle else started + interval
            else:
                due = time.monotonic() + self.backoff.next_delay()

    async def _reserve_cut_ids(self) -> None:
        """Reserve the next block of cut ids off the loop. If the file cannot be written, one
        warning, and the cut that needs the ids tries itself, as it did before this existed."""
        async with self.lock:  # no cut takes an id while the file is written
            try:
                await asyncio.to_thread(self.cuts.reserve_ahead)
            except OSError as exc:
                log.warning(
                    "cut_ids_not_reserved",
                    path=str(self.cuts.path),
                    error=str(exc),
                    fix="make the agent's state_dir writable and give its file system space",
                )

    async def cycle(self, ready: list[DiskReplicator]) -> bool:
        """One cut of every ready disk at the same instant, then ship them all."""
        async with self.lock:
            # A seed export may have taken a disk out while this cycle waited for the lock.
            ready = [r for r in ready if r.ready and r.fenced is None]
            return await self._cycle(ready) if ready else True

    async def _cycle(self, ready: list[DiskReplicator]) -> bool:
        self.cycles += 1
        frozen = False
        if self.hooks.due(self.cycles):
            frozen = await self.hooks.freeze()
        # No await between these cuts: they are one step of the event loop, so no guest request
        # of any of the VM's disks falls between them.
        cut_id = self.next_cut_id()
        cut_time = time.time_ns()
        if self.current is None:
            self.current = CurrentStatements(self.vm.uuid)
        # An application-consistent cut ships every disk, so that each carries the flag.
        idle, skip = ([], False) if frozen else self.current.plan(ready)
        cuts = [(r, r.begin_cut(cut_time, cut_id)) for r in ready if not (skip and r in idle)]
        self.idle = not cuts
        if frozen:
            await self.hooks.thaw()
        consistency = Consistency.APP if frozen else Consistency.CRASH
        results = await asyncio.gather(
            self.current.declare(idle, cut_id, cut_time, probe=not skip),
            *(rep.ship(cut, consistency) for rep, cut in cuts),
        )
        return all(results)

    def next_cut_id(self) -> int:
        """Take the VM's next cut id, and tell every disk (cut or not) that a cut happens.

        Synchronous: call it in the loop step of the cut itself. The id is past anything the
        broker holds for any disk, so a lost state directory cannot make ids repeat.
        """
        for rep in self.replicators:
            self.cuts.observe(rep.broker_cut_id)
        cut_id = self.cuts.next()
        for rep in self.replicators:
            rep.note_cut(cut_id)
        return cut_id

    async def verify(self) -> list[dict[str, Any]]:
        """Cut every disk now, ship the cut, and hash the disks exactly as they were at it.

        A whole-disk snapshot (copy-on-write, like a cut's) is taken in the same loop step as
        the cut, so the hashes describe the very state the shipped batch brings the replica to.
        Raises :class:`ShipError` if a disk cannot be shipped.
        """
        async with self.lock:
            for rep in self.replicators:
                if rep.fenced is not None:
                    raise ShipError(f"disk {rep.disk.id} is fenced: {rep.fenced}")
                if not rep.ready:
                    await rep.prepare()
                if rep.mode is Mode.AWAITING_SEED:
                    raise ShipError(
                        f"disk {rep.disk.id} awaits its seed import and ships nothing yet",
                        fix="run `replikant seed import DIR` at the recovery site, then verify",
                        code="awaiting_seed",
                    )
            self.cycles += 1
            cut_id = self.next_cut_id()
            cut_time = time.time_ns()
            cuts = [(rep, rep.begin_cut(cut_time, cut_id)) for rep in self.replicators]
            snaps = [rep.export.begin_snapshot(cut_time) for rep in self.replicators]
            try:
                ok = await asyncio.gather(*(rep.ship(cut, Consistency.CRASH) for rep, cut in cuts))
                if not all(ok):
                    failed = [
                        r.disk.id for r, good in zip(self.replicators, ok, strict=True) if not good
                    ]
                    raise ShipError(f"the verify cut of {', '.join(failed)} was not acked")
                out = []
                for rep, snap in zip(self.replicators, snaps, strict=True):
                    hashes = await snapshot_hashes(snap, rep.export.block_size)
                    assert rep.state is not None
                    out.append(
                        {
                            "disk_id": rep.disk.id,
                            "generation": rep.state.generation,
                            "seq": rep.status.last_acked_seq,
                            "cut_id": cut_id,
                            "block_size": rep.export.block_size,
                            "disk_size": rep.export.size,
                            "hashes": base64.b64encode(hashes).decode("ascii"),
                        }
                    )
                return out
            finally:
                for rep, snap in zip(self.replicators, snaps, strict=True):
                    rep.export.end_snapshot(snap)


def next_due(started: float, interval: float) -> float:
    """The shared tick after a cycle that began at ``started``: the next multiple of
    ``interval`` on the monotonic clock, never later than ``started + interval``.

    Every idle VM of the agent with this interval cuts at the same instant, so their statements
    share one request (:class:`agents.current.StatementBatches`) instead of one each, spread
    over the second.
    """
    return math.floor((started + interval) / interval) * interval


async def snapshot_hashes(snap: Cut, block_size: int) -> bytes:
    """The hash list (:mod:`common.blockhash`) of a whole-disk snapshot."""
    out = bytearray()
    for ext in snap.plan(max(MAX_EXTENT, block_size)):
        data = memoryview(snap.read(ext))  # atomic w.r.t. guest requests
        out += hash_blocks(data, block_size)
        await asyncio.sleep(0)
    return bytes(out)


class InitialCopyProgress:
    """A rich progress bar per disk while initial copies (or seed exports) run, when stderr is
    a terminal.

    Without a terminal the ``initial_sync_progress`` (``seed_export_progress``) log events carry
    the same information.
    """

    def __init__(self) -> None:
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def update(
        self, rep: DiskReplicator, done: int, total: int, *, what: str = "initial copy"
    ) -> None:
        """Show ``done`` of ``total`` bytes of ``what`` for ``rep``'s disk."""
        if not sys.stderr.isatty():
            return
        from rich.progress import (  # noqa: PLC0415 - only on a terminal
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if self._progress is None:
            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
        key = f"{what} {rep.vm.name}/{rep.disk.id}"
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(key, total=total)
        self._progress.update(self._tasks[key], completed=done)
        if all(t.finished for t in self._progress.tasks):
            self._progress.stop()
            self._progress = None
            self._tasks.clear()
