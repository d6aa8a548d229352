"""Recovery points: the per-replica index of undo segments, and copy-free "disk as of P" views.

Design (docs/decisions/001-undo-segments-for-recovery-points.md):

- The replica image always holds the newest applied state. Before batch ``S`` touches the image,
  the applier saves what the image held in every range ``S`` will write: the *undo* of ``S``.
  One undo file (a *segment*) covers a run of consecutive batches ``first..top``; its data turns
  the disk at ``top`` back into the disk at ``base`` (the state just before ``first``).
- Every state between segments is a recovery point: the bases of the segments, plus the newest
  applied state (the image itself).
- The disk as of point ``P`` is the image overlaid, for each byte range, with the undo from the
  *oldest* segment after ``P`` that touched it. A :class:`PointView` builds that overlay as an
  in-memory interval map (no copy of the disk) and reads the rest from the image.
- Dropping the oldest point deletes one file. Thinning (e.g. to hourly points) merges adjacent
  segments into one, keeping for each range the oldest undo: a linear merge of their indexes and
  one copy of the data that survives.
- Replication keeps applying while views are open: a new segment is published to every open
  view (under a short exclusive lock) *before* the image is written, so a view never sees a byte
  of a batch newer than its point.

Segment file format and overlay arithmetic: :mod:`broker.undo`; which points to keep, and within
which size bound: :mod:`broker.tiers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from broker.errors import StoreCorrupt, UnknownPoint
from broker.pointview import PointView
from broker.unchanged import Unchanged, span_at, unchanged_spans
from broker.undo import (
    _NAME_RE,
    _READ_CHUNK,
    AllocationCursor,
    RWLock,
    SegmentFile,
    SegmentWriter,
    UndoSegment,
    cover_bytes,
    merge_all,
    save_old_bytes,
    segment_meta,
)

# Re-exported: the rest of the broker names states and keys through this module.
from broker.undo import KIND_ZERO as KIND_ZERO  # noqa: PLC0414
from broker.undo import CutKey as CutKey  # noqa: PLC0414
from broker.undo import Key as Key  # noqa: PLC0414
from broker.undo import StateInfo as StateInfo  # noqa: PLC0414
from broker.undo import key_text as key_text  # noqa: PLC0414
from common.logs import get_logger

_log = get_logger("broker.points")


def parse_key(text: str) -> Key:
    """Parse a disk state id ``"G-S"`` (or a bare seq ``"S"`` meaning generation 1)."""
    gen, sep, seq = text.partition("-")
    try:
        return (int(gen), int(seq)) if sep else (1, int(gen))
    except ValueError:
        raise UnknownPoint(
            f"{text!r} is not a disk state id",
            fix="disk state ids look like 1-42 (generation-seq); VM points like 1:1042",
        ) from None


def cut_text(cut: CutKey) -> str:
    """The id of a VM point as users see it: ``"G:C"`` (generation:cut id)."""
    return f"{cut[0]}:{cut[1]}"


def parse_cut(text: str) -> CutKey:
    """Parse a VM point id ``"G:C"``; a disk state id ``"G-S"`` is refused, naming the form."""
    gen, sep, cut = text.partition(":")
    if sep and gen.isdigit() and cut.isdigit() and int(cut) > 0 and len(text) <= 41:
        return int(gen), int(cut)
    hint = (
        " (that is one disk's state id: a VM point is one cut of every disk)"
        if "-" in text and ":" not in text
        else ""
    )
    raise UnknownPoint(
        f"{text[:64]!r} is not a VM point id{hint}",
        fix="VM point ids look like 1:1042 (generation:cut); `replikant points VM` lists them",
    )


@dataclass(frozen=True)
class PointInfo:
    """One recovery point as listed to operators."""

    state: StateInfo
    size_bytes: int
    latest: bool

    @property
    def id(self) -> str:
        """``"G-S"``."""
        return key_text(self.state.key)

    @property
    def kind(self) -> str:
        """``"app"`` for application-consistent cuts, else ``"crash"``."""
        return "app" if self.state.consistency == 1 else "crash"

    def to_json(self) -> dict[str, Any]:
        """The JSON of ``GET /v1/vms/{vm}/points``."""
        return {
            "id": self.id,
            "generation": self.state.generation,
            "seq": self.state.seq,
            "time": self.state.cut_ns / 1e9,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "latest": self.latest,
        }


@dataclass(frozen=True)
class VMPoint:
    """One recovery point of a VM: one cut, and each disk's state at exactly that cut."""

    cut: CutKey
    disks: tuple[PointInfo, ...]
    """One per disk, in the order the disks were given to :func:`pair_by_cut`."""

    @property
    def id(self) -> str:
        """``"G:C"``."""
        return cut_text(self.cut)

    @property
    def key(self) -> CutKey:
        """The cut (what :func:`plan_retention` keeps)."""
        return self.cut

    @property
    def listed(self) -> bool:
        """Always: only listed disk states make VM points."""
        return True

    @property
    def cut_ns(self) -> int:
        """When the cut was taken (every disk's batch carries the same instant)."""
        return max(d.state.cut_ns for d in self.disks)

    @property
    def consistency(self) -> int:
        """1 (application-consistent) when every disk's batch says so, else 0."""
        return 1 if all(d.state.consistency == 1 for d in self.disks) else 0

    def to_json(self, disk_ids: Sequence[str]) -> dict[str, Any]:
        """The JSON of ``GET /v1/vms/{vm}/points``; ``disks`` maps each disk to its state id."""
        return {
            "id": self.id,
            "generation": self.cut[0],
            "cut_id": self.cut[1],
            "time": self.cut_ns / 1e9,
            "kind": "app" if self.consistency == 1 else "crash",
            "size_bytes": sum(d.size_bytes for d in self.disks),
            "latest": all(d.latest for d in self.disks),
            "disks": {disk: d.id for disk, d in zip(disk_ids, self.disks, strict=True)},
        }


