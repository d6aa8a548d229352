"""Grain-precise tracking: the dirty map ships the 4 KiB grains that changed, not whole blocks."""

from __future__ import annotations

import random
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agents.body
from agents.body import BatchStats
from agents.cut import CowStore, Cut
from agents.dirtymap import CLEAN, DATA, TRIM, ZERO, DirtyMap
from agents.disk import TrackedExport
from agents.grains import GrainBits
from common.hrl import Compression, ExtentKind, decode_batch
from tests.support_agent import MiB, make_image
from tests.support_body import encode_cut

GRAIN = 4096


class Model:
    """The map's meaning, one Python value per block and per grain (slow and obvious)."""

    def __init__(self, size: int, bs: int) -> None:
        self.size, self.bs = size, bs
        self.nblocks = -(-size // bs)
        self.kinds = [CLEAN] * self.nblocks
        self.grains: set[int] = set()

    def mark(self, offset: int, length: int, kind: int) -> None:
        end = offset + length
        self.grains |= set(range(offset // GRAIN, -(-end // GRAIN)))
        for b in range(offset // self.bs, -(-end // self.bs)):
            whole = b * self.bs >= offset and min((b + 1) * self.bs, self.size) <= end
            self.kinds[b] = kind if whole else DATA

    def merge(self, older: Model) -> None:
        for b, kind in enumerate(older.kinds):
            if self.kinds[b] == CLEAN:
                self.kinds[b] = kind
        self.grains |= older.grains

    def expected(self) -> dict[int, int]:
        """Grain -> kind that a batch of this map must carry."""
        gpb = self.bs // GRAIN
        out: dict[int, int] = {}
        for b, kind in enumerate(self.kinds):
            for g in range(b * gpb, (b + 1) * gpb):
                if g * GRAIN >= self.size:
                    break
                if kind in (ZERO, TRIM) or (kind == DATA and g in self.grains):
                    out[g] = kind
        return out


def _planned(dm: DirtyMap) -> dict[int, int]:
    frozen = dm.swap()
    cut = Cut(
        frozen,
        size=dm.size,
        block_size=dm.block_size,
        reader=lambda o, n: bytes(n),
        cow=CowStore(dm.block_size, 0, None),
        cut_time_ns=0,
    )
    out: dict[int, int] = {}
    prev_end = 0
    for ext in cut.plan(256 * 1024):
        assert ext.offset >= prev_end
        assert ext.length > 0
        prev_end = ext.offset + ext.length
        for g in range(ext.offset // GRAIN, -(-prev_end // GRAIN)):
            out[g] = ext.kind
    dm.merge_back(frozen)
    frozen.close()
    return out


_OP = st.tuples(
    st.sampled_from(["write", "write", "zero", "trim", "cut", "fail", "ack"]),
    st.integers(0, (1 << 20) - 1),
    st.integers(1, 200_000),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(_OP, max_size=40),
    bs=st.sampled_from([4096, 16384, 65536, 262144]),
    tail=st.sampled_from([0, 512, 4096 + 512]),
)
def test_map_matches_model_through_cuts_and_merges(
    ops: list[tuple[str, int, int]], bs: int, tail: int
) -> None:
    """Random writes, zeroes, trims, cuts and failed or acked uploads plan what the model says."""
    size = (1 << 20) + tail
    dm = DirtyMap(size, bs)
    active, frozen_model = Model(size, bs), None
    frozen = None
    for op, offset, asked in ops:
        length = min(asked, size - offset)
        if op in ("write", "zero", "trim"):
            kind = {"write": DATA, "zero": ZERO, "trim": TRIM}[op]
            dm.mark(offset, length, kind)
            active.mark(offset, length, kind)
        elif op == "cut" and frozen is None:
            frozen, frozen_model, active = dm.swap(), active, Model(size, bs)
        elif op in ("fail", "ack") and frozen is not None and frozen_model is not None:
            if op == "fail":
                dm.merge_back(frozen)
                active.merge(frozen_model)
            frozen.close()
            frozen = frozen_model = None
    assert _planned(dm) == active.expected()


def test_grain_runs_merge_across_bytes_and_blocks() -> None:
    """Set bits come back as maximal runs, however they straddle bytes, and clipped to the range."""
    bits = GrainBits(1000)
    for g0, g1 in [(3, 4), (5, 21), (21, 30), (64, 64 + 8 * 40), (999, 1000)]:
        bits.set(g0, g1)
    assert list(bits.runs(0, 1000)) == [(3, 4), (5, 30), (64, 384), (999, 1000)]
    assert list(bits.runs(10, 70)) == [(10, 30), (64, 70)]
    assert bits.any(4, 6)
    assert not bits.any(30, 64)


def test_clean_stop_keeps_grain_precision(tmp_path: Path) -> None:
    """The fine map saved at a clean stop restores the changed grains, not whole blocks."""
    size = 8 * MiB
    dm = DirtyMap(size, 65536, tmp_path / "d.map")
    dm.open()
    dm.mark(4096 * 3, 4096, DATA)
    dm.mark(1 << 20, 65536, ZERO)
    before = _planned(dm)
    dm.close(clean=True)
    again = DirtyMap(size, 65536, tmp_path / "d.map")
    recovery = again.open()
    assert recovery.clean
    assert recovery.tracking_lost is None
    assert _planned(again) == before == {3: DATA, **{256 + i: ZERO for i in range(16)}}
    again.close(clean=False)
    # After an unclean stop the 4 MiB region is pessimistic again (the activity log's promise).
    third = DirtyMap(size, 65536, tmp_path / "d.map")
    assert not third.open().clean
    assert len(_planned(third)) == 4 * MiB // GRAIN
    third.close()


@pytest.mark.parametrize("plan_kept", [True, False], ids=["plan-kept", "planned-twice"])
async def test_random_4k_writes_ship_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan_kept: bool
) -> None:
    """Random 4 KiB writes on 64 KiB blocks ship at most 1.25x the bytes written, byte-exact.

    Also when the plan is too long to keep from the totals pass and is made a second time.
    """
    if not plan_kept:
        monkeypatch.setattr(agents.body, "_KEEP_PLAN", 100)  # a 2,000-extent batch is "huge"
    rng = random.Random(5)
    size = 64 * MiB
    image = make_image(tmp_path / "d.img", size, fill=lambda i: b"")
    export = TrackedExport(image, "d", map_path=tmp_path / "d.map")
    export.open()
    replica = bytearray(size)
    written = 0
    try:
        for _ in range(2000):
            offset = rng.randrange(size // 4096) * 4096
            export.write(offset, memoryview(rng.randbytes(4096)), False)
            written += 4096
        cut = export.begin_cut()
        stats = BatchStats()
        body = await encode_cut(cut, compression=Compression.NONE, full=False, level=1, stats=stats)
        export.end_cut(acked=True)
        for ext in decode_batch(body)[1]:
            assert ext.kind is ExtentKind.DATA
            assert ext.data is not None
            replica[ext.offset : ext.offset + ext.length] = ext.data
        assert stats.payload_bytes <= 1.25 * written
        assert replica == image.read_bytes()
    finally:
        export.close()


_MEMORY_PROBE = """
import sys, tempfile
from pathlib import Path
from agents.dirtymap import DATA, TRIM, DirtyMap

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")

size = 100 << 30
with tempfile.TemporaryDirectory() as d:
    before = rss()
    dm = DirtyMap(size, 65536, Path(d) / "m.map")
    dm.open()
    dm.mark(0, size, TRIM)  # a whole-disk discard, then a 4 KiB write in every MiB
    for off in range(0, size, 1 << 20):
        dm.mark(off + 4096 * (off % 7), 4096, DATA)
    print(rss() - before)
    dm.close(clean=False)
"""


def test_map_of_a_fully_written_100_gib_disk_stays_under_5_mb() -> None:
    """A 100 GiB disk's map, once every page of it was touched, adds under 5 MiB of RSS."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    grown = int(out.stdout.strip())
    # Expected 4.94 MB: 1.6 MB of block bytes, 3.3 MB of grain bits, 25 KB of region flags;
    # the rest of the 5 MiB is slack for the interpreter's own allocations.
    assert 4_500_000 < grown < 5 << 20, grown


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(_OP.filter(lambda op: op[0] in ("write", "zero", "trim")), max_size=40),
    bs=st.sampled_from([4096, 16384, 65536]),
    hop=st.integers(1, 40),
    guest=st.lists(st.integers(0, (1 << 20) - 1), max_size=30),
    data=st.data(),
)
def test_a_hop_settles_as_its_extents_one_by_one(
    ops: list[tuple[str, int, int]], bs: int, hop: int, guest: list[int], data: st.DataObject
) -> None:
    """The hop-wide settle step gives the copies, and leaves the map and the copies kept, as
    settling each extent on its own does; guest writes land between the hops."""
    size = 1 << 20
    dm = DirtyMap(size, bs)
    for op, offset, asked in ops:
        dm.mark(offset, min(asked, size - offset), {"write": DATA, "zero": ZERO, "trim": TRIM}[op])
    frozen = dm.swap()
    twin = frozen.copy()
    cuts = [
        Cut(
            m,
            size=size,
            block_size=bs,
            reader=lambda o, n: bytes((o + i) % 251 for i in range(n)),
            cow=CowStore(bs, 1 << 30, None),
            cut_time_ns=0,
        )
        for m in (frozen, twin)
    ]
    wanted = [e for e in cuts[0].plan(256 * 1024) if e.kind == DATA]
    got: list[list[tuple[int, int, bytes]]] = [[], []]
    for h in range(0, len(wanted), hop):
        for offset in guest[data.draw(st.integers(0, len(guest))) :][:2]:
            for cut in cuts:
                cut.preserve(offset, min(GRAIN, size - offset))
        spans = array("q")
        for e in wanted[h : h + hop]:
            spans.extend((e.offset, e.length, cuts[0].done_block(e)))
        cuts[0].settle(spans, got[0])
        cuts[1]._settle_each(spans, got[1])
        assert got[0] == got[1]
        assert cuts[0].frozen.mm[:] == cuts[1].frozen.mm[:]
        assert len(cuts[0].cow) == len(cuts[1].cow)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "zero", "trim"]),
            st.integers(0, (1 << 20) - 1),
            st.integers(1, 200_000),
        ),
        max_size=25,
    ),
    bs=st.sampled_from([4096, 16384, 65536]),
    guest=st.lists(st.tuples(st.integers(0, (1 << 20) - 1), st.integers(1, 150_000)), max_size=40),
    seed=st.integers(0, 1 << 32),
)
def test_a_guest_write_copies_only_what_the_cut_still_reads(
    ops: list[tuple[str, int, int]], bs: int, guest: list[tuple[int, int]], seed: int
) -> None:
    """A guest write copies a frozen DATA block aside only if it touches one of the block's
    changed grains (the only bytes of it the batch reads), and each such block once; whatever
    the guest wrote, every extent of the batch then reads its bytes as they were at the cut."""
    size = 1 << 20
    rng = random.Random(seed)
    image = bytearray(rng.randbytes(size))
    dm = DirtyMap(size, bs)
    model = Model(size, bs)
    for op, offset, asked in ops:
        kind = {"write": DATA, "zero": ZERO, "trim": TRIM}[op]
        dm.mark(offset, min(asked, size - offset), kind)
        model.mark(offset, min(asked, size - offset), kind)
    at_cut = bytes(image)
    cut = Cut(
        dm.swap(),
        size=size,
        block_size=bs,
        reader=lambda o, n: bytes(image[o : o + n]),
        cow=CowStore(bs, 1 << 30, None),
        cut_time_ns=0,
    )
    gpb = bs // GRAIN
    uncopied = {b for b, kind in enumerate(model.kinds) if kind == DATA}
    for offset, asked in guest:
        length = min(asked, size - offset)
        touched = set(range(offset // GRAIN, -(-(offset + length) // GRAIN))) & model.grains
        needs = {
            b
            for b in range(offset // bs, -(-(offset + length) // bs))
            if b in uncopied and touched & set(range(b * gpb, (b + 1) * gpb))
        }
        copied = cut.cow.copied_blocks
        cut.preserve(offset, length)
        assert cut.cow.copied_blocks - copied == len(needs)
        uncopied -= needs
        image[offset : offset + length] = rng.randbytes(length)
    for ext in cut.plan(256 * 1024):
        if ext.kind == DATA:
            assert cut.read(ext) == at_cut[ext.offset : ext.offset + ext.length]
