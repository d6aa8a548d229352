"""The read-ahead the broker's point-in-time exports decide themselves (common/readahead.py)."""

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


def test_readers_in_order_interleaved_each_keep_their_window() -> None:
    """Four readers in order at 128 MiB from each other, their 256 KiB requests interleaved as
    nbdcopy's four connections send them: each gets prefetched ranges of its own, without a gap
    or an overlap, growing to the most; random reads among them disturb none."""
    ahead = ReadAhead(first=128 * KiB, most=2048 * KiB)
    rng = random.Random(3)
    asked: dict[int, list[tuple[int, int]]] = {r: [] for r in range(4)}
    for step in range(64):
        for r in range(4):
            off = r * (128 << 20) + step * 256 * KiB
            got = ahead.before(off, 256 * KiB)
            if got is not None:
                asked[r].append(got)
            if step:
                covered = asked[r][-1][0] + asked[r][-1][1]
                assert covered >= off + 256 * KiB, (r, step)
        ahead.before(rng.randrange(1 << 20) * 4 * KiB + (1 << 30), 4 * KiB)  # a stray read
    for r in range(4):
        sizes = [n for _, n in asked[r]]
        assert sizes[:3] == [256 * KiB, 512 * KiB, 1024 * KiB], r
        assert set(sizes[4:]) == {2048 * KiB}
        for (a, n), (b, _) in itertools.pairwise(asked[r]):
            assert b == a + n


def test_a_reader_left_for_too_many_others_starts_over() -> None:
    """More readers than streams: the one read longest ago is forgotten."""
    ahead = ReadAhead(first=128 * KiB, most=2048 * KiB, streams=2)
    ahead.before(0, 64 * KiB)
    assert ahead.before(64 * KiB, 64 * KiB) is not None
    ahead.before(1 << 30, 64 * KiB)
    ahead.before(2 << 30, 64 * KiB)  # a third reader: the first one is forgotten
    assert ahead.before(128 * KiB, 64 * KiB) is None
    assert ahead.before(192 * KiB, 64 * KiB) is not None
