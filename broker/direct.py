"""Direct apply: a FULL batch written straight into the image as it streams in (decision 013).

Used by :class:`broker.journal.BatchReceiver` during initial sync, when no recovery point needs
an undo; everything else goes through the journal and :class:`broker.apply.ReplicaEngine`.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from broker.applied import applied_record
from broker.unbuffered import UnbufferedWriter
from common.hrl import BatchHeader, Extent

if TYPE_CHECKING:
    from broker.apply import ReplicaEngine


class DirectApply:
    """Apply a FULL batch straight into the image as it streams in (decision 013).

    Only while the replica has no recovery point to protect (initial sync, nothing listed) and
    nothing is waiting in the journal: then no undo is needed, and an interrupted batch is simply
    sent again by the agent (it was never acked) and overwrites what it left. Saves writing the
    batch to the journal and decoding it twice. The commit is the same audit line as for a
    journaled batch, followed by one meta write making it durable and applied together.
    """

    def __init__(self, engine: ReplicaEngine) -> None:
        self.engine = engine
        self._held = False
        self._epoch = 0
        self._section = contextlib.ExitStack()
        self._writer: UnbufferedWriter | None = None

    def begin(self, header: BatchHeader) -> bool:
        """Take the batch if the replica is in initial sync with no listed point."""
        e = self.engine
        if e.backlog() or e.state().listed or e.points.points(e.state()):
            return False
        if not e.apply_lock.acquire(blocking=False):
            return False
        try:
            self._epoch = e.epoch()
            # The image is written as the batch streams in: one write section until release.
            self._section.enter_context(e.store.writing(e.replica, self._epoch))
            e.points.drop_all()  # only hidden (mid-copy) states: nothing listed to keep
        except BaseException:
            self._section.close()
            e.apply_lock.release()
            raise
        self._writer = UnbufferedWriter(e.image_fd)
        self._held = True
        return True

    def extent(self, ext: Extent) -> None:
        """Write one extent past the page cache where it can (DATA read back against its
        checksum)."""
        self.engine.write_extent(ext, ext_seq=None, unbuffered=self._writer)

    def commit(self, header: BatchHeader) -> None:
        """fdatasync, audit line, then durable and applied in one meta write."""
        e = self.engine
        r = e.replica
        try:
            os.fdatasync(e.image_fd)
            e.store.check_epoch(self._epoch, r)
            r.append_applied(applied_record(header, self._epoch))
            r.update_meta(
                durable_seq=header.seq,
                durable_cut_ns=header.cut_time_ns,
                durable_cut_id=header.cut_id,
                applied_generation=header.generation,
                applied_seq=header.seq,
                applied_cut_ns=header.cut_time_ns,
                applied_cut_id=header.cut_id,
                applied_first_change_cut=header.first_change_cut,
                applied_consistency=int(header.consistency),
                applied_full=True,
                initial_sync="in_progress",
            )
            self.engine.log.info(
                "batch_applied",
                seq=header.seq,
                generation=header.generation,
                epoch=self._epoch,
                direct=True,
                unbuffered_bytes=self._writer.written if self._writer is not None else 0,
            )
        finally:
            self.release()

    def release(self) -> None:
        """Let the applier run again."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._held:
            self._held = False
            self._section.close()
            self.engine.apply_lock.release()
