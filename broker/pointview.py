"""Reading a disk as of a recovery point: the replica image with undo data laid over it.

A :class:`PointView` serves every range that changed since its point from undo data and the
rest straight from the replica, without copying the disk. ``broker/points.py:PointsIndex`` opens
views, pins their points and tells them of every batch's undo before the image changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from broker.undo import KIND_DATA, Entry, Key, RWLock, UndoSegment, _overlapping, overlay_merge
from common.fsio import PageCacheReads, pread_exact, pread_into, prefetch


class ViewIndex(Protocol):
    """What a view uses of the index that opened it."""

    rw: RWLock
    """Views read under its read side; the applier publishes under its write side."""

    def unpin(self, view: PointView) -> None:
        """The view closed."""


class PointView:
    """The disk as of one point, read without copying it: image + overlay of undo data.

    Reads are thread-safe and run concurrently with the applier; the view follows new batches
    on its own (see ``broker/points.py:PointsIndex.publish``). Close it to unpin the point.
    """

    def __init__(
        self, index: ViewIndex, key: Key, entries: list[Entry], segments: list[UndoSegment]
    ) -> None:
        self._index = index
        self.key = key
        self._entries = entries
        # The segments the entries may name: held here, so that a retired segment's file stays
        # until the last view reading it closes.
        self._sources = {seg.sid: seg for seg in segments}
        self._image_fd: int | None = None
        self.closed = False

    def attach_image(self, fd: int) -> None:
        """The replica image descriptor to read unsaved ranges from (owned by the caller)."""
        self._image_fd = fd

    def add_newer(self, seg: UndoSegment) -> None:
        """A batch's undo, published under the index's write lock before the image is written
        for it. The merge is linear: the two-pointer walk plus a sort of an almost sorted list."""
        newer = seg.entries
        if newer:
            self._sources[seg.sid] = seg
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
            if next(_overlapping(self._entries, offset, end), None) is None:
                # The common case (recent points, unchanged ranges): one copy, straight from
                # the page cache.
                return pread_exact(self._image_fd, length, offset)
            out = bytearray(length)
            view = memoryview(out)
            for source, start, stop, at in self._pieces(offset, end):
                piece = view[start - offset : stop - offset]
                if source is None:
                    pread_into(self._image_fd, piece, at)
                else:
                    piece[:] = source.pread(stop - start, at)
            return out
        finally:
            self._index.rw.release_read()

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[UndoSegment | None, int, int, int]]:
        """``(source, start, stop, offset in source)`` for each part of ``[offset, end)`` that a
        read takes from a file: the replica image (source None) or an undo segment. Ranges saved
        as zero take nothing from either. Call under the index's read lock."""
        pos = offset
        for start, stop, sid, src_off, kind in _overlapping(self._entries, offset, end):
            s = max(start, offset)
            e = min(stop, end)
            if s > pos:
                yield None, pos, s, pos
            if kind == KIND_DATA and sid:
                yield self._sources[sid], s, e, src_off + (s - start)
            pos = e
        if pos < end:
            yield None, pos, end, pos

    def read_cached(self, offset: int, length: int, pages: PageCacheReads) -> bytearray | None:
        """:meth:`read`'s bytes when no undo data covers the range and the replica's page cache
        holds all of it; None otherwise (reading would compose, or wait for the disk)."""
        if self.closed or self._image_fd is None:
            return None
        self._index.rw.acquire_read()
        try:
            if next(_overlapping(self._entries, offset, offset + length), None) is not None:
                return None
            return pages.pread(self._image_fd, length, offset)
        finally:
            self._index.rw.release_read()

    def prefetch(self, offset: int, length: int) -> None:
        """Have the bytes a :meth:`read` of the range takes read into memory soon, without
        waiting (a hint): from the replica where it holds the point's bytes, from undo data
        where that does."""
        if self.closed or self._image_fd is None:
            return
        self._index.rw.acquire_read()
        try:
            for source, start, stop, at in self._pieces(offset, offset + length):
                if source is None:
                    prefetch(self._image_fd, at, stop - start)
                else:
                    source.prefetch(stop - start, at)
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
            self._sources = {}
            self._index.unpin(self)

    def __enter__(self) -> PointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
