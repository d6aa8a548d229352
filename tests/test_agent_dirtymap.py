"""The dirty map: coalescing, bounds, kinds, and crash-safe persistence."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from agents import dirtymap
from agents.dirtymap import DATA, TRIM, ZERO, BlockMap, DirtyMap
from agents.disk import TrackedExport
from agents.errors import TrackingError
from common.fsio import data_extents

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB


def _map(tmp_path: Path, size: int = 64 * MiB, **kw: object) -> DirtyMap:
    image = tmp_path / "img"
    if not image.exists():
        with image.open("wb") as fh:
            fh.truncate(size)
    dm = DirtyMap(size, BS, tmp_path / "d.map", image=image, **kw)  # type: ignore[arg-type]
    dm.open()
    return dm


def test_writes_to_the_same_blocks_coalesce(tmp_path: Path) -> None:
    """A thousand writes to one block dirty one block; adjacent writes form one run."""
    dm = _map(tmp_path)
    for _ in range(1000):
        dm.mark(100, 10)
    assert dm.active.dirty == 1
    dm.mark(BS, BS)
    dm.mark(2 * BS + 5, 100)
    assert list(dm.active.runs()) == [(0, 3, DATA)]
    assert dm.dirty_bytes == 3 * BS


def test_map_is_bounded_by_disk_size(tmp_path: Path) -> None:
    """However many writes, the map never holds more than one entry per block of the disk."""
    size = 8 * MiB
    dm = _map(tmp_path, size)
    for i in range(20000):
        dm.mark((i * 7919 * 512) % (size - 4096), 4096)
    assert dm.active.dirty <= size // BS
    assert dm.dirty_bytes <= size
    with pytest.raises(TrackingError):
        dm.mark(size - 10, 20)


def test_short_last_block(tmp_path: Path) -> None:
    """A disk whose size is not a block multiple tracks its last, short block in full."""
    size = 10 * BS + 4096
    dm = _map(tmp_path, size)
    dm.mark(10 * BS, 4096, TRIM)
    assert list(dm.active.runs()) == [(10, 11, TRIM)]


def test_zero_and_trim_cover_whole_blocks_only(tmp_path: Path) -> None:
    """Zeroing part of a block leaves data in it: only fully covered blocks are ZERO or TRIM."""
    dm = _map(tmp_path)
    dm.mark(BS // 2, 3 * BS, ZERO)  # half of 0, all of 1 and 2, half of 3
    assert list(dm.active.runs()) == [(0, 1, DATA), (1, 3, ZERO), (3, 4, DATA)]
    dm.mark(10 * BS, 2 * BS, TRIM)
    dm.mark(10 * BS, 10, DATA)  # a later write wins
    assert (10, 11, DATA) in list(dm.active.runs())
    assert (11, 12, TRIM) in list(dm.active.runs())


def test_one_extra_write_per_newly_dirtied_region(tmp_path: Path) -> None:
    """The persisted map costs one small write per 4 MiB region newly dirtied in a cycle."""
    dm = _map(tmp_path)
    for i in range(1000):
        dm.mark((i * 4096) % (4 * MiB), 4096)  # all in region 0
    assert dm.map_writes == 1
    dm.mark(5 * MiB, 4096)
    dm.mark(9 * MiB, 4096)
    assert dm.map_writes == 3
    dm.mark(0, 16 * MiB)  # one request spanning four regions, one of them new: one write
    assert dm.map_writes == 4
    assert dm.persisted_region_flags()[:5] == b"\x01\x01\x01\x01\x00"


def test_settle_clears_only_regions_without_newer_changes(tmp_path: Path) -> None:
    """After an ack, a region stays marked while it holds a change made after the cut."""
    dm = _map(tmp_path)
    dm.mark(0, 4096)  # region 0
    dm.mark(5 * MiB, 4096)  # region 1
    frozen = dm.swap()
    dm.mark(5 * MiB + 8192, 4096)  # region 1 is dirty again after the cut
    assert dm.settle() == 1
    assert dm.persisted_region_flags()[:2] == b"\x00\x01"
    frozen.close()
    # Newly dirtying region 0 again costs one more persisted write.
    before = dm.map_writes
    dm.mark(100, 1)
    assert dm.map_writes == before + 1


def test_merge_back_keeps_newer_kinds(tmp_path: Path) -> None:
    """A failed batch's blocks return to the active map without overriding newer changes."""
    dm = _map(tmp_path)
    dm.mark(0, 4 * BS)
    dm.mark(8 * BS, 2 * BS, ZERO)
    frozen = dm.swap()
    dm.mark(BS, BS, TRIM)  # newer change to block 1
    dm.merge_back(frozen)
    assert list(dm.active.runs()) == [(0, 1, DATA), (1, 2, TRIM), (2, 4, DATA), (8, 10, ZERO)]
    assert dm.active.dirty == 6


