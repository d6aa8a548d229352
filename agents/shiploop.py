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
import collections
import concurrent.futures
import itertools
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar
from uuid import UUID

from agents.cut import Cut, PlannedExtent
from agents.dirtymap import DATA
from agents.ship import Ack, BrokerClient

T = TypeVar("T")

_PLAN_CHUNK = 512  # planned extents made visible to the read-ahead at a time
# Extents read per hop to the home loop: fewer wake-ups of the NBD loop for many small extents,
# while one hop stays a short step (a guest request waits for it at most).
_READ_EXTENTS = 32
_READ_BYTES = 256 * 1024
# How long a thread holding the GIL keeps it while another waits: CPython's 5 ms default would
# let the shipping thread's Python work hold a guest request that long (see decision 025).
SWITCH_INTERVAL = 0.0005


class ShipLoop:
    """An event loop in a thread of its own, for the uploads of every disk."""

    def __init__(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="replikant-ship", daemon=True
        )
        self._thread.start()

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


def on_loop(home: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> T:
    """Run ``fn`` as one callback of ``home`` and wait for its result (from another thread)."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def step() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread, raised there
            fut.set_exception(exc)

    home.call_soon_threadsafe(step)
    return fut.result()


class LoopCut(Cut):
    """A view of ``cut`` for the shipping loop: planning and reading run on ``home``.

    Not a copy: the frozen map, the copies and the state changes stay with ``cut``, touched only
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
        self._unread: collections.deque[PlannedExtent] = collections.deque()  # planned DATA
        self._read_ahead: dict[int, bytes | bytearray] = {}  # offset -> contents

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
        self._unread.clear()
        it = self._cut.plan(max_data_extent)
        while chunk := self._chunk(it):
            self._unread.extend(e for e in chunk if e.kind == DATA)
            yield from chunk

    def _chunk(self, it: Iterator[PlannedExtent]) -> list[PlannedExtent]:
        try:
            chunk = list(itertools.islice(it, _PLAN_CHUNK))
        except ValueError:  # a map closed under the plan: the cut was released
            if not self._cut.closed:
                raise
            chunk = []
        if self._cut.closed:
            raise ConnectionAbortedError("the batch was abandoned while it was being planned")
        return chunk

    def read(self, ext: PlannedExtent) -> bytes | bytearray:
        """The extent's cut-time contents, read in a step of the home loop.

        The step also reads the next few planned DATA extents (``batch_body`` reads them in plan
        order): each is read exactly as a step of its own would read it.
        """
        data = self._read_ahead.pop(ext.offset, None)
        if data is not None:
            return data
        batch = [ext]
        if self._unread and self._unread[0] == ext:
            self._unread.popleft()
            size = ext.length
            while self._unread and len(batch) < _READ_EXTENTS:
                nxt = self._unread[0]
                if size + nxt.length > _READ_BYTES:
                    break
                batch.append(self._unread.popleft())
                size += nxt.length
        got = on_loop(self._home, lambda: [self._read(e) for e in batch])
        self._read_ahead.update((e.offset, d) for e, d in zip(batch[1:], got[1:], strict=True))
        return got[0]

    def _read(self, ext: PlannedExtent) -> bytes | bytearray:
        if self._cut.closed:
            # Abandoned between batch_body's check and this step: fail the stream (an OSError,
            # as a dropped connection is), never read a released map.
            raise ConnectionAbortedError("the batch was abandoned while it was being read")
        return self._cut.read(ext)


class Uploader:
    """Uploads batches through the shipping loop, with a broker client of its own there."""

    def __init__(self, ship: ShipLoop, client: BrokerClient) -> None:
        self.ship = ship
        self.client = client  # used on the shipping loop only (aiohttp sessions are per loop)

    def view(self, cut: Cut) -> Cut:
        """What ``batch_body`` reads on the shipping loop (call on the home loop)."""
        return LoopCut(cut, asyncio.get_running_loop())

    async def upload(
        self, vm_uuid: UUID, disk_id: str, body: AsyncIterator[bytes], *, what: str
    ) -> Ack:
        """:meth:`BrokerClient.upload`, run on the shipping loop."""
        return await self.ship.run(self.client.upload(vm_uuid, disk_id, body, what=what))

    async def close(self) -> None:
        """Close the client's pool (on its loop) and stop the loop."""
        await self.ship.run(self.client.close())
        await self.ship.close()
