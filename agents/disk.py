"""A protected disk: the image served as an NBD export, with change tracking and cuts.

:class:`TrackedExport` is a :class:`common.nbd.backend.Export` that wraps a
:class:`~common.nbd.backend.FileExport`. Each mutating request, on the event-loop thread:

1. if a cut is being read, copies aside the cut-time contents of the frozen blocks it is about to
   change (:meth:`agents.cut.Cut.preserve`);
2. marks its blocks in the dirty map, which persists a newly dirtied region's mark *before*
3. the data reaches the image.

``flush`` (in the server's worker thread) makes the map durable before the image, so a flushed
write is never durable without its mark.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agents.cut import CowStore, Cut
from agents.dirtymap import DATA, TRIM, ZERO, BlockMap, DirtyMap, Recovery
from agents.errors import TrackingError
from common.fsio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    UNSUPPORTED_ERRNOS,
    fallocate,
    random_access,
)
from common.nbd.backend import ExportBase, FileExport, pread_or_eio
from common.nbd.constants import Errno
from common.nbd.errors import ExportError

IN_USE_FIX = (
    "stop the other user; VMs must attach through the agent's NBD export: "
    "`replikant agent attach-args VM`"
)


COW_MEMORY_LIMIT: Final = 64 * 1024 * 1024
"""Copy-on-write copies one cut keeps in memory before it spills to a file (per disk)."""


class Flock(ctypes.Structure):
    """Linux ``struct flock`` (glibc, 64-bit ``off_t``): ctypes inserts the padding the C
    compiler does (after ``l_whence`` and after ``l_pid``), so the layout is the platform's."""

    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    )


def _whole_file(cmd: int, fd: int, kind: int) -> Flock:
    arg = Flock(l_type=kind, l_whence=os.SEEK_SET, l_start=0, l_len=0, l_pid=0)
    return Flock.from_buffer_copy(fcntl.fcntl(fd, cmd, bytes(arg)))


def in_use_message(image: Path) -> str:
    """What the operator reads when another process holds ``image``."""
    return (
        f"image {image} is in use by another process (another replikant agent, or a VM or qemu "
        "tool that opened it directly)"
    )