def test_crash_recovery_marks_persisted_regions(tmp_path: Path) -> None:
    """After an unclean stop every region marked on disk is dirty: a delta, never a full copy."""
    size = 256 * MiB
    dm = _map(tmp_path, size)
    dm.mark(1 * MiB, 4096)
    dm.mark(100 * MiB + 3, 70000)
    dm.close(clean=False)  # as after kill -9: nothing but what was pwritten before
    dm2 = DirtyMap(size, BS, tmp_path / "d.map", image=tmp_path / "img")
    rec = dm2.open()
    assert not rec.clean
    assert rec.tracking_lost is None
    runs = list(dm2.active.runs())
    assert runs == [(0, 64, DATA), (1600, 1664, DATA)]  # regions 0 and 25, whole
    assert dm2.dirty_bytes == 8 * MiB  # pessimistic by region, bounded, far below 256 MiB


def test_clean_stop_restores_the_exact_map(tmp_path: Path) -> None:
    """A clean stop saves the fine map: nothing becomes dirtier across a restart."""
    dm = _map(tmp_path)
    dm.mark(1 * MiB, 4096)
    dm.mark(20 * MiB, 2 * BS, ZERO)
    dm.close(clean=True)
    dm2 = DirtyMap(64 * MiB, BS, tmp_path / "d.map", image=tmp_path / "img")
    rec = dm2.open()
    assert rec.clean
    assert rec.tracking_lost is None
    assert list(dm2.active.runs()) == [(16, 17, DATA), (320, 322, ZERO)]
    # A crash after this restart must still be recognised as unclean.
    dm2.close(clean=False)
    dm3 = DirtyMap(64 * MiB, BS, tmp_path / "d.map", image=tmp_path / "img")
    assert not dm3.open().clean


