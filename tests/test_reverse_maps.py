"""Region arithmetic and change-map hand-over of delta reverse replication (decision 042)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import resync
from agents.disk import TrackedExport
from agents.state import DiskState
from common.regions import (
    change_map_summary,
    chunks,
    coalesce,
    from_flags,
    subtract,
    to_blocks,
    total,
    union,
)

MiB = 1024 * 1024
BLOCK = 64 * 1024


def test_union_merges_overlapping_and_touching_regions_and_drops_empty_ones() -> None:
    """The union of several maps is sorted, merged where regions overlap or touch, no empties."""
    a = [(10, 5), (100, 0), (40, 10)]
    b = [(12, 10), (50, 5), (0, 1)]
    assert union(a, b) == [(0, 1), (10, 12), (40, 15)]
    assert total(union(a, b)) == 1 + 12 + 15
    assert union() == []
    with pytest.raises(ValueError, match="negative"):
        union([(-1, 4)])


regions_st = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=8)


def _bytes_of(regions: list[tuple[int, int]]) -> set[int]:
    return {b for o, n in regions for b in range(o, o + n)}


@settings(max_examples=300, deadline=None)
@given(regions_st, regions_st)
def test_subtract_keeps_exactly_the_bytes_no_cut_covers(
    regions: list[tuple[int, int]], minus: list[tuple[int, int]]
) -> None:
    """Against a model of sets of bytes: what is left is the regions' bytes less the cut's,
    sorted, merged (no two touch) and without empty regions."""
    got = subtract(regions, minus)
    assert _bytes_of(got) == _bytes_of(regions) - _bytes_of(minus)
    assert got == union(got)
    assert all(n > 0 for _, n in got)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(got))


def test_block_rounding_covers_every_touched_block_and_stops_at_the_disk_end() -> None:
    """Rounding out to blocks covers each partly touched block whole, merged, clipped to size."""
    size = 10 * BLOCK + 100  # a short last block
    got = to_blocks([(BLOCK + 1, 1), (2 * BLOCK - 1, 2), (10 * BLOCK + 5, BLOCK)], BLOCK, size)
    assert got == [(BLOCK, 2 * BLOCK), (10 * BLOCK, 100)]
    assert to_blocks([(0, 0)], BLOCK, size) == []
    with pytest.raises(ValueError, match="power of two"):
        to_blocks([(0, 1)], 3000, size)


def test_chunks_coalescing_and_region_flags_translate_exactly() -> None:
    """Chunks split regions at the limit, coalescing fills only gaps below its bound, and
    persisted region flags become byte regions."""
    assert chunks([(0, 10), (20, 3)], 4) == [(0, 4), (4, 4), (8, 2), (20, 3)]
    assert coalesce([(0, 10), (15, 5), (40, 1)], 6) == [(0, 20), (40, 1)]
    assert coalesce([(0, 10), (16, 5)], 6) == [(0, 10), (16, 5)]
    flags = bytes([1, 1, 0, 1])
    assert from_flags(flags, 4 * MiB, 14 * MiB) == [(0, 8 * MiB), (12 * MiB, 2 * MiB)]


def test_summary_names_each_disk_compared_in_full_and_why() -> None:
    """The command's summary counts mapped bytes and names each disk without a usable map."""
    doc = change_map_summary(
        [
            {"disk_id": "d0", "regions": [[0, 10], [5, 10]], "why": "change map"},
            {"disk_id": "d1", "regions": None, "why": "its change map is missing"},
        ]
    )
    assert doc == {
        "mapped_bytes": 15,
        "full_compare": {"d1": "compared by hashes in full: its change map is missing"},
    }


def _export(tmp_path: Path, size: int) -> TrackedExport:
    image = tmp_path / "d.img"
    if not image.exists():
        image.write_bytes(b"\0" * size)
    return TrackedExport(image, "d", block_size=BLOCK, map_path=tmp_path / "d.map")


