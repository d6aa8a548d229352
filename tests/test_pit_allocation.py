"""Block status of point-in-time exports, sans I/O: extents from known zeros, written clusters."""

from __future__ import annotations

from pathlib import Path

from broker.pitexport import CLUSTER, MAX_EXTENTS, Overlay, allocation_extents
from common.nbd.constants import STATE_HOLE, STATE_ZERO

HOLE = STATE_HOLE | STATE_ZERO


def test_extents_cover_the_range_in_order_with_zeros_as_holes() -> None:
    """Data before, between and after the zeros; the extents add up to the range exactly."""
    got = allocation_extents(1000, 9000, [(2000, 500), (2500 + 100, 400), (9000, 1000)])
    assert got == [(1000, 0), (500, HOLE), (100, 0), (400, HOLE), (6000, 0), (1000, HOLE)]
    assert sum(n for n, _ in got) == 9000
    assert allocation_extents(0, 4096, []) == [(4096, 0)]
    assert allocation_extents(0, 4096, [(0, 4096)]) == [(4096, HOLE)]


def test_extents_stop_at_the_limit_where_the_client_asks_again() -> None:
    """A fragmented range is described up to MAX_EXTENTS; the client asks again from there."""
    zeros = [(i * 8192, 4096) for i in range(2 * MAX_EXTENTS)]
    got = allocation_extents(0, 2 * MAX_EXTENTS * 8192, zeros)
    assert len(got) == MAX_EXTENTS
    assert got[0] == (4096, HOLE)
    assert got[1] == (4096, 0)
    assert sum(n for n, _ in got) == MAX_EXTENTS * 4096


def test_overlay_written_names_the_clusters_the_reader_wrote(tmp_path: Path) -> None:
    """Written clusters come back as merged regions clipped to the asked range; none when the
    reader wrote nothing there."""
    overlay = Overlay(tmp_path / "o.cow", 64 * CLUSTER)
    try:
        for c in (3, 4, 5, 9, 63):
            overlay._set(c)
        assert overlay.written(0, 64 * CLUSTER) == [
            (3 * CLUSTER, 3 * CLUSTER),
            (9 * CLUSTER, CLUSTER),
            (63 * CLUSTER, CLUSTER),
        ]
        assert overlay.written(10 * CLUSTER, 50 * CLUSTER) == []
        assert overlay.written(9 * CLUSTER + 5, 1) == [(9 * CLUSTER, CLUSTER)]
    finally:
        overlay.close()