def test_image_changed_while_stopped_means_tracking_lost(tmp_path: Path) -> None:
    """A write to the image while the agent was stopped is detected, not silently missed."""
    dm = _map(tmp_path)
    dm.close(clean=True)
    with (tmp_path / "img").open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"behind the agent's back")
    st = (tmp_path / "img").stat()
    os.utime(tmp_path / "img", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    dm2 = DirtyMap(64 * MiB, BS, tmp_path / "d.map", image=tmp_path / "img")
    assert dm2.open().tracking_lost == "the image changed while the agent was stopped"


def test_host_reboot_after_unclean_stop_means_tracking_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unflushed marks may be lost in a host crash, so a reboot makes tracking untrusted."""
    dm = _map(tmp_path)
    dm.mark(0, 4096)
    dm.close(clean=False)
    monkeypatch.setattr(dirtymap, "boot_id", lambda: "another-boot")
    dm2 = DirtyMap(64 * MiB, BS, tmp_path / "d.map", image=tmp_path / "img")
    assert dm2.open().tracking_lost is not None


def test_sync_marks_survive_a_host_reboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With durable marks (fdatasync per new region) the map is trusted across a reboot."""
    dm = _map(tmp_path, sync_marks=True)
    dm.mark(0, 4096)
    assert dm.map_syncs == 1
    dm.close(clean=False)
    monkeypatch.setattr(dirtymap, "boot_id", lambda: "another-boot")
    dm2 = DirtyMap(64 * MiB, BS, tmp_path / "d.map", image=tmp_path / "img")
    rec = dm2.open()
    assert rec.tracking_lost is None
    assert rec.recovered_blocks == 64


def test_geometry_change_means_tracking_lost(tmp_path: Path) -> None:
    """A map kept for another disk size cannot vouch for this disk."""
    dm = _map(tmp_path)
    dm.mark(0, 1)
    dm.close(clean=False)
    dm2 = DirtyMap(128 * MiB, BS, tmp_path / "d.map")
    assert dm2.open().tracking_lost is not None


def test_sync_only_when_marks_changed(tmp_path: Path) -> None:
    """FLUSH syncs the map only if a mark was persisted since the last sync."""
    dm = _map(tmp_path)
    dm.sync()
    assert dm.map_syncs == 0
    dm.mark(0, 1)
    dm.sync()
    dm.sync()
    assert dm.map_syncs == 1


def test_block_map_is_lazy() -> None:
    """A map for a 100 GiB disk costs nothing until written (anonymous mmap pages)."""
    bm = BlockMap((100 << 30) // BS)
    bm.set_range(5, 10, DATA)
    assert list(bm.runs()) == [(5, 10, DATA)]
    assert bm.any_dirty(0, 6)
    assert not bm.any_dirty(10, 1000)
    assert bm.fill_clean(0, 20, ZERO) == 15
    assert list(bm.runs()) == [(0, 5, ZERO), (5, 10, DATA), (10, 20, ZERO)]
    bm.close()


def test_file_extents_skip_holes(tmp_path: Path) -> None:
    """SEEK_DATA/SEEK_HOLE find the allocated parts of a sparse image."""
    path = tmp_path / "sparse"
    with path.open("wb") as fh:
        fh.truncate(16 * MiB)
        fh.seek(4 * MiB)
        fh.write(b"x" * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = list(data_extents(fd, 0, 16 * MiB))
    finally:
        os.close(fd)
    assert len(found) == 1
    lo, hi = found[0]
    assert lo <= 4 * MiB
    assert hi >= 5 * MiB
    assert hi - lo < 2 * MiB


def test_settle_clears_exactly_the_marked_regions_left_without_changes(tmp_path: Path) -> None:
    """Scattered writes before and after the cut: settle clears a marked region exactly when
    the cut held a change there and no newer write did (block by block, the definition)."""
    rng = random.Random(7)
    size = 256 * MiB
    for writes in (3, 5000):
        (tmp_path / str(writes)).mkdir()
        dm = _map(tmp_path / str(writes), size)
        for _ in range(writes):
            dm.mark(rng.randrange(size // 4096) * 4096, 4096)
        frozen = dm.swap()
        for _ in range(writes // 3 or 3):  # newer changes keep regions, in the first half
            dm.mark(rng.randrange(size // 8192) * 4096, 4096)
        marked = dm.persisted_region_flags()
        expected = bytearray(marked)
        bpr = dm.blocks_per_region
        for r in range(dm.nregions):
            lo, hi = r * bpr, min((r + 1) * bpr, dm.nblocks)
            if frozen.any_dirty(lo, hi) and not dm.active.any_dirty(lo, hi):
                expected[r] = 0
        assert dm.settle() == sum(a != b for a, b in zip(marked, expected, strict=True))
        assert dm.persisted_region_flags() == bytes(expected)
        assert expected != marked  # something was cleared: the test can fail
        on_disk = (tmp_path / str(writes) / "d.map").read_bytes()
        assert on_disk[dirtymap.HEADER_SIZE :] == bytes(expected)  # the file says the same
        frozen.close()


def test_a_failed_batch_keeps_its_regions_marked(tmp_path: Path) -> None:
    """Changes merged back after a failed batch are pending again: the next ack of a cut that
    did not carry them clears nothing of theirs."""
    dm = _map(tmp_path)
    dm.mark(0, 4096)  # region 0
    frozen = dm.swap()
    dm.merge_back(frozen)  # the batch failed
    frozen.close()
    dm.mark(5 * MiB, 4096)  # region 1, then a cut that carries both
    frozen = dm.swap()
    dm.mark(100, 1)  # region 0 changes again after the cut
    assert dm.settle() == 1
    assert dm.persisted_region_flags()[:2] == b"\x01\x00"
    frozen.close()


def test_blocks_merged_back_unmarked_leave_the_next_write_its_mark(tmp_path: Path) -> None:
    """An initial copy's blocks go back into the active map unmarked when its batch fails; a
    guest write there afterwards must still persist its region's mark before its data."""
    dm = _map(tmp_path)
    frozen = dm.swap()
    frozen.set_range(0, dm.blocks_per_region, DATA)  # region 0, as an initial copy adds it
    dm.merge_back(frozen)
    frozen.close()
    assert dm.persisted_region_flags()[0] == 0
    before = dm.map_writes
    dm.mark(4096, 4096)
    assert dm.map_writes == before + 1
    assert dm.persisted_region_flags()[0] == 1


def test_region_bytes_other_than_one_still_count_as_marked(tmp_path: Path) -> None:
    """A persisted region byte that is neither 0 nor 1 (another version, a stray write) is a
    mark: after an unclean stop its region is dirty, and settle clears it like any other."""
    dm = _map(tmp_path)
    dm.close(clean=False)
    path = tmp_path / "d.map"
    with path.open("r+b") as fh:
        fh.seek(dirtymap.HEADER_SIZE + 2)
        fh.write(b"\x07")
    dm = _map(tmp_path)
    bpr = dm.blocks_per_region
    assert dm.active.any_dirty(2 * bpr, 3 * bpr)
    assert dm.persisted_region_flags()[2] == 1
    frozen = dm.swap()
    assert dm.settle() == 1
    assert dm.persisted_region_flags()[2] == 0
    frozen.close()


async def test_the_next_cuts_map_is_made_between_cuts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a cut leaves making the next cut's map and releasing its own to later steps of
    the loop, one each, so neither it nor the next cut makes or unmaps a map."""
    image = tmp_path / "img"
    with image.open("wb") as fh:
        fh.truncate(16 * MiB)
    export = TrackedExport(image, "d", map_path=tmp_path / "e.map")
    export.open()
    made: list[BlockMap] = []
    new_map = export.map.new_map

    def counted() -> BlockMap:
        made.append(new_map())
        return made[-1]

    monkeypatch.setattr(export.map, "new_map", counted)
    try:
        cut = export.begin_cut()
        assert len(made) == 1  # no spare yet: the first cut makes its map itself
        export.write(0, memoryview(b"x" * 4096), False)
        export.end_cut(acked=True)
        assert len(made) == 1  # the next map is not made in the end's step
        assert not cut.frozen.mm.closed  # not in the end's step either
        await asyncio.sleep(0)
        assert len(made) == 2  # made in the next step
        assert not cut.frozen.mm.closed
        await asyncio.sleep(0)
        assert cut.frozen.mm.closed  # released in the next two
        assert not cut.frozen.grains.mm.closed
        await asyncio.sleep(0)
        assert cut.frozen.grains.mm.closed
        export.begin_cut()
        assert len(made) == 2
        assert export.map.active is made[1]
        export.end_cut(acked=False)
    finally:
        export.close()
