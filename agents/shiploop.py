"""Shipping off the guest's event loop (decision 025): batches are encoded and uploaded by a
second event loop in its own thread, while every touch of a cut stays on the NBD loop.

The NBD server's loop (the *home* loop) keeps what the cut's consistency needs: the cut itself
(the swap of maps for all of a VM's disks in one step), the copy-on-write before a guest write
lands on a frozen block, and each extent's read (image read, overlay of the copies, state change
to SENT) in one step. :class:`LoopCut` hands the shipping loop a view of the cut whose ``read``
runs as a callback on the home loop, so it is still atomic with respect to guest requests and
never races the copy-on-write: no lock is needed, and the argument of ``docs/agent.md`` (Cuts and
copy-on-write) holds as before. What moves off the home loop is everything else: planning (which
reads only what no guest request changes while the cut is shipped, see :meth:`LoopCut.plan`),
zero detection, checksums, compression, HRL framing, TLS and the socket writes of the upload, and
the wait for the broker's ack.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from uuid import UUID

from agents.cut import Cut, PlannedExtent
from agents.ship import Ack, BrokerClient, Sender
from agents.shipproc import Shipper
from common.config import TLSFiles
from common.logs import get_logger

T = TypeVar("T")
log = get_logger("agents.shiploop")

_PLAN_CHUNK = 512  # planned extents between two checks that the cut is still held
# How long a thread holding the GIL keeps it while another waits: CPython's 5 ms default would
# let the shipping thread's Python work hold a guest request that long (see decision 025).
SWITCH_INTERVAL = 0.0005


class ShipLoop:
    """An event loop in a thread of its own, for the uploads of every disk.

    The thread and the worker threads of its executor (compression) run ``nice`` levels below
    the process while every VM's lag is under half its RPO, and at the process's own priority
    while any VM's is not (:meth:`report`, decision 028): when guest requests and shipping want the
    same core, the guest's run first unless that costs a VM its reserve.
    """

    def __init__(self, nice: int = 0) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.loop = asyncio.new_event_loop()
        self.nice = nice
        self._base = os.getpriority(os.PRIO_PROCESS, 0)
        self._tids: set[int] = set()
        self._pids: set[int] = set()
        self._behind: set[str] = set()
        self._guard = threading.Lock()
        self._warned = False
        self.loop.set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="replikant-ship", initializer=self._enrol)
        )
        self._thread = threading.Thread(target=self._run, name="replikant-ship", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._enrol()
        self.loop.run_forever()

    def _enrol(self) -> None:
        # Each shipping thread sets its own priority as it starts: one inherited from its
        # creator may be stale by then.
        with self._guard:
            tid = threading.get_native_id()
            self._tids.add(tid)
            if self.nice:
                self._set_priority(tid, self._target())

    def enrol_process(self, pid: int | None) -> None:
        """Let the shipping process ``pid`` (decision 029) follow the same rule: its threads
        now, and those it starts later, which inherit its main thread's priority.
        None: it ended (its pid may be given to another process)."""
        with self._guard:
            self._pids = {pid} if pid is not None else set()
            if self.nice and pid is not None:
                self._set_process(pid, self._target())

    def _set_process(self, pid: int, nice: int) -> None:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            self._pids.discard(pid)  # it ended
            return
        for tid in tids:
            self._set_priority(tid, nice)

    def _target(self) -> int:
        return self._base if self._behind else min(19, self._base + self.nice)

    def report(self, vm: str, *, behind: bool) -> None:
        """Whether ``vm``'s lag passed half its RPO at its last cycle: while any VM's did, shipping
        competes for the CPU at the process's own priority; once none does, below it."""
        if not self.nice:
            return
        with self._guard:
            before = bool(self._behind)
            if behind:
                self._behind.add(vm)
            else:
                self._behind.discard(vm)
            if bool(self._behind) == before:
                return
            target = self._target()
            for tid in self._tids:
                self._set_priority(tid, target)
            for pid in list(self._pids):
                self._set_process(pid, target)
        log.debug("shipping_priority_changed", nice=target, behind=sorted(self._behind))

    def _set_priority(self, tid: int, nice: int) -> None:
        """Set thread ``tid``'s nice value (Linux keeps one per thread; new threads inherit it).

        Raising it back needs ``RLIMIT_NICE`` (the unit's ``LimitNICE=+0``) or ``CAP_SYS_NICE``,
        and a sandbox may refuse the call: either costs only the priority, with one warning.
        """
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            pass  # a worker thread that has ended
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "shipping_priority_unchanged",
                    nice=nice,
                    error=str(exc),
                    fix="allow setpriority(2) and set LimitNICE=+0 in the agent's unit (as "
                    "deploy/replikant-agent.service does), or set [agent] shipping_nice = 0",
                )

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the shipping loop; cancelling the caller cancels it there too."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        """Stop the loop and its thread (call once nothing runs on it any more).

        Waits off the calling loop: a body still reading on the shipping loop waits for a step
        of the calling (home) loop, which must go on turning meanwhile.
        """
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join, 10)
        if not self._thread.is_alive():
            self.loop.close()


def _submit(home: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Schedule ``fn`` as one callback of ``home``; its result arrives in the future."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def step() -> None:
        if not fut.set_running_or_notify_cancel():
            return  # the waiter gave up (an abandoned upload): touch nothing
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread, raised there
            fut.set_exception(exc)

    home.call_soon_threadsafe(step)
    return fut


def on_loop(home: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> T:
    """Run ``fn`` as one callback of ``home`` and wait for its result (from another thread)."""
    return _submit(home, fn).result()


class LoopCut(Cut):
    """A view of ``cut`` for the shipping loop: reads run on ``home``, planning here.

    Not a copy: the frozen map, the copies and the state changes stay with ``cut``, changed only
    by the home loop.
    """

    def __init__(self, cut: Cut, home: asyncio.AbstractEventLoop) -> None:
        # No super().__init__(): every attribute batch_body uses is forwarded to ``cut``.
        self._cut = cut
        self._home = home
        self.cut_id = cut.cut_id
        self.cut_time_ns = cut.cut_time_ns
        self.size = cut.size
        self.block_size = cut.block_size

    @property
    def closed(self) -> bool:  # type: ignore[override]  # read-only: the owner closes the cut
        """The upload was abandoned (the cut released by its owner)."""
        return self._cut.closed

    def plan(self, max_data_extent: int) -> Iterator[PlannedExtent]:
        """The cut's plan, made on the calling (shipping) thread.

        Safe off the home loop (decision 027): the plan depends only on which frozen blocks are
        not CLEAN, their kind with COWED and SENT counted as DATA, and the frozen grain bits.
        While the cut is shipped the home loop changes a frozen block only from DATA to COWED
        (copy-on-write) or to SENT (read), which the plan cannot tell apart, and each slice of
        the map it reads is one step under the GIL. Grain bits change only in the cut's own loop
        step and after it is released; a plan step that finds the cut released fails the stream.
        """
        it = self._cut.plan(max_data_extent)
        while True:
            try:
                chunk = list(itertools.islice(it, _PLAN_CHUNK))
            except ValueError:  # a map closed under the plan: the cut was released
                if not self._cut.closed:
                    raise
                chunk = []
            if self._cut.closed:
                raise ConnectionAbortedError("the batch was abandoned while it was being planned")
            if not chunk:
                return
            yield from chunk

    def read(self, ext: PlannedExtent) -> bytes | bytearray:
        """The extent's cut-time contents, read in a step of the home loop (blocking)."""
        return on_loop(self._home, lambda: self._read_many([ext]))[0]

    async def fetch(self, exts: Sequence[PlannedExtent]) -> list[bytes | bytearray]:
        """The DATA extents' cut-time contents, read in one step of the home loop.

        Awaited, not waited for: meanwhile the shipping loop goes on with other disks' uploads.
        Then this thread offers the GIL and its core to the NBD loop's thread: releasing the GIL
        alone does not hand it over (the releasing thread usually takes it back first), so a
        guest request that arrived meanwhile would wait for the switch interval.
        """
        contents = await asyncio.wrap_future(_submit(self._home, lambda: self._read_many(exts)))
        os.sched_yield()
        return contents

    def _read_many(self, exts: Sequence[PlannedExtent]) -> list[bytes | bytearray]:
        if self._cut.closed:
            # Abandoned between batch_body's check and this step: fail the stream (an OSError,
            # as a dropped connection is), never read a released map.
            raise ConnectionAbortedError("the batch was abandoned while it was being read")
        return self._cut.read_many(exts)


