"""READs the page cache cannot answer: read together, on the loop or in the server's threads.

The server queues such READs here while it works through what one socket read brought
(``common/nbd/connection.py``), then reads them as one batch: the backend is asked to prefetch all
of them (``cache``, so the disk reads them side by side) and then reads them one by one. Their
replies go out together, after those of the requests that came behind them in the same socket
read, which NBD allows: replies carry the request's cookie.

Where the batch is read is learned from how long batches took (:class:`ReadRoute`). A disk that
answers within a few hundred microseconds is read on the loop: handing a batch to a thread and
back costs ~50-70 us, as much as such a read. A slower disk (spinning, networked, throttled) is
read in the pool: on the loop, every other request of every client would wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Final

from common.nbd.constants import Errno
from common.nbd.errors import ExportError
from common.nbd.events import Request

Buffer = bytes | bytearray | memoryview
Result = Buffer | Exception
Done = Callable[[Sequence[tuple[Request, Result]]], None]

MAX_POOL_READ_BYTES: Final = 64 * 1024 * 1024
"""READ bytes one connection may have queued or in the pool. Past it the server reads on the loop
as before, so a client that queues more than it reads back holds no more memory than this."""


class ReadRoute:
    """Whether the next batch is read on the loop or in the pool: plain logic, no I/O.

    An exponentially weighted mean of how long batches took decides: under ``fast`` seconds,
    the loop. One slow batch moves reads to the pool at once; they come back after a run of
    fast ones, which the pool's batches report too.
    """

    def __init__(self, fast: float = 300e-6, weight: float = 0.2) -> None:
        self.fast = fast
        self.weight = weight
        self.mean = 0.0

    @property
    def inline(self) -> bool:
        """Read the next batch on the loop."""
        return self.mean < self.fast

    def observed(self, seconds: float) -> None:
        """A batch took ``seconds`` to read."""
        self.mean += self.weight * (seconds - self.mean)


class PoolReads:
    """One connection's READs for ``executor``: those queued for the next job and those in one."""

    def __init__(self, executor: Executor, limit: int = MAX_POOL_READ_BYTES) -> None:
        self._executor = executor
        self._limit = limit
        self.route = ReadRoute()
        self._queued: list[Request] = []
        self.count = 0  # queued or in a job
        self.bytes = 0

    def has_room(self, length: int) -> bool:
        """Whether a READ of ``length`` bytes fits in this connection's budget."""
        return self.bytes + length <= self._limit

    def add(self, request: Request) -> None:
        """Queue a READ for the next :meth:`submit`."""
        self._queued.append(request)
        self.count += 1
        self.bytes += request.length

    @property
    def queued(self) -> bool:
        """Whether READs wait for :meth:`submit`."""
        return bool(self._queued)

    def submit(
        self, read: Callable[[int, int], Buffer], cache: Callable[[int, int], None], done: Done
    ) -> None:
        """Read the queued READs as one batch, here or in the pool (:class:`ReadRoute`);
        ``done`` gets each with exactly its length of bytes or its exception, on the loop: before
        this returns when read here (or when the pool is shut down: the server is closing)."""
        batch, self._queued = self._queued, []
        if self.route.inline:
            results, seconds = _read_all(read, cache, batch)
            self.route.observed(seconds)
            self._finish(batch, done, results)
            return
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                self._executor, _read_all, read, cache, batch
            )
        except RuntimeError:
            self._finish(batch, done, None)
            return
        fut.add_done_callback(partial(self._finished, batch, done))

    def _finished(
        self, batch: list[Request], done: Done, fut: asyncio.Future[tuple[list[Result], float]]
    ) -> None:
        if fut.cancelled():
            self._finish(batch, done, None)
            return
        results, seconds = fut.result()
        self.route.observed(seconds)
        self._finish(batch, done, results)

    def _finish(self, batch: list[Request], done: Done, results: list[Result] | None) -> None:
        self.count -= len(batch)
        self.bytes -= sum(r.length for r in batch)
        if results is None:
            results = [ExportError(Errno.ESHUTDOWN, "the server is closing")] * len(batch)
        done(list(zip(batch, results, strict=True)))


def _read_all(
    read: Callable[[int, int], Buffer], cache: Callable[[int, int], None], batch: list[Request]
) -> tuple[list[Result], float]:
    start = time.perf_counter()
    if len(batch) > 1:  # the disk works on all of them while the first is read
        for r in batch:
            with contextlib.suppress(Exception):  # only a hint
                cache(r.offset, r.length)
    results: list[Result] = []
    for r in batch:
        try:
            buf = read(r.offset, r.length)
        except Exception as exc:
            results.append(exc)
            continue
        ok = len(buf) == r.length
        results.append(buf if ok else ExportError(Errno.EIO, f"backend returned {len(buf)} bytes"))
    return results, time.perf_counter() - start