def pair_by_cut(
    per_disk: Sequence[Iterable[PointInfo]], current: Sequence[Unchanged | None] = ()
) -> list[VMPoint]:
    """A VM's recovery points, newest first: every cut of which *each* disk has a listed state.

    Disks are paired by the cut id their batches carry, never by their sequence numbers: those
    drift apart for good after one lost ack, and a join of them mixes cuts taken at different
    instants (write order across disks broken). A cut some disk lacks (its batch failed and its
    changes went into the next cut) is no VM point, unless that disk is known unchanged at it
    (:mod:`broker.unchanged`; ``current`` holds each disk's newest agent statement, or None).
    """
    lists = [list(infos) for infos in per_disk]
    maps = [{p.state.cut: p for p in ps if p.state.listed and p.state.cut_id > 0} for ps in lists]
    if not maps:
        return []
    spans = [
        unchanged_spans(ps, current[i] if i < len(current) else None) for i, ps in enumerate(lists)
    ]
    out = []
    for cut in sorted(set().union(*maps), reverse=True):
        disks = [m.get(cut) or span_at(sp, cut) for m, sp in zip(maps, spans, strict=True)]
        if all(d is not None for d in disks):
            out.append(VMPoint(cut, tuple(d for d in disks if d is not None)))
    return out


# --------------------------------------------------------------------------------------------
# The per-replica index of segments


MERGE_SHARE: Final = 8
"""Captures leave this fraction (1/8) of a disk's bound free, so that thinning always has room
to write a merged segment beside its parts without crossing the bound."""


def written_segment(path: Path) -> UndoSegment:
    """The segment a capture just wrote and fsynced at ``path``."""
    seg = UndoSegment.load(path)
    if seg is None:  # pragma: no cover - the writer just wrote and fsynced it
        raise StoreCorrupt(f"undo segment {path} unreadable right after writing it")
    return seg


def capture_bound(bound: int) -> int:
    """What captures may fill of a disk's bound (the rest is merge room)."""
    return bound - bound // MERGE_SHARE


