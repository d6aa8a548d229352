"""Recovery points: undo segments, copy-free "disk as of point P" views, and retention.

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

Segment file layout (``points/undo-G1.S1-G2.S2.dat``, all integers big-endian)::

    data area      the saved bytes of DATA entries, back to back
    index          count x (offset u64, length u64, file_offset u64, kind u8, 7 zero bytes)
    meta           JSON: base and top point descriptions
    footer (40 B)  magic "RKUNDOv1", index offset u64, count u64, meta length u64,
                   xxh3_64(index + meta) u64

A segment is complete exactly when its footer is valid; only complete segments are used, and the
applier writes the image only after the segment is complete and fsynced.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import math
import os
import re
import struct
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import xxhash

from broker.errors import StoreCorrupt, UnknownPoint
from common.fsio import data_segments, fsync_dir, is_zero, pread_exact
from common.logs import get_logger

_log = get_logger("broker.points")

Key = tuple[int, int]
"""A state of the disk: ``(generation, seq)`` of the last batch applied to reach it."""

KIND_DATA: Final = 0
KIND_ZERO: Final = 1

_MAGIC: Final = b"RKUNDOv1"
_FOOTER = struct.Struct(">8sQQQQ")
_ENTRY = struct.Struct(">QQQB7x")
_READ_CHUNK: Final = 8 * 1024 * 1024
_ZERO_GRAIN: Final = 64 * 1024
_NAME_RE: Final = re.compile(r"^undo-(\d+)\.(\d+)-(\d+)\.(\d+)\.dat$")

# An overlay entry: [start, end) comes from ``src`` at ``src_off`` (DATA) or reads as zero.
Entry = tuple[int, int, "UndoSegment | None", int, int]


CutKey = tuple[int, int]
"""A VM point: ``(generation, cut_id)`` of the cut every disk of the VM has."""


def key_text(key: Key) -> str:
    """The id of one disk's state as users see it: ``"G-S"`` (generation-seq)."""
    return f"{key[0]}-{key[1]}"


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
class StateInfo:
    """What is known about one state of the disk: its key and the cut that produced it."""

    generation: int
    seq: int
    cut_ns: int
    consistency: int
    full: bool
    cut_id: int = 0  # the VM cut the batch belonged to (0: none: never part of a VM point)
    first_change_cut: int = 0  # the batch's idleness statement (docs/protocol/batch.md)

    @property
    def key(self) -> Key:
        """``(generation, seq)``."""
        return self.generation, self.seq

    @property
    def cut(self) -> CutKey:
        """``(generation, cut_id)``: the VM point this state can be part of."""
        return self.generation, self.cut_id

    @property
    def listed(self) -> bool:
        """A usable recovery point: a real cut, not the empty disk or the middle of a full copy."""
        return self.seq > 0 and not self.full


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
    changes went into the next cut) is no VM point, unless that disk is known unchanged at the
    cut (decision 004, rules 2 and 3: :func:`_unchanged_spans`); ``current`` holds, per disk, the
    agent's latest statement that the disk is unchanged (None: none).
    """
    lists = [list(infos) for infos in per_disk]
    maps = [
        {p.state.cut: p for p in infos if p.state.listed and p.state.cut_id > 0} for infos in lists
    ]
    if not maps:
        return []
    spans = [
        _unchanged_spans(infos, current[i] if i < len(current) else None)
        for i, infos in enumerate(lists)
    ]
    out = []
    for cut in sorted(set().union(*maps), reverse=True):
        disks = [m.get(cut) or _span_at(sp, cut) for m, sp in zip(maps, spans, strict=True)]
        if all(d is not None for d in disks):
            out.append(VMPoint(cut, tuple(d for d in disks if d is not None)))
    return out


@dataclass(frozen=True)
class Unchanged:
    """An agent's statement: the disk is as after batch ``seq`` through VM cut ``cut_id``."""

    generation: int
    seq: int
    cut_id: int
    cut_ns: int


_Span = tuple[int, int, int, PointInfo]  # generation, first cut id, last cut id, the state