def test_old_primary_regions_cover_in_flight_batches_and_survive_a_kill(tmp_path: Path) -> None:
    """A batch in flight and a later write both stay in the old primary's regions, also when
    the agent is killed (the map is reopened from disk without a clean close)."""
    size = 16 * MiB
    state = DiskState("u", "d", size, acked_seq=3, initial_done=True, initial_cursor=size)
    first = _export(tmp_path, size)
    first.open()
    first.close()  # the map exists from earlier replication
    export = _export(tmp_path, size)
    recovery = export.open()
    export.write(5 * MiB, memoryview(b"x" * 100), False)
    export.begin_cut()  # the batch with that write is in flight, never acked
    export.write(9 * MiB + 7, memoryview(b"y" * 10), False)
    live = resync.old_primary_regions(export, recovery, state)
    assert live["regions"] == [[4 * MiB, 8 * MiB]], live
    # What a kill -9 leaves on disk: the persisted regions and an unclean header, no fine map
    # (the image lock goes with the descriptors, as with a dead process).
    export.close(clean=False)
    again = _export(tmp_path, size)
    recovery = again.open()
    after = resync.old_primary_regions(again, recovery, state)
    assert after["regions"] == [[4 * MiB, 8 * MiB]], after
    again.close()
    (tmp_path / "d.map").unlink()
    lost = _export(tmp_path, size)
    recovery = lost.open()
    gone = resync.old_primary_regions(lost, recovery, state)
    assert gone["regions"] is None, gone
    assert "missing" in gone["why"], gone
    fresh = DiskState("u", "d", size)
    assert "initial copy" in str(resync.old_primary_regions(lost, recovery, fresh)["why"])
    lost.close()


def test_hints_persist_validate_and_a_rolled_back_promotion_pins_the_full_compare(
    tmp_path: Path,
) -> None:
    """Regions sent by the reverse command are kept per configured disk (0600), bad ones are
    refused, and a promotion from an older point without its rolled-back regions keeps a
    full-compare hint against them."""
    sent = [{"disk_id": "d0", "regions": [[0, 5]]}, {"disk_id": "../x", "regions": [[0, 1]]}]
    resync.save_hints(tmp_path, ["d0", "d1"], sent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.reverse.json"]  # configured only
    path0 = resync.hint_path(tmp_path / "d0.json")
    assert resync.load_hint(path0)[0] == [(0, 5)]
    assert path0.stat().st_mode & 0o777 == 0o600
    regions, why = resync.load_hint(resync.hint_path(tmp_path / "d1.json"))
    assert regions is None
    assert "no change map" in why
    with pytest.raises(ValueError, match="non-negative"):
        resync.save_hints(tmp_path, ["d0"], [{"disk_id": "d0", "regions": [[-4, 5]]}])
    with pytest.raises(ValueError, match="list"):
        resync.save_hints(tmp_path, ["d0"], {"d0": []})
    with pytest.raises(ValueError, match="non-negative"):
        resync.promoted(tmp_path, "d0", "1:42", {"d0": [[0, -1]]})
    resync.promoted(tmp_path, "d0", "1:42", {"d0": [[0, 5]]})  # rolled back regions: mapped
    assert not path0.exists()
    resync.promoted(tmp_path, "d0", "1:42", {})  # an older point without them: full compare
    resync.save_hints(tmp_path, ["d0"], [{"disk_id": "d0", "regions": [[0, 5]]}])
    regions, why = resync.load_hint(path0)
    assert regions is None
    assert "older point 1:42" in why
    resync.promoted(tmp_path, "d0", "latest", None)
    assert not path0.exists()


def test_rolled_back_regions_land_in_the_promoted_disks_map_rounded_to_blocks(
    tmp_path: Path,
) -> None:
    """The regions the broker rolled back are marked in the new primary's map, whole blocks."""
    export = _export(tmp_path, 4 * MiB)
    export.open()
    try:
        marked = resync.mark_rolled_back(export, "d", {"d": [[BLOCK + 1, 10], [3 * MiB, BLOCK]]})
        assert marked == 2 * BLOCK
        assert export.map.dirty_bytes == 2 * BLOCK
        assert resync.mark_rolled_back(export, "d", {"other": [[0, 1]]}) == 0
    finally:
        export.close()
