"""A batch's undo captured while the batch streams in, not when the applier gets to it.

Before a batch touches the replica image, the applier saves what the image holds in every range
the batch writes (decision 011). On a replica whose old bytes are on the disk rather than in
memory, reading them at apply time was the largest part of applying a batch of 5,000 random
4 KiB extents, and the whole of its tail (100-225 ms of the ~0.35 s from cut to applied,
issue 10). The ingest learns the ranges part by part as it verifies the upload. When the batch
is the next to apply and nothing waits before it, nothing writes the image until that batch's
own apply (see :meth:`broker.apply.ReplicaEngine.start_ahead`), so its undo can be read then,
next to the upload, and the applier only has to check it and seal it.

The applier takes such a capture only if it was made for the same batch on the same state and
covered exactly the batch's ranges without an error; otherwise it drops it and captures as
before. Until then the file is a ``.tmp``, which a start never takes for a capture
(:meth:`broker.points.PointsIndex.load` removes them). Its bytes count against the disk's
bound from the first one written: each part reserves its room before it is read (dropping the
oldest points as an apply would), and the applier takes that room over.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Protocol

from broker.points import PointsIndex
from broker.pools import APPLY, submit_in
from broker.undo import (
    AllocationCursor,
    Key,
    SegmentWriter,
    StateInfo,
    save_old_bytes,
    segment_meta,
    undo_size_bound,
)
from common.hrl import BatchHeader

Ranges = list[tuple[int, int]]


class AheadCapture:
    """The undo of batch ``top`` on state ``base``, written while the batch is uploaded.

    :meth:`add` is called from the upload's worker, :meth:`seal` and :meth:`discard` from the
    applier or whoever drops it; the reads run on a worker of their own, one part after another.
    """

    def __init__(self, points: PointsIndex, bound: int, image_fd: int, base: Key, top: Key) -> None:
        self.base = base
        self.top = top
        self.reserved = 0
        """Room taken in ``points`` for what was read: the applier takes it over, whoever drops
        the capture otherwise gives it back."""
        self._points = points
        self._bound = bound
        self._writer = SegmentWriter(points.dir, top, top)
        self._cursor = AllocationCursor(image_fd)
        self._lock = threading.Lock()
        self._queue: deque[Ranges] = deque()
        self._idle = threading.Event()
        self._idle.set()
        self._ranges: Ranges = []  # captured so far, in the batch's order
        self._error: BaseException | None = None
        self._ended = False

    def add(self, ranges: Ranges) -> bool:
        """Capture ``ranges``, the batch's next ones; False once the capture has ended."""
        with self._lock:
            if self._ended:
                return False
            self._queue.append(list(ranges))
            if not self._idle.is_set():
                return True  # the running worker takes them
            self._idle.clear()
        try:
            submit_in(APPLY, self._drain)
        except RuntimeError as exc:  # the pool is shut down: the process is ending
            with self._lock:
                self._error = exc
                self._idle.set()
        return True

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._ended or self._error is not None or not self._queue:
                    self._queue.clear()
                    self._idle.set()
                    return
                ranges = self._queue.popleft()
            try:
                needed = undo_size_bound(ranges)
                over = self._points.reserve(needed, self._bound)
                self.reserved += needed
                if over:
                    raise OverflowError("its undo does not fit within the disk's bound")
                save_old_bytes(self._writer, self._cursor, ranges)
                # The seal's fsync then finds most of the file on its way to the disk already.
                self._writer.start_writeback()
                self._ranges.extend(ranges)
            except BaseException as exc:
                with self._lock:
                    self._error = exc

    def _end(self, *, complete: bool) -> None:
        """Nothing is added from now on; wait for the worker, after it read every range added
        so far if ``complete``, else after the part it is reading."""
        while True:
            if complete:
                self._idle.wait()
            with self._lock:
                if not complete or self._idle.is_set():
                    self._ended = True
                    break
        self._idle.wait()

    def unusable(self, base: StateInfo, top: StateInfo, ranges: Ranges) -> str | None:
        """Why this capture is not the undo of ``top`` on ``base`` for ``ranges`` (after its
        reads ended); None when it is."""
        self._end(complete=True)
        if self._error is not None:
            return f"capturing ahead failed: {self._error}"
        if (base.key, top.key) != (self.base, self.top):
            return f"made for batch {self.top} on {self.base}, applying {top.key} on {base.key}"
        if self._ranges != ranges:
            return "it covers other ranges than the batch's journal file"
        return None

    def seal(self, base: StateInfo, top: StateInfo) -> Path:
        """Complete the segment file and fsync it (after :meth:`unusable` said None)."""
        try:
            return self._writer.finish(segment_meta(top.key, base, top))
        except BaseException:
            self._writer.abort()
            raise

    def discard(self) -> None:
        """Stop reading and remove the file (its room stays :attr:`reserved`)."""
        self._end(complete=False)
        self._writer.abort()


class AheadEngine(Protocol):
    """What an upload needs of its replica's applier to capture ahead."""

    def start_ahead(self, header: BatchHeader) -> AheadCapture | None:
        """A capture for ``header``'s batch if the image cannot change before its apply."""
        ...

    def drop_ahead(self, capture: AheadCapture) -> None:
        """Forget and discard ``capture`` (the upload failed)."""
        ...

    def prefetch(self, ranges: Ranges) -> None:
        """Ask the disk to read ``ranges`` of the image ahead of the apply's capture."""
        ...


class UploadUndo:
    """One upload's reports of the ranges it journals, turned into an ahead capture when the
    applier allows one, else into read-ahead for the capture at apply time."""

    def __init__(self, engine: AheadEngine) -> None:
        self._engine = engine
        self._asked = False
        self._capture: AheadCapture | None = None

    def __call__(self, header: BatchHeader, ranges: Ranges) -> None:
        if not self._asked:
            self._asked = True
            self._capture = self._engine.start_ahead(header)
        if self._capture is None or not self._capture.add(ranges):
            self._engine.prefetch(ranges)

    def drop(self) -> None:
        """The upload failed: its capture goes (a retry starts another)."""
        if self._capture is not None:
            self._engine.drop_ahead(self._capture)
            self._capture = None


__all__ = ["AheadCapture", "AheadEngine", "UploadUndo"]
