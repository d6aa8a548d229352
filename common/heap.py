"""The daemons' garbage-collector settings, applied once they have started (docs/bench.md).

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

import gc
from typing import Final

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
