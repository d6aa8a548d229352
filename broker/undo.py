"""Undo segments: the file format of recovery-point data, and overlay arithmetic over it.

Before batch ``S`` touches the replica image, the applier saves what the image held in every
range ``S`` will write: the *undo* of ``S``. One undo file (a *segment*) covers a run of
consecutive batches ``first..top``; its data turns the disk at ``top`` back into the disk at
``base`` (the state just before ``first``). See :mod:`broker.points` for how views and
retention use them (decision 011).

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
import errno
import itertools
import json
import os
import re
import struct
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import xxhash

from common.fsio import (
    UNSUPPORTED_ERRNOS,
    fsync_dir,
    is_zero,
    pread_exact,
    prefetch,
    start_writeback,
)
from common.heldio import may_hold, read_exact, seek

Key = tuple[int, int]
"""A state of the disk: ``(generation, seq)`` of the last batch applied to reach it."""

CutKey = tuple[int, int]
"""A VM point: ``(generation, cut_id)`` of the cut every disk of the VM has."""

KIND_DATA: Final = 0
KIND_ZERO: Final = 1

_MAGIC: Final = b"RKUNDOv1"
_FOOTER = struct.Struct(">8sQQQQ")
_ENTRY = struct.Struct(">QQQB7x")
_READ_CHUNK: Final = 8 * 1024 * 1024
_WRITE_BUFFER: Final = 1024 * 1024
_ZERO_GRAIN: Final = 64 * 1024
_NAME_RE: Final = re.compile(r"^undo-(\d+)\.(\d+)-(\d+)\.(\d+)\.dat$")

# An overlay entry: [start, end) comes from the segment numbered ``sid`` (``UndoSegment.sid``) at
# ``src_off`` (DATA), or reads as zero (``sid`` 0). Only ints: the garbage collector stops
# tracking such a tuple, and an open view's overlay or a merge holds hundreds of thousands of
# them, which the collector otherwise walked at every full pass with the GIL held (issue 10:
# 31-66 ms every ~3 s under 4 KiB writes at 20 MiB/s, when segments kept their entries as
# tuples naming the segment). Readers map ``sid`` to the segment through the segments they hold.
Entry = tuple[int, int, int, int, int]
_SEGMENT_IDS = itertools.count(1)


def key_text(key: Key) -> str:
    """The id of one disk's state as users see it: ``"G-S"`` (generation-seq)."""
    return f"{key[0]}-{key[1]}"


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


# --------------------------------------------------------------------------------------------
# Reader/writer lock (views read segments while the applier publishes new ones)


