"""Read-ahead decided by us, for a descriptor the kernel does not read ahead on.

The broker reads point-in-time exports through the replica's own descriptor, marked
``POSIX_FADV_RANDOM``: the kernel's read-ahead would leave a replica read end to end (a restore,
a test failover's boot) in the page cache as large folios, where each later 4 KiB apply costs
~10x the kernel time (``docs/bench.md``). Without any read-ahead, though, a reader in small
sequential requests waits for the disk at every one (4 KiB reads: 55 against 1,700 MiB/s here).
:class:`ReadAhead` tells such a reader what to prefetch (``POSIX_FADV_WILLNEED``, which fills
the cache with single pages): nothing while it reads at random, and a window ahead of it that
doubles up to ``most`` while it reads in order, as the kernel's own read-ahead does, for each of
several readers in order at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

FIRST: Final = 128 * 1024
MOST: Final = 2 * 1024 * 1024
STREAMS: Final = 8


@dataclass
class _Stream:
    next: int  # where this reader's next read starts if it reads in order
    ahead: int  # prefetched up to here
    window: int


class ReadAhead:
    """Where the readers of one export are, and what to prefetch for them: plain logic, no I/O.

    Up to ``streams`` readers in order are followed at once, each with its own window: nbdcopy
    reads a disk with four connections, each working through its own part in order, and their
    requests arrive interleaved. A read that continues none of them starts a new one in place of
    the one read longest ago.
    """

    def __init__(self, first: int = FIRST, most: int = MOST, streams: int = STREAMS) -> None:
        self.first = first
        self.most = most
        self._streams: list[_Stream] = []  # the most recently read last
        self._most_streams = streams

    def before(self, offset: int, length: int) -> tuple[int, int] | None:
        """A read of ``length`` bytes at ``offset`` is about to be made: the ``(offset,
        length)`` to prefetch first, or None. A read in order keeps at least half a window
        prefetched past its end; any other read starts a stream over at the first window."""
        end = offset + length
        s = next((s for s in self._streams if s.next == offset), None)
        if s is None:
            if len(self._streams) == self._most_streams:
                del self._streams[0]
            self._streams.append(_Stream(end, end, self.first))
            return None
        self._streams.remove(s)
        self._streams.append(s)
        s.next = end
        if end + s.window // 2 <= s.ahead:
            return None
        start = max(s.ahead, end)
        s.window = min(s.window * 2, self.most)
        s.ahead = start + s.window
        return start, s.window
