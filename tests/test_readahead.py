"""The read-ahead the broker's point-in-time views decide themselves (common/readahead.py)."""

from __future__ import annotations

import itertools
import random

from common.readahead import ReadAhead

KiB = 1024


def test_random_reads_prefetch_nothing() -> None:
    ahead = ReadAhead()
    rng = random.Random(5)
    offsets = [rng.randrange(1 << 20) * 4 * KiB for _ in range(1000)]
    assert all(ahead.before(off, 4 * KiB) is None for off in offsets)


def test_reads_in_order_stay_behind_a_growing_window_that_never_rereads() -> None:
    """4 KiB reads in order: the prefetched ranges follow each other without a gap or an
    overlap, grow from 256 KiB to the 2 MiB most, and always cover the next read."""
    ahead = ReadAhead(first=128 * KiB, most=2048 * KiB)
    asked: list[tuple[int, int]] = []
    for off in range(0, 64 << 20, 4 * KiB):
        got = ahead.before(off, 4 * KiB)
        if got is not None:
            asked.append(got)
        covered_to = asked[-1][0] + asked[-1][1] if asked else 0
        if off:
            assert covered_to >= off + 8 * KiB, f"the read at {off} is not covered ahead"
    assert asked[0] == (4 * KiB + 4 * KiB, 256 * KiB)
    sizes = [n for _, n in asked]
    assert sizes[:4] == [256 * KiB, 512 * KiB, 1024 * KiB, 2048 * KiB]
    assert set(sizes[4:]) == {2048 * KiB}
    for (a, n), (b, _) in itertools.pairwise(asked):
        assert b == a + n
    # Prefetching stays within a window of the reader: 64 MiB read, at most 2 MiB more asked.
    assert sum(sizes) <= (64 << 20) + 2048 * KiB


def test_a_jump_starts_over_at_the_first_window() -> None:
    ahead = ReadAhead(first=128 * KiB, most=2048 * KiB)
    for off in range(0, 16 << 20, 64 * KiB):
        ahead.before(off, 64 * KiB)
    assert ahead.before(100 << 20, 64 * KiB) is None  # elsewhere: nothing yet
    assert ahead.before((100 << 20) + 64 * KiB, 64 * KiB) == ((100 << 20) + 128 * KiB, 256 * KiB)