def lock_image(fd: int, image: Path) -> None:
    """Take an exclusive open-file-description lock on the whole image, or raise.

    OFD locks belong to this descriptor, so closing another descriptor of the file in this
    process does not drop them (POSIX ``lockf`` locks would be), and they conflict with QEMU's
    image locking (OFD byte locks too): a second agent, a VM or ``qemu-img``/``qemu-io`` opening
    the image for writing is refused, so nothing can write past the dirty map. Plain reads that
    take no lock (``qemu-img info -U``, ``cat``) still work. Released when ``fd`` is closed.
    """
    try:
        _whole_file(fcntl.F_OFD_SETLK, fd, fcntl.F_WRLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise TrackingError(in_use_message(image), fix=IN_USE_FIX) from None
        raise TrackingError(f"cannot lock image {image}: {exc.strerror}") from None


def image_in_use(image: Path) -> bool:
    """Whether another open file description holds a lock that :func:`lock_image` would meet."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held: int = _whole_file(fcntl.F_OFD_GETLK, fd, fcntl.F_WRLCK).l_type
        return held != fcntl.F_UNLCK
    finally:
        os.close(fd)


def replication_descriptor(fd: int) -> int:
    """A read-only open file description of the image behind ``fd`` of its own, marked for
    random access: what replication reads the image through (the shipping process, resync).

    Its reads then fill the page cache with single pages. Read through the guest's descriptor,
    a whole-disk read (the initial copy, a resync) leaves large folios behind on filesystems
    that use them (ext4 on Linux 6.16 and later), and every later 4 KiB guest write into one
    costs ~25 us of kernel time instead of ~3 (bench.md). Random access on a descriptor of
    its own also leaves the guest's read-ahead alone. Without ``/proc`` it is a duplicate.
    """
    try:
        ours = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)
    random_access(ours)
    return ours


class TrackedExport(ExportBase):
    """An NBD export of a disk image whose every change is tracked for replication."""

    read_only = False
    can_flush = True
    can_trim = True
    can_write_zeroes = True
    can_fast_zero = False
    can_multi_conn = True  # one descriptor, one map: a flush covers every connection
    can_cache = True

    def __init__(
        self,
        image: Path,
        name: str,
        *,
        block_size: int = 65536,
        map_path: Path | None = None,
        cow_memory_limit: int = COW_MEMORY_LIMIT,
        spill_path: Path | None = None,
        description: str = "",
        sync_marks: bool = False,
    ) -> None:
        self.inner = FileExport(image, name, description=description)
        try:
            lock_image(self.inner.fd, image)
        except TrackingError:
            self.inner.close()
            raise
        self.bulk_fd = replication_descriptor(self.inner.fd)
        self.name = name
        self.size = self.inner.size
        self.description = description
        self.image = image
        self.block_size = block_size
        try:
            self.map = DirtyMap(self.size, block_size, map_path, image=image, sync_marks=sync_marks)
        except TrackingError:
            os.close(self.bulk_fd)
            self.inner.close()
            raise
        self.cow_memory_limit = cow_memory_limit
        self.spill_path = spill_path
        self.cut: Cut | None = None
        self.snapshots: list[Cut] = []  # whole-disk point-in-time views (verify)
        self.clients = 0
        self._trim_punches = True
        # Why writes are refused (the VM is fenced or being failed over), or None: reads go on.
        self.fenced: str | None = None

    def _check_writable(self) -> None:
        if self.fenced is not None:
            # EPERM: the client's error says the write was not allowed; the server's log line
            # (nbd_backend_error) carries this message, with what to run.
            raise ExportError(Errno.EPERM, f"export {self.name} refuses writes: {self.fenced}")

    def open(self) -> Recovery:
        """Open the persisted map and load what it recorded (call before serving)."""
        return self.map.open()

    def close(self, *, clean: bool = True) -> None:
        """Flush the image, persist the map (exactly, when ``clean``) and close both."""
        if self.cut is not None:
            self.end_cut(acked=False)
        for snap in list(self.snapshots):
            self.end_snapshot(snap)
        if clean:
            self.inner.flush()
        self.map.close(clean=clean)
        if self.bulk_fd >= 0:
            os.close(self.bulk_fd)
            self.bulk_fd = -1
        self.inner.close()

    # -- the Export interface --------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read through to the image."""
        return self.inner.read(offset, length)

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        """Read through to the image if its page cache holds the range (else None: the NBD
        server reads in a thread, so a guest's cold reads wait for the disk side by side)."""
        return self.inner.read_cached(offset, length)

    def bulk_read(self, offset: int, length: int) -> bytes:
        """Read the image for replication (cuts, snapshots, copy-on-write), through
        :attr:`bulk_fd`, not the guest's descriptor: see :func:`replication_descriptor`."""
        return pread_or_eio(self.bulk_fd, offset, length)

    def _before(self, offset: int, length: int, kind: int) -> None:
        self._check_writable()
        if self.cut is not None:
            self.cut.preserve(offset, length)
        for snap in self.snapshots:
            snap.preserve(offset, length)
        self.map.mark(offset, length, kind)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Copy-on-write, mark, then write through."""
        self._before(offset, len(data), DATA)
        self.inner.write(offset, data, fua)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Punch a hole; the blocks ship as TRIM only if the hole really was punched."""
        if not length:
            return
        if not self._trim_punches:
            self._check_writable()
            return  # trim is a hint and the contents stay as they were: nothing changed
        self._before(offset, length, TRIM)
        try:
            fallocate(self.inner.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            # The old data may still be there: it must ship as data, not as a trim.
            self.map.mark(offset, length, DATA)
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            self._trim_punches = False

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        """Mark the covered blocks ZERO (shipped without payload), then zero through."""
        self._before(offset, length, ZERO)
        self.inner.write_zeroes(offset, length, may_trim, fua)

    def flush(self) -> None:
        """Make the map durable, then the image (worker thread)."""
        self.map.sync()
        self.inner.flush()

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """Allocation as the image's file system reports it."""
        return self.inner.block_status(offset, length)

    def cache(self, offset: int, length: int) -> None:
        """Read-ahead hint."""
        self.inner.cache(offset, length)

    def client_opened(self, peer: str) -> None:
        """Count connected clients (for status)."""
        self.clients += 1

    def client_closed(self, peer: str) -> None:
        """Count connected clients (for status)."""
        self.clients = max(self.clients - 1, 0)

    # -- cuts --------------------------------------------------------------------------------

    def begin_cut(self, cut_time_ns: int | None = None, cut_id: int = 0) -> Cut:
        """Freeze the changes so far into a new cut. Synchronous: call it between requests.

        ``cut_id`` is the id of the VM-wide cut this is part of (:class:`agents.state.CutClock`).
        """
        if self.cut is not None:
            raise TrackingError(f"export {self.name} already has a cut being shipped")
        frozen = self.map.swap()
        self.cut = Cut(
            frozen,
            size=self.size,
            block_size=self.block_size,
            reader=self.bulk_read,
            cow=CowStore(self.block_size, self.cow_memory_limit, self.spill_path),
            cut_time_ns=time.time_ns() if cut_time_ns is None else cut_time_ns,
            cut_id=cut_id,
            image_fd=self.bulk_fd,
        )
        return self.cut

    def end_cut(self, *, acked: bool, merge: BlockMap | None = None) -> int:
        """Finish the current cut: settle its regions after an ack, or merge it back.

        ``merge``, when given, is what goes back instead of the frozen map (a seed export froze
        the whole disk but only its dirty blocks were pending before the cut). Returns the
        regions cleared from the persisted map (0 when merged back).
        """
        cut = self.cut
        if cut is None:
            return 0
        self.cut = None
        cut.close()
        cleared = 0
        if acked:
            cleared = self.map.settle()
        else:
            self.map.merge_back(cut.frozen if merge is None else merge)
        self._retire_later(cut.frozen)
        return cleared

    def _retire_later(self, frozen: BlockMap) -> None:
        """Make the next cut's map, then release the finished cut's, each part in a loop step
        of its own (guest requests get their turns between them): neither the end of a cut nor
        the next one waits for a mapping to be made (~85 us beside the process's other threads)
        or unmapped (up to ~1 ms for a 100 GiB disk's map after scattered writes, in two
        pieces). At once when no loop runs."""
        steps = (self.map.make_spare, *frozen.release_steps())  # first: mapping waits for unmapping
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            for step in steps:
                step()
            return
        pending = iter(steps)

        def run_next() -> None:
            step = next(pending, None)
            if step is not None:
                step()
                loop.call_soon(run_next)  # scheduled from a callback: the next iteration

        loop.call_soon(run_next)

    def begin_snapshot(self, cut_time_ns: int) -> Cut:
        """A point-in-time view of the whole disk (every block frozen, copy-on-write kept).

        Synchronous: call it in the same loop step as the cut it must match. Reading it with
        :meth:`agents.cut.Cut.read` releases the copies as it goes.
        """
        frozen = self.map.new_map()
        frozen.set_range(0, self.map.nblocks, DATA)
        snap = Cut(
            frozen,
            size=self.size,
            block_size=self.block_size,
            reader=self.bulk_read,
            cow=CowStore(
                self.block_size,
                self.cow_memory_limit,
                None if self.spill_path is None else self.spill_path.with_suffix(".snapcow"),
            ),
            cut_time_ns=cut_time_ns,
        )
        self.snapshots.append(snap)
        return snap

    def end_snapshot(self, snap: Cut) -> None:
        """Release a snapshot and its copies."""
        if snap in self.snapshots:
            self.snapshots.remove(snap)
        snap.close()
        snap.frozen.close()

    @property
    def fd(self) -> int:
        """The image's descriptor (for SEEK_DATA planning)."""
        return self.inner.fd
