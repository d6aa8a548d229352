"""Where READs the page cache lacks are read, and how much a connection may queue (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from common.nbd.errors import ExportError
from common.nbd.events import Request
from common.nbd.readpool import PoolReads, ReadRoute, Result


def test_route_reads_on_the_loop_until_a_batch_is_slow_and_back_after_fast_ones() -> None:
    """Fast batches keep reads on the loop; one slow batch sends them to the threads at once;
    a run of fast ones (which the threads report too) brings them back."""
    route = ReadRoute(fast=300e-6, weight=0.2)
    assert route.inline
    for _ in range(50):
        route.observed(100e-6)
    assert route.inline
    route.observed(10e-3)  # a spinning disk's seek
    assert not route.inline
    fast = 0
    while not route.inline:
        route.observed(50e-6)
        fast += 1
    assert 5 < fast < 30, fast


def _read(offset: int, length: int) -> bytes:
    if offset == 666:
        raise OSError(5, "bad sector")
    return bytes([offset % 251]) * (length - (offset == 777))  # 777: a short read


def _answered(
    got: list[Sequence[tuple[Request, Result]]],
    done: asyncio.Event,
    results: Sequence[tuple[Request, Result]],
) -> None:
    got.append(results)
    done.set()


async def test_a_batch_answers_every_read_with_its_bytes_or_its_error() -> None:
    """Each queued READ gets exactly its bytes, or the exception its read raised, or EIO for a
    short read; the budget counts what is queued and frees it once answered; the backend was
    asked to prefetch the whole batch first."""
    prefetched: list[tuple[int, int]] = []
    got: list[Sequence[tuple[Request, Result]]] = []
    with ThreadPoolExecutor(2) as pool:
        reads = PoolReads(pool, limit=10_000)
        for route_inline in (True, False):
            reads.route.mean = 0.0 if route_inline else 1.0
            batch = [Request(0, 0, h, off, 4096, None) for h, off in enumerate((5, 666, 777))]
            for r in batch:
                reads.add(r)
            assert reads.count == 3
            assert not reads.has_room(10_000 - 3 * 4096 + 1)
            done = asyncio.Event()
            answered = partial(_answered, got, done)
            reads.submit(_read, lambda o, n: prefetched.append((o, n)), answered)
            async with asyncio.timeout(5):
                await done.wait()
            (results,) = got[-1:]
            assert [r for r, _ in results] == batch
            assert results[0][1] == bytes([5]) * 4096
            assert isinstance(results[1][1], OSError)
            assert isinstance(results[2][1], ExportError)
            assert reads.count == 0
            assert reads.has_room(10_000)
    assert prefetched == [(5, 4096), (666, 4096), (777, 4096)] * 2
