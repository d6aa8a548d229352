"""The broker's worker threads for the data path: one pool for ingest, one for apply (and a
small one for read-ahead).

Every upload and every apply spends most of its wall time in fsync and fdatasync. On asyncio's
default executor (``min(32, cpus + 4)`` threads, 6 on a 2-core host, shared with everything
else) 100 replicas' uploads and applies queued behind each other's fsyncs, and the broker turned
over fewer batches a second than 100 disks at 1 s cycles send while using well under a core
(issue 10, point 6). With their own pools, many fsyncs are in flight at once and the file
system commits them together (ext4's journal takes every fsync waiting for the same commit), and
a slow apply never holds up an upload's ack.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

T = TypeVar("T")

INGEST_THREADS: Final = 32
APPLY_THREADS: Final = 32

INGEST: Final = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="ingest")
"""Uploads: decode, journal writes, the journal's fsync before the ack."""
APPLY: Final = ThreadPoolExecutor(APPLY_THREADS, thread_name_prefix="apply")
"""Appliers: undo capture, image writes, fdatasync, the audit line (one thread per replica)."""
PREFETCH: Final = ThreadPoolExecutor(4, thread_name_prefix="prefetch")
"""Read-ahead requests for the image ranges of incoming batches (their undo capture reads them),
off the ingest worker, whose time is an upload's time."""


def submit_in(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> Future[T]:
    """Start ``fn(*args)`` on ``pool`` with the caller's context; its future, to await later.

    Unlike an awaited :func:`run_in`, the call is not tied to one ``await``: the caller may go on
    (read the next part of an upload) and wait for it afterwards, or from another thread.
    """
    return pool.submit(functools.partial(contextvars.copy_context().run, fn, *args))


async def run_in(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> T:
    """``asyncio.to_thread`` on ``pool``: runs ``fn(*args)`` there with the caller's context."""
    return await asyncio.wrap_future(submit_in(pool, fn, *args))