class RWLock:
    """Many readers or one writer; the applier's publish step is the (brief) writer.

    Readers take and leave it on every point-in-time READ, so their path is a plain lock's
    (whose ``with`` runs in C) and wakes nobody unless a writer waits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        """Wait until no writer holds the lock, then join the readers."""
        with self._lock:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        """Leave the readers."""
        with self._lock:
            self._readers -= 1
            if self._readers == 0 and self._writers_waiting:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """Wait until nobody holds the lock, then hold it alone."""
        with self._lock:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        """Release the exclusive hold."""
        with self._lock:
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


class SegmentFile:
    """The open descriptor of a segment, shared with its finalizer (which closes/unlinks it).

    ``gone`` turns true when the file of a retired segment is unlinked: until then its ``size``
    bytes still count against the disk's bound (an export may be reading them).
    """

    __slots__ = ("fd", "gone", "lock", "path", "retired", "size")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd: int | None = None
        self.retired = False
        self.gone = False
        self.lock = threading.Lock()


def _finalize_file(state: SegmentFile) -> None:
    if state.fd is not None:
        os.close(state.fd)
        state.fd = None
    if state.retired:
        # Deferred unlink: a view still reading the old data kept this segment alive until now.
        state.path.unlink(missing_ok=True)
        state.gone = True


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
        index: bytes,
        size_bytes: int,
    ) -> None:
        self.path = path
        self.first = first
        self.base = base
        self.top = top
        # The file's index records as they are (32 bytes an entry, against 188 as an Entry
        # tuple in a list): a disk's retained undo is up to millions of entries, and only an
        # open view, a merge or the coverage of a segment needs them as tuples.
        self._index = index
        self.size_bytes = size_bytes
        self.sid = next(_SEGMENT_IDS)
        """This segment's number in :data:`Entry` tuples (unique in the process)."""
        self._file = SegmentFile(path, size_bytes)
        self._finalizer = weakref.finalize(self, _finalize_file, self._file)
        self._coverage: tuple[int, int] | None = None  # (grain, bitset)

    @property
    def entries(self) -> list[Entry]:
        """The overlay entries, sorted by offset (decoded from the index at each call)."""
        sid = self.sid
        return [
            (off, off + length, sid if kind == KIND_DATA else 0, file_off, kind)
            for off, length, file_off, kind in _ENTRY.iter_unpack(self._index)
        ]

    def coverage(self, grain: int) -> int:
        """The grains of the disk this segment holds undo for, one byte per grain (0 or 1) in an
        int: ORing those of a run gives what a merge of it covers (see :func:`cover_bytes`)."""
        if self._coverage is None or self._coverage[0] != grain:
            entries = self.entries
            top = max((e[1] for e in entries), default=0)
            marks = bytearray((top + grain - 1) // grain)
            for start, end, _src, _off, _kind in entries:
                first, last = start // grain, (end + grain - 1) // grain
                marks[first:last] = b"\x01" * (last - first)
            self._coverage = (grain, int.from_bytes(marks, "little"))
        return self._coverage[1]

    def __repr__(self) -> str:
        return f"UndoSegment({self.path.name})"

    @property
    def data_bytes(self) -> int:
        """Bytes of saved data."""
        return sum(e[1] - e[0] for e in self.entries if e[4] == KIND_DATA)

    def pread(self, length: int, offset: int) -> bytes:
        """Read saved bytes at ``offset`` of the data area."""
        return pread_exact(self._fd(), length, offset)

    def prefetch(self, length: int, offset: int) -> None:
        """Have saved bytes at ``offset`` read into memory soon, without waiting (a hint)."""
        prefetch(self._fd(), offset, length)

    def _fd(self) -> int:
        st = self._file
        with st.lock:
            if st.fd is None:
                st.fd = os.open(st.path, os.O_RDONLY | os.O_CLOEXEC)
            return st.fd

    def retire(self) -> SegmentFile:
        """Delete the file once nothing reads it (now, if nothing does); the returned file
        state tells when it is gone."""
        self._file.retired = True
        self._index = b""  # views keep merged copies of what they need
        return self._file

    def release(self) -> None:
        """Close the descriptor now (index shutdown); retired files are then unlinked."""
        self._finalizer()

    @classmethod
    def load(cls, path: Path) -> UndoSegment | None:
        """Open a segment file; ``None`` if it is incomplete (no valid footer)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:  # pread on a bare descriptor: fewer system calls than a file object's (issue 10)
            size = os.fstat(fd).st_size
            if size < _FOOTER.size:
                return None
            footer = pread_exact(fd, _FOOTER.size, size - _FOOTER.size)
            magic, index_off, count, meta_len, checksum = _FOOTER.unpack(footer)
            if magic != _MAGIC or index_off + count * _ENTRY.size + meta_len != (
                size - _FOOTER.size
            ):
                return None
            blob = pread_exact(fd, count * _ENTRY.size + meta_len, index_off)
        finally:
            os.close(fd)
        if xxhash.xxh3_64_intdigest(blob) != checksum:
            return None
        meta = json.loads(blob[count * _ENTRY.size :])
        seg = cls(
            path,
            (0, 0),
            _state_from_json(meta["base"]),
            _state_from_json(meta["top"]),
            blob[: count * _ENTRY.size],
            0,
        )
        seg.first = (int(meta["first"][0]), int(meta["first"][1]))
        seg.size_bytes = seg._file.size = size
        return seg


class SegmentWriter:
    """Writes one segment file: data first, then index, meta and footer, then fsync."""

    def __init__(self, directory: Path, first: Key, top: Key) -> None:
        self.final = directory / segment_name(first, top)
        self.tmp = directory / (self.final.name + ".tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        # Undo comes in 4 KiB pieces: an 8 KiB buffer made a write() of every other one.
        self._fh = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self._pos = 0
        self.raw: list[tuple[int, int, int, int]] = []  # (offset, length, file_off, kind)

    def add_data(self, offset: int, data: bytes | memoryview) -> None:
        self._fh.write(data)
        last = self.raw[-1] if self.raw else None
        if (
            last is not None
            and last[3] == KIND_DATA
            and last[0] + last[1] == offset
            and last[2] + last[1] == self._pos
        ):
            # A merge writes neighbouring ranges from many parts: one entry keeps the index small.
            self.raw[-1] = (last[0], last[1] + len(data), last[2], KIND_DATA)
        else:
            self.raw.append((offset, len(data), self._pos, KIND_DATA))
        self._pos += len(data)

    def add_zero(self, offset: int, length: int) -> None:
        last = self.raw[-1] if self.raw else None
        if last is not None and last[3] == KIND_ZERO and last[0] + last[1] == offset:
            self.raw[-1] = (last[0], last[1] + length, 0, KIND_ZERO)
        else:
            self.raw.append((offset, length, 0, KIND_ZERO))

    def start_writeback(self) -> None:
        """Start writing what was added so far to the disk, so that :meth:`finish`'s fsync has
        less left to wait for."""
        self._fh.flush()
        start_writeback(self._fh.fileno(), 0, 0)

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
        # Closing flushes the buffer, which fails again on a full disk: the file goes anyway.
        with contextlib.suppress(OSError):
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


def segment_meta(first: Key, base: StateInfo, top: StateInfo) -> dict[str, Any]:
    return {"first": list(first), "base": asdict(base), "top": asdict(top)}


def _add_nonzero(writer: SegmentWriter, offset: int, data: bytes) -> None:
    """Record ``data`` at ``offset``, as zero entries where whole 64 KiB grains are zero."""
    if is_zero(data):
        writer.add_zero(offset, len(data))
        return
    if len(data) <= _ZERO_GRAIN:  # one grain, and not zero: most captures' every range
        writer.add_data(offset, data)
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
    writer: SegmentWriter, offset: int, view: memoryview, start: int, end: int, zero: bool
) -> None:
    if zero:
        writer.add_zero(offset + start, end - start)
    else:
        writer.add_data(offset + start, view[start:end])


def save_old_bytes(
    writer: SegmentWriter, cursor: AllocationCursor, ranges: Iterable[tuple[int, int]]
) -> None:
    """Add the current contents of ``ranges`` of ``cursor``'s file to ``writer``: holes and
    zero grains as zero entries, the rest as data."""
    fd = cursor.fd
    runs = [run for offset, length in ranges for run in cursor.segments(offset, length)]
    # A replica's old bytes are mostly on the disk, not in memory: read one by one, 5,000
    # scattered 4 KiB ranges took 200-300 ms (issue 10). Asked for all at once first, the device
    # reads them in parallel while the loop below copies the first ones.
    for start, run, allocated in runs:
        if allocated:
            prefetch(fd, start, run)
    for start, run, allocated in runs:
        if not allocated:
            writer.add_zero(start, run)
            continue
        pos, end = start, start + run
        while pos < end:
            n = min(_READ_CHUNK, end - pos)
            _add_nonzero(writer, pos, read_exact(fd, n, pos, hold=cursor.hold))
            pos += n


def undo_size_bound(ranges: Sequence[tuple[int, int]]) -> int:
    """The most a capture of ``ranges`` writes: all their bytes, an index entry per 4 KiB (the
    finest hole/data alternation a file system gives) and per range, and meta plus footer."""
    data = sum(n for _o, n in ranges)
    return data + _ENTRY.size * (data // 4096 + 2 * len(ranges)) + 4096 + _FOOTER.size


def cover_bytes(coverage: int, grain: int) -> int:
    """The most a merged segment covering ``coverage`` (see :meth:`UndoSegment.coverage`) can
    take: every covered grain as data, an index entry per covered or uncovered stretch (the
    writer joins neighbouring data), meta and footer."""
    stretches = (coverage ^ (coverage << 8)).bit_count() + 2
    return coverage.bit_count() * grain + _ENTRY.size * stretches + 4096 + _FOOTER.size


class AllocationCursor:
    """``data_segments`` for many ranges of one file in increasing order, remembering what
    ``SEEK_DATA``/``SEEK_HOLE`` said: the next range inside a data run or hole already found
    costs no system call. A capture of 256 random 4 KiB ranges made two ``lseek`` per range,
    each a hand-over of the GIL (issue 10, point 3); those it still makes keep the GIL
    (:func:`common.heldio.seek`). The file must not change meanwhile."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hold = may_hold(fd)
        """Whether reads and seeks of ``fd`` keep the GIL (:func:`common.heldio.may_hold`)."""
        self._data = (0, 0)  # the last data run found, [start, end)
        self._hole = (0, 0)  # the last hole found, [start, end)

    def segments(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, length, allocated)`` runs covering ``[offset, offset + length)``."""
        pos, end = offset, offset + length
        while pos < end:
            if (
                not self._data[0] <= pos < self._data[1]
                and not self._hole[0] <= pos < self._hole[1]
            ):
                self._learn(pos)
            data_start, data_end = self._data
            if data_start <= pos < data_end:
                stop = min(end, data_end)
                yield pos, stop - pos, True
            else:
                stop = min(end, self._hole[1])
                yield pos, stop - pos, False
            pos = stop

    def _learn(self, pos: int) -> None:
        try:
            data = seek(self.fd, pos, os.SEEK_DATA, hold=self.hold)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                self._hole = (pos, 1 << 63)
                return
            if exc.errno in UNSUPPORTED_ERRNOS:  # the file system cannot tell: all data
                self._data = (pos, 1 << 63)
                return
            raise
        if data > pos:
            self._hole = (pos, data)
            return
        self._data = (data, seek(self.fd, data, os.SEEK_HOLE, hold=self.hold))