def _unchanged_spans(infos: Sequence[PointInfo], current: Unchanged | None) -> list[_Span]:
    """The cut ids at which the disk is known to be as after a state it has no batch of.

    Rule 2: batch ``S+1`` says it holds no change before ``first_change_cut``, so cuts after
    ``S``'s and below that are ``S``'s contents. Rule 3: the agent said the newest state still
    held at a later cut.
    """
    chain = sorted(
        (p for p in infos if p.state.listed and p.state.cut_id > 0), key=lambda p: p.state.key
    )
    spans: list[_Span] = []
    for a, b in itertools.pairwise(chain):
        sa, sb = a.state, b.state
        adjacent = sb.generation == sa.generation and sb.seq == sa.seq + 1
        if adjacent and sb.first_change_cut > sa.cut_id + 1:
            spans.append((sa.generation, sa.cut_id + 1, sb.first_change_cut - 1, a))
    if chain and current is not None:
        last = chain[-1].state
        if (current.generation, current.seq) == last.key and current.cut_id > last.cut_id:
            spans.append((last.generation, last.cut_id + 1, current.cut_id, chain[-1]))
    return spans


def _span_at(spans: list[_Span], cut: CutKey) -> PointInfo | None:
    i = bisect.bisect_right(spans, cut, key=lambda s: (s[0], s[1])) - 1
    if i >= 0 and spans[i][0] == cut[0] and spans[i][1] <= cut[1] <= spans[i][2]:
        return spans[i][3]
    return None


# --------------------------------------------------------------------------------------------
# Reader/writer lock


