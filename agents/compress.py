"""Compression of big DATA extents on worker threads: several at once, records in extent order,
at a zstd level that follows what limits the copy (decision 015).

:func:`agents.body.batch_body` hands every big extent to a :class:`BigExtents`. zstd releases
the GIL, so up to ``workers`` extents compress at once while the event loop reads and hashes the
next; the records are still made by the loop, one at a time and in offset order, from the
payloads the workers return (:meth:`common.hrl.BatchEncoder.compressed_parts`).

Adaptive level (``adapt``, used for FULL batches): the configured level is the floor. Every
:data:`RETUNE_SECONDS` the pipeline looks at two things (:func:`next_level`). If the loop had to
wait for a worker, compression is what limits the copy: one level down. Host CPUs nearly busy
(below :data:`IDLE_DOWN` idle): one level down too, so that the agent's compression does not
take the CPU a guest or a co-located broker needs. Otherwise, if the host's CPUs sat idle for
at least :data:`IDLE_UP` of the time, the copy waits on something else (the link, the broker),
and bytes are what costs time: two levels up, at most :data:`ADAPT_MAX`. Every level makes a
standard zstd frame, so the broker decodes whatever mix arrives.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from typing import Final

import xxhash
import zstandard

from common.hrl import BatchEncoder
from common.logs import get_logger

_log = get_logger("agents.compress")

RETUNE_SECONDS: Final = 0.2
"""Seconds between two looks at the level: long enough for ``/proc/stat``'s 10 ms ticks."""
ADAPT_MAX: Final = 3
"""The highest level adapting goes to: zstd 3 still compresses ~400 MiB/s a core, enough to
fill a 1 Gbit/s link from one worker; higher levels cost several times the CPU for a few
percent fewer bytes on this kind of content."""
IDLE_UP: Final = 0.4
"""Host CPU idle share from which bytes cost more than CPU: a copy between two processes on
one 2-core host (the loopback bench) idles ~35 % and stays put; one over a link idles ~60 %."""
IDLE_DOWN: Final = 0.1
WAIT_DOWN: Final = 0.05
"""Share of the window the loop may wait on workers before that counts as compression-bound."""

_local = threading.local()
_adapted: dict[int, int] = {}  # floor -> level the last adapting batch ended at


def worker_count() -> int:
    """Worker threads for one batch: the CPUs this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _compress(view: memoryview, level: int) -> tuple[int, bytes]:
    """xxh3 and zstd frame of ``view`` (runs on a worker; one compressor per thread and level)."""
    cctxs: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctxs", None)
    if cctxs is None:
        cctxs = _local.cctxs = {}
    cctx = cctxs.get(level)
    if cctx is None:
        cctx = cctxs[level] = zstandard.ZstdCompressor(level=level)
    return xxhash.xxh3_64_intdigest(view), cctx.compress(view)


def _host_cpu() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot (``/proc/stat``)."""
    with open("/proc/stat", "rb") as fh:
        fields = [int(v) for v in fh.readline().split()[1:8]]
    return fields[3] + fields[4], sum(fields)


class BigExtents:
    """Big extents of one batch in flight on worker threads, handed back in submit order."""

    def __init__(self, encoder: BatchEncoder, level: int, *, adapt: bool, workers: int = 0) -> None:
        self.encoder = encoder
        self.floor = level
        self.adapt = adapt and level < ADAPT_MAX
        # The link and the host's CPUs are the same for the next batch: start where this
        # process's last FULL batch at this floor ended, not at the floor again.
        self.level = _adapted.get(level, level) if self.adapt else level
        self.workers = workers or worker_count()
        self._queue: deque[tuple[int, memoryview, int, asyncio.Future[tuple[int, bytes]]]] = deque()
        self._waited = 0.0
        self._mark = (time.monotonic(), *_host_cpu()) if self.adapt else (0.0, 0, 0)

    async def submit(
        self, offset: int, data: bytes | bytearray | memoryview, checksum: int
    ) -> list[tuple[bytes, bytes | memoryview]]:
        """Start compressing ``data`` (read at disk ``offset`` with xxh3 ``checksum``); return
        the records of older extents that had to finish to make room."""
        view = memoryview(data).cast("B")
        done = []
        while len(self._queue) >= self.workers:
            done.append(await self._take())
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, _compress, view, self.level)
        self._queue.append((offset, view, checksum, future))
        return done

    def __bool__(self) -> bool:
        """Whether an extent is still in flight (the body checks before each record: an await
        per extent for nothing cost it 3-4 % of its time)."""
        return bool(self._queue)

    async def drain(self) -> list[tuple[bytes, bytes | memoryview]]:
        """Records of every extent still in flight, in order (before any other record)."""
        return [await self._take() for _ in range(len(self._queue))]

    def cancel(self) -> None:
        """Forget what is in flight (an abandoned batch): the workers finish unread."""
        for *_, future in self._queue:
            future.cancel()
        self._queue.clear()

    async def _take(self) -> tuple[bytes, bytes | memoryview]:
        offset, view, checksum, future = self._queue.popleft()
        if not future.done():
            started = time.monotonic()
            await future
            self._waited += time.monotonic() - started
        xxh, payload = future.result()
        if self.adapt:
            self._retune()
        return self.encoder.compressed_parts(offset, view, payload, xxh=xxh, checksum=checksum)

    def _retune(self) -> None:
        """A new level from what the last :data:`RETUNE_SECONDS` showed (module docstring)."""
        now = time.monotonic()
        then, idle0, total0 = self._mark
        if now - then < RETUNE_SECONDS:
            return
        idle, total = _host_cpu()
        self._mark = (now, idle, total)
        waited, self._waited = self._waited / (now - then), 0.0
        idle_share = (idle - idle0) / max(1, total - total0)
        level = next_level(self.level, self.floor, waited=waited, idle=idle_share)
        if level != self.level:
            _log.debug(
                "compression_level_changed",
                zstd_level=level,
                was=self.level,
                waited=round(waited, 3),
                host_idle=round(idle_share, 3),
            )
        self.level = _adapted[self.floor] = level


def next_level(level: int, floor: int, *, waited: float, idle: float) -> int:
    """The level after one look: ``waited`` is the share of the time the loop waited for the
    workers, ``idle`` the share of the host's CPU time that was idle."""
    if waited > WAIT_DOWN or idle < IDLE_DOWN:
        step = -1
    elif idle >= IDLE_UP:
        step = 2  # up fast: a copy is short, and a wrong step up is undone within a look
    else:
        return level
    new = level + step
    if new == 0:  # zstd reads 0 as its default (3): step over it
        new += 1 if step > 0 else -1
    return max(floor, min(ADAPT_MAX, new))
