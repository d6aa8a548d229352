"""Verified batches held in memory between the ack and the apply (decision 014).

The ingest decodes every batch (decompresses each DATA extent and checks its xxh3) before the
journal file is made durable and the batch acked. Decoding the journal file again at apply time
doubled the broker's per-extent work; instead the receiver hands the verified extents over here
and the applier takes them. The journal stays the only durable copy: a batch whose extents are
not held (over the budget, or after a restart) is decoded from its journal file as before, and
that decode re-verifies every checksum.

The budget is shared by every replica of the broker, so a backlog of many replicas cannot hold
more than ``budget`` bytes of extent data; what does not fit is simply not held.
"""

from __future__ import annotations

import threading
import weakref
from typing import Final

from common.hrl import Extent

DEFAULT_BUDGET: Final = 256 << 20
"""Bytes of verified extent data all replicas together hold for their appliers."""
BATCH_LIMIT: Final = 64 << 20
"""A batch with more extent data than this is not held (its apply decodes the journal)."""


class HeldBudget:
    """Bytes of held extent data, all replicas together (thread-safe)."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (nothing reserved) when they do not fit."""
        with self._lock:
            if self.used + nbytes > self.budget:
                return False
            self.used += nbytes
            return True

    def give_back(self, nbytes: int) -> None:
        """Return a reservation."""
        with self._lock:
            self.used -= nbytes


SHARED: Final = HeldBudget()
"""The broker's budget (one process, one budget)."""


class HeldBatches:
    """One replica's verified batches, by ``(generation, seq)``, waiting for the applier."""

    def __init__(self, budget: HeldBudget = SHARED) -> None:
        self.budget = budget
        self._batches: dict[tuple[int, int], tuple[list[Extent], int]] = {}
        self._lock = threading.Lock()
        # An engine dropped without close() must not keep its share of the budget for good.
        weakref.finalize(self, _give_back_all, budget, self._batches)

    def __len__(self) -> int:
        with self._lock:
            return len(self._batches)

    def put(self, key: tuple[int, int], extents: list[Extent], nbytes: int) -> bool:
        """Hold the verified extents of durable batch ``key``; False if over the budget."""
        if not self.budget.take(nbytes):
            return False
        with self._lock:
            old = self._batches.pop(key, None)
            self._batches[key] = (extents, nbytes)
        if old is not None:
            self.budget.give_back(old[1])
        return True

    def take(self, key: tuple[int, int]) -> list[Extent] | None:
        """The extents of batch ``key`` (now no longer held), or None if not held."""
        with self._lock:
            got = self._batches.pop(key, None)
        if got is None:
            return None
        self.budget.give_back(got[1])
        return got[0]

    def drop_through(self, key: tuple[int, int]) -> None:
        """Forget every batch up to ``key`` (applied, or never to be applied from memory)."""
        with self._lock:
            stale = [k for k in self._batches if k <= key]
            gone = [self._batches.pop(k)[1] for k in stale]
        for nbytes in gone:
            self.budget.give_back(nbytes)

    def clear(self) -> None:
        """Forget everything (the engine closes)."""
        with self._lock:
            gone = [n for _e, n in self._batches.values()]
            self._batches.clear()
        for nbytes in gone:
            self.budget.give_back(nbytes)


def _give_back_all(
    budget: HeldBudget, batches: dict[tuple[int, int], tuple[list[Extent], int]]
) -> None:
    budget.give_back(sum(n for _e, n in batches.values()))
    batches.clear()