class RWLock:
    """Many readers or one writer; the applier's publish step is the (brief) writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        """Wait until no writer holds the lock, then join the readers."""
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        """Leave the readers."""
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """Wait until nobody holds the lock, then hold it alone."""
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True

    def release_write(self) -> None:
        """Release the exclusive hold."""
        with self._cond:
            self._writer = False
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# Interval arithmetic over overlay entries


def _fragment(entry: Entry, start: int, end: int) -> Entry:
    s, _e, src, off, kind = entry
    return (start, end, src, off + (start - s) if kind == KIND_DATA else 0, kind)


def overlay_merge(older: list[Entry], newer: list[Entry]) -> list[Entry]:
    """``older`` plus the parts of ``newer`` that ``older`` does not cover, sorted by offset.

    Both inputs are sorted and non-overlapping; so is the result. "Older wins" is what reading a
    point needs: the undo from the oldest batch after the point holds the point's bytes.
    """
    if not older:
        return list(newer)
    if not newer:
        return list(older)
    fragments: list[Entry] = []
    i = 0
    n_old = len(older)
    for entry in newer:
        s, e = entry[0], entry[1]
        while i < n_old and older[i][1] <= s:
            i += 1
        pos = s
        j = i
        while pos < e:
            if j < n_old and older[j][0] < e:
                o_start, o_end = older[j][0], older[j][1]
                if o_start > pos:
                    fragments.append(_fragment(entry, pos, o_start))
                pos = max(pos, o_end)
                j += 1
            else:
                fragments.append(_fragment(entry, pos, e))
                pos = e
    if not fragments:
        return list(older)
    out = older + fragments
    out.sort(key=lambda x: x[0])
    return out


def merge_all(levels: list[list[Entry]]) -> list[Entry]:
    """Overlay-merge entry lists given oldest first, pairwise (O(n log k), not O(n k))."""
    if not levels:
        return []
    while len(levels) > 1:
        nxt = [
            overlay_merge(levels[k], levels[k + 1]) if k + 1 < len(levels) else levels[k]
            for k in range(0, len(levels), 2)
        ]
        levels = nxt
    return levels[0]


def _overlapping(entries: list[Entry], offset: int, end: int) -> Iterator[Entry]:
    """Entries intersecting ``[offset, end)``, in order."""
    idx = bisect.bisect_right(entries, offset, key=lambda x: x[0]) - 1
    idx = max(idx, 0)
    n = len(entries)
    while idx < n and entries[idx][0] < end:
        if entries[idx][1] > offset:
            yield entries[idx]
        idx += 1


# --------------------------------------------------------------------------------------------
# Undo segments


def segment_name(first: Key, top: Key) -> str:
    """File name of the segment covering batches ``first..top``."""
    return f"undo-{first[0]}.{first[1]}-{top[0]}.{top[1]}.dat"


def _state_from_json(data: dict[str, Any]) -> StateInfo:
    return StateInfo(
        generation=int(data["generation"]),
        seq=int(data["seq"]),
        cut_ns=int(data["cut_ns"]),
        consistency=int(data["consistency"]),
        full=bool(data["full"]),
        # Segments written before cut ids existed have none: such states are no VM point.
        cut_id=int(data.get("cut_id", 0)),
        first_change_cut=int(data.get("first_change_cut", 0)),
    )


class _FileState:
    """The open descriptor of a segment, shared with its finalizer (which closes/unlinks it)."""

    __slots__ = ("fd", "lock", "path", "retired")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.retired = False
        self.lock = threading.Lock()


def _finalize_file(state: _FileState) -> None:
    if state.fd is not None:
        os.close(state.fd)
        state.fd = None
    if state.retired:
        # Deferred unlink: a view still reading the old data kept this segment alive until now.
        state.path.unlink(missing_ok=True)


class UndoSegment:
    """One complete undo file: its entries (in memory) and its base/top states.

    Once retired (merged into a bigger segment, or dropped by retention) the file is deleted as
    soon as no view references the segment any more.
    """

    def __init__(
        self,
        path: Path,
        first: Key,
        base: StateInfo,
        top: StateInfo,
        entries: list[Entry],
        size_bytes: int,
    ) -> None:
        self.path = path
        self.first = first
        self.base = base
        self.top = top
        self.entries = entries
        self.size_bytes = size_bytes
        self._file = _FileState(path)
        self._finalizer = weakref.finalize(self, _finalize_file, self._file)

    def __repr__(self) -> str:
        return f"UndoSegment({self.path.name})"

    @property
    def data_bytes(self) -> int:
        """Bytes of saved data."""
        return sum(e[1] - e[0] for e in self.entries if e[4] == KIND_DATA)

    def pread(self, length: int, offset: int) -> bytes:
        """Read saved bytes at ``offset`` of the data area."""
        st = self._file
        with st.lock:
            if st.fd is None:
                st.fd = os.open(st.path, os.O_RDONLY | os.O_CLOEXEC)
            fd = st.fd
        return pread_exact(fd, length, offset)

    def retire(self) -> None:
        """Delete the file once nothing reads it (now, if nothing does)."""
        self._file.retired = True
        # Entries point back at their segment: break that cycle so that reference counting
        # frees (and so unlinks) the segment as soon as the last view lets go of it.
        self.entries = []

    def release(self) -> None:
        """Close the descriptor now (index shutdown); retired files are then unlinked."""
        self._finalizer()

    @classmethod
    def load(cls, path: Path) -> UndoSegment | None:
        """Open a segment file; ``None`` if it is incomplete (no valid footer)."""
        try:
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < _FOOTER.size:
                    return None
                fh.seek(size - _FOOTER.size)
                magic, index_off, count, meta_len, checksum = _FOOTER.unpack(fh.read(_FOOTER.size))
                if magic != _MAGIC or index_off + count * _ENTRY.size + meta_len != (
                    size - _FOOTER.size
                ):
                    return None
                fh.seek(index_off)
                blob = fh.read(count * _ENTRY.size + meta_len)
        except FileNotFoundError:
            return None
        if xxhash.xxh3_64_intdigest(blob) != checksum:
            return None
        meta = json.loads(blob[count * _ENTRY.size :])
        seg = cls(
            path, (0, 0), _state_from_json(meta["base"]), _state_from_json(meta["top"]), [], 0
        )
        entries: list[Entry] = []
        for i in range(count):
            off, length, file_off, kind = _ENTRY.unpack_from(blob, i * _ENTRY.size)
            entries.append((off, off + length, seg if kind == KIND_DATA else None, file_off, kind))
        seg.entries = entries
        seg.first = (int(meta["first"][0]), int(meta["first"][1]))
        seg.size_bytes = size
        return seg


class _SegmentWriter:
    """Writes one segment file: data first, then index, meta and footer, then fsync."""

    def __init__(self, directory: Path, first: Key, top: Key) -> None:
        self.final = directory / segment_name(first, top)
        self.tmp = directory / (self.final.name + ".tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._fh = os.fdopen(fd, "wb")
        self._pos = 0
        self.raw: list[tuple[int, int, int, int]] = []  # (offset, length, file_off, kind)

    def add_data(self, offset: int, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self.raw.append((offset, len(data), self._pos, KIND_DATA))
        self._pos += len(data)

    def add_zero(self, offset: int, length: int) -> None:
        last = self.raw[-1] if self.raw else None
        if last is not None and last[3] == KIND_ZERO and last[0] + last[1] == offset:
            self.raw[-1] = (last[0], last[1] + length, 0, KIND_ZERO)
        else:
            self.raw.append((offset, length, 0, KIND_ZERO))

    def finish(self, meta: dict[str, Any]) -> Path:
        index = b"".join(_ENTRY.pack(o, n, f, k) for o, n, f, k in self.raw)
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        blob = index + meta_bytes
        self._fh.write(blob)
        self._fh.write(
            _FOOTER.pack(
                _MAGIC, self._pos, len(self.raw), len(meta_bytes), xxhash.xxh3_64_intdigest(blob)
            )
        )
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


def _segment_meta(first: Key, base: StateInfo, top: StateInfo) -> dict[str, Any]:
    return {"first": list(first), "base": asdict(base), "top": asdict(top)}


# --------------------------------------------------------------------------------------------
# The per-replica index of segments


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
        """Bytes of undo data on disk."""
        with self._mutex:
            return sum(s.size_bytes for s in self._segments)

    # -- capture and publish (the applier)
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
        writer = _SegmentWriter(self.dir, top.key, top.key)
        try:
            for offset, length in ranges:
                for start, run, allocated in data_segments(image_fd, offset, length):
                    if not allocated:
                        writer.add_zero(start, run)
                        continue
                    pos, end = start, start + run
                    while pos < end:
                        n = min(_READ_CHUNK, end - pos)
                        data = pread_exact(image_fd, n, pos)
                        _add_nonzero(writer, pos, data)
                        pos += n
            path = writer.finish(_segment_meta(top.key, base, top))
        except BaseException:
            writer.abort()
            raise
        seg = UndoSegment.load(path)
        if seg is None:  # pragma: no cover - we just wrote and fsynced it
            raise StoreCorrupt(f"undo segment {path} unreadable right after writing it")
        return seg

    def publish(self, seg: UndoSegment) -> None:
        """Make ``seg`` part of the chain and of every open view, before the image changes."""
        with self._mutex:
            if self._segments and self._segments[-1].top.key == seg.top.key:
                return  # already published (replay of a captured batch)
            self.rw.acquire_write()
            try:
                self._segments.append(seg)
                for view in list(self._views):
                    view._add_newer(seg.entries)
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
            view = PointView(self, key, merge_all([s.entries for s in later]))
            self._views.add(view)
            self._pins[key] = self._pins.get(key, 0) + 1
        return view

    def _unpin(self, view: PointView) -> None:
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
    def apply_retention(self, keep: set[Key]) -> tuple[int, int]:
        """Drop and merge segments so that only the points in ``keep`` (and pins) remain.

        Returns ``(segments dropped, segments merged away)``. The newest state is never a
        segment base, so it is always kept.
        """
        dropped = merged = 0
        with self._mutex:
            keep = keep | set(self._pins)
            # 1. Drop from the oldest end: deleting a file is all it costs.
            while self._segments and self._segments[0].base.key not in keep:
                seg = self._segments.pop(0)
                seg.retire()
                _log.info("undo_dropped", file=seg.path.name, point=key_text(seg.base.key))
                dropped += 1
            # 2. Merge each run of segments whose inner bases are not kept.
            runs: list[list[UndoSegment]] = []
            for seg in self._segments:
                if runs and seg.base.key not in keep:
                    runs[-1].append(seg)
                else:
                    runs.append([seg])
        for run in runs:
            if len(run) > 1:
                self._merge_run(run)
                merged += len(run) - 1
        return dropped, merged

    def _merge_run(self, run: list[UndoSegment]) -> None:
        """Replace consecutive segments by one (oldest undo wins per range)."""
        entries = merge_all([s.entries for s in run])
        writer = _SegmentWriter(self.dir, run[0].first, run[-1].top.key)
        try:
            for start, end, src, src_off, kind in entries:
                if kind == KIND_ZERO or src is None:
                    writer.add_zero(start, end - start)
                    continue
                pos = start
                while pos < end:
                    n = min(_READ_CHUNK, end - pos)
                    writer.add_data(pos, src.pread(n, src_off + (pos - start)))
                    pos += n
            path = writer.finish(_segment_meta(run[0].first, run[0].base, run[-1].top))
        except BaseException:
            writer.abort()
            raise
        new = UndoSegment.load(path)
        if new is None:  # pragma: no cover
            raise StoreCorrupt(f"merged undo segment {path} unreadable right after writing it")
        with self._mutex:
            first_idx = self._segments.index(run[0])
            self._segments[first_idx : first_idx + len(run)] = [new]
        for seg in run:
            seg.retire()
        _log.info(
            "undo_merged",
            file=path.name,
            parts=len(run),
            removed_points=[key_text(s.base.key) for s in run[1:]],
        )

    def drop_all(self) -> None:
        """Forget every segment (a full copy starts over; no listed point depends on them)."""
        with self._mutex:
            for seg in self._segments:
                seg.retire()
            self._segments = []

    def close(self) -> None:
        """Release descriptors (the service is stopping)."""
        with self._mutex:
            for seg in self._segments:
                seg.release()
            self._segments = []


def _preadinto(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past the end of the file read as zero."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            buf[got:] = bytes(len(buf) - got)
            return
        got += n


def _add_nonzero(writer: _SegmentWriter, offset: int, data: bytes) -> None:
    """Record ``data`` at ``offset``, as zero entries where whole 64 KiB grains are zero."""
    if is_zero(data):
        writer.add_zero(offset, len(data))
        return
    view = memoryview(data)
    run_start = 0
    run_zero: bool | None = None
    for pos in range(0, len(data), _ZERO_GRAIN):
        grain_zero = is_zero(view[pos : pos + _ZERO_GRAIN])
        if run_zero is None:
            run_zero = grain_zero
        elif grain_zero != run_zero:
            _flush_run(writer, offset, view, run_start, pos, run_zero)
            run_start, run_zero = pos, grain_zero
    _flush_run(writer, offset, view, run_start, len(data), bool(run_zero))


def _flush_run(
    writer: _SegmentWriter, offset: int, view: memoryview, start: int, end: int, zero: bool
) -> None:
    if zero:
        writer.add_zero(offset + start, end - start)
    else:
        writer.add_data(offset + start, view[start:end])


def _neg(key: Key) -> Key:
    return (-key[0], -key[1])


# --------------------------------------------------------------------------------------------
# Views


class PointView:
    """The disk as of one point, read without copying it: image + overlay of undo data.

    Reads are thread-safe and run concurrently with the applier; the view follows new batches
    on its own (see :meth:`PointsIndex.publish`). Close it to unpin the point.
    """

    def __init__(self, index: PointsIndex, key: Key, entries: list[Entry]) -> None:
        self._index = index
        self.key = key
        self._entries = entries
        self._image_fd: int | None = None
        self.closed = False

    def attach_image(self, fd: int) -> None:
        """The replica image descriptor to read unsaved ranges from (owned by the caller)."""
        self._image_fd = fd

    def _add_newer(self, newer: list[Entry]) -> None:
        # Called under the index's write lock, before the image is written for this batch. The
        # merge is linear: the two-pointer walk plus a sort of an almost sorted list.
        if newer:
            self._entries = overlay_merge(self._entries, newer)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """``length`` bytes of the disk as of the point, from ``offset``."""
        if self.closed:
            raise ValueError("view is closed")
        if self._image_fd is None:
            raise ValueError("attach_image() first")
        end = offset + length
        self._index.rw.acquire_read()
        try:
            overlay = list(_overlapping(self._entries, offset, end))
            if not overlay:
                # The common case (recent points, unchanged ranges): one copy, straight from
                # the page cache.
                return pread_exact(self._image_fd, length, offset)
            out = bytearray(length)
            view = memoryview(out)
            pos = offset
            for start, stop, src, src_off, kind in overlay:
                s = max(start, offset)
                e = min(stop, end)
                if s > pos:
                    _preadinto(self._image_fd, view[pos - offset : s - offset], pos)
                if kind == KIND_DATA and src is not None:
                    view[s - offset : e - offset] = src.pread(e - s, src_off + (s - start))
                pos = e
            if pos < end:
                _preadinto(self._image_fd, view[pos - offset :], pos)
            return out
        finally:
            self._index.rw.release_read()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold off the applier's publish step while the caller reads image ranges directly
        (e.g. through an mmap) after checking :meth:`overlay_in` for them."""
        self._index.rw.acquire_read()
        try:
            yield
        finally:
            self._index.rw.release_read()

    def overlay_in(self, offset: int, end: int) -> list[Entry]:
        """The overlay entries intersecting ``[offset, end)`` (served from undo data)."""
        self._index.rw.acquire_read()
        try:
            return list(_overlapping(self._entries, offset, end))
        finally:
            self._index.rw.release_read()

    def close(self) -> None:
        """Unpin the point; the view cannot read any more."""
        if not self.closed:
            self.closed = True
            self._entries = []
            self._index._unpin(self)

    def __enter__(self) -> PointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Retention policy


