"""Read-ahead decided by us, for a descriptor the kernel does not read ahead on.

The broker reads point-in-time exports through the replica's own descriptor, marked
``POSIX_FADV_RANDOM``: the kernel's read-ahead would leave a replica read end to end (a restore,
a test failover's boot) in the page cache as large folios, where each later 4 KiB apply costs
~10x the kernel time (``docs/bench.md``). Without any read-ahead, though, a reader in small
sequential requests waits for the disk at every one (4 KiB reads: 55 against 1,700 MiB/s here).
:class:`ReadAhead` tells such a reader what to prefetch (``POSIX_FADV_WILLNEED``, which fills
the cache with single pages): nothing while it reads at random, and a window ahead of it that
doubles up to ``most`` while it reads in order, as the kernel's own read-ahead does.
"""

from __future__ import annotations

from typing import Final

FIRST: Final = 128 * 1024
MOST: Final = 2 * 1024 * 1024


class ReadAhead:
    """Where one reader is, and what to prefetch for it: plain logic, no I/O."""

    def __init__(self, first: int = FIRST, most: int = MOST) -> None:
        self.first = first
        self.most = most
        self._next = -1  # where the reader's next read starts if it reads in order
        self._ahead = 0  # prefetched up to here
        self._window = first

    def before(self, offset: int, length: int) -> tuple[int, int] | None:
        """A read of ``length`` bytes at ``offset`` is about to be made: the ``(offset,
        length)`` to prefetch first, or None. A read in order keeps at least half a window
        prefetched past its end; any other read starts over at the first window."""
        end = offset + length
        in_order = offset == self._next
        self._next = end
        if not in_order:
            self._window = self.first
            self._ahead = end
            return None
        if end + self._window // 2 <= self._ahead:
            return None
        start = max(self._ahead, end)
        self._window = min(self._window * 2, self.most)
        self._ahead = start + self._window
        return start, self._window