class PointsIndex:
    """The undo segments of one replica, its open views, and the operations on them.

    Thread-safety: ``_mutex`` serialises changes to the segment list (capture/publish by the
    applier, merges and drops by retention); ``rw`` orders view reads against publishing.
    """

    def __init__(self, points_dir: Path) -> None:
        self.dir = points_dir
        self.rw = RWLock()
        self._mutex = threading.RLock()
        self._segments: list[UndoSegment] = []
        self._views: weakref.WeakSet[PointView] = weakref.WeakSet()
        self._pins: dict[Key, int] = {}
        self._held: list[SegmentFile] = []  # retired files an open view still reads
        self._writing = 0  # bytes reserved for a merge being written
        self.churn_bytes = 0
        """Undo bytes the applied batches asked room for since start: the churn against the
        bound (a batch too big for it still counts)."""
        self._forced_drops = 0  # points dropped for room (bound, store low), not by policy

    # -- loading
    def load(self, applied: StateInfo) -> None:
        """Scan the folder: drop incomplete and superseded files, check the chain.

        ``applied`` is the replica's committed state; a complete segment one batch beyond it is
        the capture of a batch whose apply did not commit, and is kept (its journal is replayed).
        """
        self.dir.mkdir(mode=0o700, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        found: list[UndoSegment] = []
        for path in sorted(self.dir.iterdir()):
            if not _NAME_RE.match(path.name):
                continue
            seg = UndoSegment.load(path)
            if seg is None:
                # Capture never completed, so the image was never written for it: recapture.
                _log.warning("undo_incomplete_removed", file=path.name)
                path.unlink()
                continue
            found.append(seg)
        # A merge that crashed after its rename leaves the merged file and (some of) its parts.
        found.sort(key=lambda s: (s.first, _neg(s.top.key)))
        kept: list[UndoSegment] = []
        for seg in found:
            if kept and seg.top.key <= kept[-1].top.key:
                _log.info("undo_superseded_removed", file=seg.path.name, by=kept[-1].path.name)
                seg.retire()
                continue
            kept.append(seg)
        # Keep the contiguous chain that ends at the applied state, or one batch beyond it
        # (a batch captured but not committed: its journal is replayed).
        chain: list[UndoSegment] = []
        if kept and applied.key not in (kept[-1].top.key, kept[-1].base.key):
            _log.warning(
                "undo_chain_detached",
                newest=kept[-1].path.name,
                applied=key_text(applied.key),
            )
            kept_tail: list[UndoSegment] = []
        else:
            kept_tail = kept
        for seg in reversed(kept_tail):
            if chain and seg.top.key != chain[-1].base.key:
                break
            chain.append(seg)
        chain.reverse()
        for old in kept:
            if old not in chain:
                _log.warning("undo_orphan_removed", file=old.path.name)
                old.retire()
        self._segments = chain

    # -- queries
    def segment_for(self, key: Key) -> UndoSegment | None:
        """The single-batch segment whose top is ``key`` (an already captured batch)."""
        with self._mutex:
            for seg in reversed(self._segments):
                if seg.top.key == key:
                    return seg
                if seg.top.key < key:
                    return None
        return None

    def points(self, applied: StateInfo, *, include_hidden: bool = False) -> list[PointInfo]:
        """Recovery points, newest first: the latest applied state, then each segment's base."""
        with self._mutex:
            segs = [s for s in self._segments if s.base.key < applied.key]
        out = [PointInfo(applied, 0, latest=True)] if applied.seq > 0 else []
        for seg in reversed(segs):
            out.append(PointInfo(seg.base, seg.size_bytes, latest=False))
        return [p for p in out if include_hidden or p.state.listed]

    def undo_bytes(self) -> int:
        """Bytes of the segments that hold points."""
        with self._mutex:
            return sum(s.size_bytes for s in self._segments)

    def journal_bytes(self) -> int:
        """All recovery-point bytes on disk: segments, retired files an export still reads, and
        a merge being written (what the disk's bound limits)."""
        with self._mutex:
            self._held = [f for f in self._held if not f.gone]
            held = sum(f.size for f in self._held)
            return sum(s.size_bytes for s in self._segments) + held + self._writing

    def coverage(self, grain: int) -> dict[Key, int]:
        """Per segment (by its base state), the grains it covers (:meth:`UndoSegment.coverage`)."""
        with self._mutex:
            segs = list(self._segments)
        return {s.base.key: s.coverage(grain) for s in segs}

    def oldest(self) -> StateInfo | None:
        """The oldest state a segment keeps (the oldest point, if it is listed)."""
        with self._mutex:
            return self._segments[0].base if self._segments else None

    def _retire(self, seg: UndoSegment) -> None:
        file = seg.retire()
        if not file.gone:
            self._held.append(file)

    def drop_oldest(self, *, reason: str) -> int:
        """Drop the oldest segment unless an export pins its point; returns its bytes (0: none
        could go). The point at its base is gone; its data was only needed for that point."""
        with self._mutex:
            if not self._segments or self._segments[0].base.key in self._pins:
                return 0
            seg = self._segments.pop(0)
            self._retire(seg)
            if reason != "retention":
                self._forced_drops += 1
        _log.info("undo_dropped", file=seg.path.name, point=key_text(seg.base.key), reason=reason)
        return seg.size_bytes

    def take_forced_drops(self) -> int:
        """Points dropped for room since the last call (not by the retention policy)."""
        with self._mutex:
            n, self._forced_drops = self._forced_drops, 0
            return n

    def reserve(self, needed: int, bound: int) -> int:
        """Drop the oldest points until ``needed`` more bytes fit within ``bound``, and hold
        that room (counted in :meth:`journal_bytes`) until :meth:`release`. Returns how many
        bytes the exports' pins keep over the bound (0: it fits)."""
        cap = capture_bound(bound)
        with self._mutex:  # checked and taken at once: an ahead capture reserves as it reads
            while (over := self.journal_bytes() + needed - cap) > 0:
                if not self.drop_oldest(reason="journal_bound"):
                    break
            self._writing += needed
            self.churn_bytes += needed
        return max(over, 0)

    def release(self, reserved: int) -> None:
        """Give back room taken with :meth:`reserve`."""
        with self._mutex:
            self._writing -= reserved

    @contextlib.contextmanager
    def room_for(self, needed: int, bound: int, held: int = 0) -> Iterator[int]:
        """:meth:`reserve` ``needed`` bytes while the caller captures and publishes, less
        ``held``, the room an ahead capture of the same batch took already (handed over: it is
        released here too). Yields how many bytes the pins keep over the bound."""
        extra = max(needed - held, 0)
        over = self.reserve(extra, bound)
        try:
            yield over
        finally:
            self.release(extra + held)

    # -- capture and publish (the applier)
    def capture_marker(self, base: StateInfo, top: StateInfo) -> UndoSegment:
        """An empty undo segment for batch ``top`` whose base is no point: for a batch whose
        undo alone is larger than the bound (nothing older is kept then). It marks the batch
        as captured, so that a replay after a crash never saves half-applied bytes as the
        base's contents."""
        # Hidden like the middle of a full copy: never listed, never opened as a point.
        return self.capture(-1, [], dataclasses.replace(base, full=True), top)

    def capture(
        self,
        image_fd: int,
        ranges: Iterable[tuple[int, int]],
        base: StateInfo,
        top: StateInfo,
    ) -> UndoSegment:
        """Save the image's current contents of ``ranges`` as the undo of batch ``top``.

        Holes and zero blocks are recorded as zero entries (no data). The file is complete
        and fsynced when this returns; it is not yet visible to views (see :meth:`publish`).
        """
        writer = SegmentWriter(self.dir, top.key, top.key)
        try:
            # A batch the ingest captured ahead (broker/ahead.py) does not come here; a journal
            # replayed after a restart, or one that had to wait for an earlier batch, does.
            save_old_bytes(writer, AllocationCursor(image_fd), ranges)
            path = writer.finish(segment_meta(top.key, base, top))
        except BaseException:
            writer.abort()
            raise
        return written_segment(path)

    def publish(self, seg: UndoSegment) -> None:
        """Make ``seg`` part of the chain and of every open view, before the image changes."""
        with self._mutex:
            if self._segments and self._segments[-1].top.key == seg.top.key:
                return  # already published (replay of a captured batch)
            self.rw.acquire_write()
            try:
                self._segments.append(seg)
                for view in list(self._views):
                    view.add_newer(seg)
            finally:
                self.rw.release_write()

    # -- views
    def open_view(self, key: Key, applied: StateInfo) -> PointView:
        """A reader of the disk as of point ``key``; pins the point until closed."""
        with self._mutex:
            if key > applied.key:
                raise UnknownPoint(
                    f"point {key_text(key)} is newer than the applied state {key_text(applied.key)}"
                )
            later = [s for s in self._segments if s.base.key >= key]
            if key != applied.key and (not later or later[0].base.key != key):
                raise UnknownPoint(
                    f"point {key_text(key)} is not retained",
                    fix="list the retained points with `replikant points VM`",
                )
            view = PointView(self, key, merge_all([s.entries for s in later]), later)
            self._views.add(view)
            self._pins[key] = self._pins.get(key, 0) + 1
        return view

    def unpin(self, view: PointView) -> None:
        """A view closed: its point is no longer read through it."""
        with self._mutex:
            self._views.discard(view)
            left = self._pins.get(view.key, 0) - 1
            if left > 0:
                self._pins[view.key] = left
            else:
                self._pins.pop(view.key, None)

    def pinned(self) -> set[Key]:
        """Points some open view reads: retention keeps them."""
        with self._mutex:
            return set(self._pins)

    # -- retention
    def apply_retention(
        self, keep: set[Key], *, bound: int | None = None, grain: int = 4096
    ) -> tuple[int, int]:
        """Drop and merge segments so that only the points in ``keep`` (and pins) remain.

        Returns ``(segments dropped, segments merged away)``. The newest state is never a
        segment base, so it is always kept. With a ``bound``, a merge whose output (at most its
        parts, at most what they cover) would not fit beside them waits for a later pass.
        """
        dropped = merged = 0
        with self._mutex:
            keep = keep | set(self._pins)
            # 1. Drop from the oldest end: deleting a file is all it costs.
            while self._segments and self._segments[0].base.key not in keep:
                self.drop_oldest(reason="retention")
                dropped += 1
            # 2. Merge each run of segments whose inner bases are not kept.
            runs: list[list[UndoSegment]] = []
            for seg in self._segments:
                if runs and seg.base.key not in keep:
                    runs[-1].append(seg)
                else:
                    runs.append([seg])
        for run in runs:
            merged += self._merge_in_room(run, bound, grain)
        return dropped, merged

    def _merge_in_room(self, run: list[UndoSegment], bound: int | None, grain: int) -> int:
        """Merge ``run`` into one segment, a prefix at a time when the whole merge's output
        would not fit within ``bound`` beside its parts (each merge frees room for the next).
        Returns how many segments went."""
        merged = 0
        while len(run) > 1:
            cover = size = 0
            take = 0
            with self._mutex:
                room = bound - self.journal_bytes() if bound is not None else None
            for seg in run:
                nxt = cover | seg.coverage(grain)
                out = min(size + seg.size_bytes, cover_bytes(nxt, grain))
                if take >= 1 and room is not None and out > room:
                    break
                cover, size, take = nxt, size + seg.size_bytes, take + 1
            out = min(size, cover_bytes(cover, grain))
            if take < 2 or (room is not None and out > room):
                _log.info("undo_merge_deferred", file=run[0].path.name, parts=len(run))
                break
            with self._mutex:
                self._writing += out
            try:
                new = self._merge_run(run[:take])
            finally:
                with self._mutex:
                    self._writing -= out
            if new is None:
                break
            merged += take - 1
            run = [new, *run[take:]]
        return merged

    def _merge_run(self, run: list[UndoSegment]) -> UndoSegment | None:
        """Replace consecutive segments by one (oldest undo wins per range); returns it (None
        when the applier dropped some of them for room meanwhile)."""
        entries = merge_all([s.entries for s in run])
        sources = {s.sid: s for s in run}
        writer = SegmentWriter(self.dir, run[0].first, run[-1].top.key)
        try:
            for start, end, sid, src_off, kind in entries:
                if kind == KIND_ZERO or not sid:
                    writer.add_zero(start, end - start)
                    continue
                src = sources[sid]
                pos = start
                while pos < end:
                    n = min(_READ_CHUNK, end - pos)
                    writer.add_data(pos, src.pread(n, src_off + (pos - start)))
                    pos += n
            path = writer.finish(segment_meta(run[0].first, run[0].base, run[-1].top))
        except BaseException:
            writer.abort()
            raise
        new = written_segment(path)
        with self._mutex:
            if any(seg not in self._segments for seg in run):
                self._retire(new)
                return None
            first_idx = self._segments.index(run[0])
            self._segments[first_idx : first_idx + len(run)] = [new]
            for seg in run:
                self._retire(seg)
        _log.info(
            "undo_merged",
            file=path.name,
            parts=len(run),
            removed_points=[key_text(s.base.key) for s in run[1:]],
        )
        return new

    def drop_all(self) -> None:
        """Forget every segment (a full copy starts over; no listed point depends on them)."""
        with self._mutex:
            for seg in self._segments:
                self._retire(seg)
            self._segments = []

    def close(self) -> None:
        """Release descriptors (the service is stopping)."""
        with self._mutex:
            for seg in self._segments:
                seg.release()
            self._segments = []


def _neg(key: Key) -> Key:
    return (-key[0], -key[1])