class Uploader:
    """Uploads batches through the shipping process (decision 029), with a broker client of its
    own on the shipping loop deciding where each goes and what the answers mean."""

    def __init__(self, ship: ShipLoop, client: BrokerClient, tls: TLSFiles | None) -> None:
        self.ship = ship
        self.client = client  # used on the shipping loop only (aiohttp sessions are per loop)
        connect, ack = client.timeouts
        settings = {
            "tls": [str(tls.ca), str(tls.cert), str(tls.key)] if tls is not None else None,
            "cluster": client.cluster,
            "connect_timeout": connect,
            "ack_timeout": ack,
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        }
        self.shipper = Shipper(settings, on_pid=ship.enrol_process)
        """Plans, reads, encodes and uploads the batches in a process of its own."""
        self._early: asyncio.Future[None] | None = None

    def prestart(self) -> None:
        """Start the shipping process now, while the agent opens its disks, so that the first
        batch does not wait for the process's imports (~0.3 s). A start that fails here is
        tried again by the first batch, which reports the error with its fix."""
        self.shipper.home = asyncio.get_running_loop()
        self._early = asyncio.ensure_future(self.ship.run(self.shipper.start()))
        self._early.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def upload_from(self, vm_uuid: UUID, disk_id: str, send: Sender, *, what: str) -> Ack:
        """:meth:`BrokerClient.upload_from`, run on the shipping loop."""
        return await self.ship.run(self.client.upload_from(vm_uuid, disk_id, send, what=what))

    async def close(self) -> None:
        """Stop the shipping process, close the client's pool (on its loop), stop the loop."""
        if self._early is not None:
            await asyncio.gather(self._early, return_exceptions=True)
        await self.ship.run(self.shipper.close_ship())
        await self.shipper.close_home()
        await self.ship.run(self.client.close())
        await self.ship.close()