@dataclass(frozen=True)
class RetentionPolicy:
    """``[retention]`` of broker.toml in seconds."""

    any_point_seconds: float
    hourly_seconds: float
    app_consistent_seconds: float


class Retainable(Protocol):
    """What retention looks at: a disk state (:class:`StateInfo`) or a VM point."""

    @property
    def key(self) -> tuple[int, int]:
        """Ordered: newer points have larger keys."""

    @property
    def listed(self) -> bool:
        """A recovery point operators see (others are kept only when newest)."""

    @property
    def cut_ns(self) -> int:
        """When the point was cut."""

    @property
    def consistency(self) -> int:
        """1 for application-consistent."""


def plan_retention(
    states: Iterable[Retainable], now_ns: int, policy: RetentionPolicy
) -> set[tuple[int, int]]:
    """Which points to keep: every point in the any-point window, the newest point of each
    clock hour in the hourly window, app-consistent points for their own window, and always the
    newest state. Hidden states (the empty disk, mid-full-copy) are kept only if newest.
    """
    items = sorted(states, key=lambda s: s.key)
    keep: set[tuple[int, int]] = set()
    if not items:
        return keep
    keep.add(items[-1].key)
    hour_best: dict[int, Retainable] = {}
    for st in items:
        if not st.listed:
            continue
        age = (now_ns - st.cut_ns) / 1e9
        if age <= policy.any_point_seconds:
            keep.add(st.key)
            continue
        if st.consistency == 1 and age <= policy.app_consistent_seconds:
            keep.add(st.key)
        if age <= policy.any_point_seconds + policy.hourly_seconds:
            bucket = math.floor(st.cut_ns / 3.6e12)
            best = hour_best.get(bucket)
            if best is None or st.key > best.key:
                hour_best[bucket] = st
    keep.update(s.key for s in hour_best.values())
    return keep


def plan_vm_retention(
    per_disk: Sequence[Sequence[PointInfo]], now_ns: int, policy: RetentionPolicy
) -> list[set[Key]]:
    """Per disk of one VM, the states to keep: its state at every VM point the policy keeps,
    its newest state, and every state after the newest VM point.

    The policy is applied to VM points, never disk by disk: a disk that kept another hour's
    point than its sibling would leave that hour with no VM point at all. States after the
    newest VM point are the cuts a lagging disk has not reached yet; dropping them would lose
    VM points that appear when it does.
    """
    points = pair_by_cut(per_disk)
    kept = plan_retention(points, now_ns, policy)
    newest_cut = points[0].cut if points else (0, 0)
    out: list[set[Key]] = []
    for i, infos in enumerate(per_disk):
        keep = {points[j].disks[i].state.key for j in range(len(points)) if points[j].cut in kept}
        keep.update(p.state.key for p in infos if p.state.listed and p.state.cut > newest_cut)
        if infos:
            keep.add(max(p.state.key for p in infos))
        out.append(keep)
    return out
