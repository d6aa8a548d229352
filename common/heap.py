"""The daemons' heap settings: the garbage collector's, applied once they have started
(docs/bench.md), and how much freed memory the agent keeps for reuse.

With CPython's defaults the broker, under 4 KiB writes at 20 MiB/s, ran two or three full
collections every 10 s, each walking the ~50,000 objects of its imported modules with the GIL
held for 40-53 ms, plus ~30 ms of younger collections: every upload, apply and guest request of
the process waited meanwhile. Frozen, the start-up objects are never walked again (they live as
long as the process does); with 50,000 allocations between young collections, a batch's
short-lived objects (thousands of extents) die young instead of being promoted into the old
generation, whose growth is what triggers a full collection. Measured the same way afterwards:
no full collection in 30 s, young collections of 5-12 ms a few times in 10 s.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Final

from common.fsio import libc_func
from common.logs import get_logger

_log = get_logger("common.heap")
_M_TRIM_THRESHOLD: Final = -1  # glibc's malloc.h

YOUNG_THRESHOLD: Final = 50_000
"""Allocations (less deallocations) of tracked objects between two young-generation passes."""


def settle_heap() -> None:
    """Collect, freeze what is left (the start-up's objects) and space young collections out.

    Call once, just before the daemon's event loop starts: objects made later are collected as
    usual.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 10)


def keep_freed_memory(nbytes: int) -> bool:
    """Let glibc's allocator keep up to ``nbytes`` of freed memory instead of handing it back.

    The agent's copy-on-write copies of a cycle are freed together at the end of the cut, on
    the NBD loop: with glibc's default (128 KiB) the allocator returned them to the kernel there,
    and a cycle that copied 20 MiB aside held its guests ~2 ms while the pages were freed (and
    the next cycle faulted them in again, write by write). Kept, they are reused. False (and a
    debug event) where the C library has no ``mallopt`` (musl): only the speed differs.
    """
    mallopt = libc_func("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None or not mallopt(_M_TRIM_THRESHOLD, nbytes):
        _log.debug("heap_trim_unchanged", nbytes=nbytes)
        return False
    return True
