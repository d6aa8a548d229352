"""Point-in-time NBD exports: "disk as of point P", writable through a private overlay.

A test failover boots a VM from a recovery point. The VM writes; those writes must never reach
the replica or its undo data, and must vanish when the test ends. :class:`PointInTimeExport`
serves a :class:`~broker.pointview.PointView` (copy-free reads of the point) with a sparse overlay
file and an in-memory bitmap of 64 KiB clusters: a written cluster is read from the overlay,
every other cluster from the view. Partial cluster writes copy the cluster from the view first
(copy-on-write). Closing the export deletes the overlay file.

Reads of the replica that its page cache holds are answered on the broker's loop; the rest
(cold data, undo data, the overlay) go to the NBD server's read threads, so a restore or a
booting test VM waits for the disk with many requests at once. The replica's descriptor reads
nothing ahead (``broker/apply.py``); the export reads ahead itself for a reader in order
(:mod:`common.readahead`), into single pages.

Block status reports what reads as zero at the point (``broker/zeros.py``) as holes, except
where the reader wrote: a restore with nbdcopy or ``qemu-img convert`` of a sparse disk then
reads and writes only what the disk holds, as it would from qemu-nbd serving a sparse image.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final

from broker.pointview import PointView
from broker.zeros import known_zero_ranges
from common.errors import ConfigError
from common.fsio import PageCacheReads, pread_exact, prefetch, punch_hole, pwrite_all
from common.logs import get_logger
from common.nbd.backend import ExportBase
from common.nbd.constants import STATE_HOLE, STATE_ZERO
from common.readahead import ReadAhead
from common.regions import Region, subtract

_log = get_logger("broker.pitexport")

CLUSTER: Final = 64 * 1024
STATUS_SPAN: Final = 32 * 1024 * 1024
"""At most this much is described per block-status request (the client asks again for the
rest). Each answer walks the image's holes and the point's undo entries in its range on the
broker's loop, as a READ runs there: no more than the largest READ may ask for."""
MAX_EXTENTS: Final = 1024

Guard = Callable[[], AbstractContextManager[None]]
"""Entered around each request that may read the replica: raises to refuse it, while the broker
may no longer vouch for the point (``broker/exports.py:StepDownGuard``)."""


class Overlay:
    """A private copy-on-write layer over a read-only base (any ``read(offset, length)``)."""

    def __init__(self, path: Path, size: int, cluster: int = CLUSTER) -> None:
        self.path = path
        self.size = size
        self.cluster = cluster
        self._nclusters = (size + cluster - 1) // cluster
        self.bitmap = bytearray((self._nclusters + 7) // 8)
        self._written = False  # any cluster set
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, size)

    def _is_set(self, c: int) -> bool:
        return bool(self.bitmap[c >> 3] & (1 << (c & 7)))

    def _set(self, c: int) -> None:
        self.bitmap[c >> 3] |= 1 << (c & 7)
        self._written = True

    def _any_set(self, first: int, last: int) -> bool:
        if not self._written:  # the common case, a reader that only reads: every READ asks
            return False
        # Whole bytes compared in C; only the two edge bytes are checked bit by bit.
        lo, hi = first >> 3, last >> 3
        if hi - lo > 1 and any(self.bitmap[lo + 1 : hi]):
            return True
        return any(self._is_set(c) for c in range(first, min(last + 1, (lo + 1) * 8))) or any(
            self._is_set(c) for c in range(max(first, hi * 8), last + 1)
        )

    def written(self, offset: int, length: int) -> list[Region]:
        """The regions of ``[offset, offset+length)`` in clusters the reader wrote."""
        cl = self.cluster
        first, last = offset // cl, (offset + length - 1) // cl
        if length <= 0 or not self._any_set(first, last):
            return []
        out: list[Region] = []
        for c in range(first, last + 1):
            if self._is_set(c):
                if out and out[-1][0] + out[-1][1] == c * cl:
                    out[-1] = (out[-1][0], out[-1][1] + cl)
                else:
                    out.append((c * cl, cl))
        return out

    def read(self, base: PointView, offset: int, length: int) -> bytes | bytearray:
        """Bytes at ``offset``: overlay clusters from the overlay file, the rest from ``base``."""
        if length == 0:
            return b""
        cl = self.cluster
        first, last = offset // cl, (offset + length - 1) // cl
        if not self._any_set(first, last):
            return base.read(offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        c = first
        while c <= last:
            mine = self._is_set(c)
            run_end = c
            while run_end + 1 <= last and self._is_set(run_end + 1) == mine:
                run_end += 1
            stop = min(end, (run_end + 1) * cl)
            if mine:
                out += pread_exact(self._fd, stop - pos, pos)
            else:
                out += base.read(pos, stop - pos)
            pos = stop
            c = run_end + 1
        return out

    def write(self, base: PointView, offset: int, data: bytes | memoryview) -> None:
        """Write into the overlay, copying partial clusters from ``base`` first."""
        cl = self.cluster
        end = offset + len(data)
        first, last = offset // cl, (end - 1) // cl
        for c in {first, last}:
            c_start = c * cl
            c_end = min(c_start + cl, self.size)
            partial = offset > c_start or end < c_end
            if partial and not self._is_set(c):
                pwrite_all(self._fd, base.read(c_start, c_end - c_start), c_start)
                self._set(c)
        pwrite_all(self._fd, data, offset)
        for c in range(first, last + 1):
            self._set(c)

    def zero(self, base: PointView, offset: int, length: int) -> None:
        """Make a range read as zeroes (holes in the overlay where whole clusters are covered)."""
        cl = self.cluster
        end = offset + length
        inner_start = -(-offset // cl) * cl
        inner_end = end // cl * cl
        if inner_start >= inner_end:
            self.write(base, offset, bytes(length))
            return
        if offset < inner_start:
            self.write(base, offset, bytes(inner_start - offset))
        punch_hole(self._fd, inner_start, inner_end - inner_start)
        for c in range(inner_start // cl, inner_end // cl):
            self._set(c)
        if inner_end < end:
            self.write(base, inner_end, bytes(end - inner_end))

    def flush(self) -> None:
        """fdatasync the overlay (what a guest's flush asks for)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close and delete the overlay file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


class PointInTimeExport(ExportBase):
    """An NBD export of one disk as of one recovery point, with a private writable overlay.

    The replica image and its undo data are only ever read. :meth:`close` deletes the overlay
    and unpins the point.
    """

    can_flush = True
    can_trim = True
    can_write_zeroes = True
    can_multi_conn = True  # one overlay descriptor: a flush covers every connection's writes

    def __init__(
        self,
        name: str,
        view: PointView,
        size: int,
        overlay_path: Path,
        *,
        read_only: bool = False,
        description: str = "",
        guard: Guard = contextlib.nullcontext,
        image_fd: int | None = None,
    ) -> None:
        """``image_fd``: the replica image's descriptor, whose holes block status reports (all
        data is reported without it)."""
        self.name = name
        self._image_fd = image_fd
        self._ahead = ReadAhead()  # called on the loop thread only (read_cached)
        self._cache = PageCacheReads()
        self.guard = guard
        self.size = size
        self.read_only = read_only
        self.description = description
        self.view = view
        self.overlay = Overlay(overlay_path, size)
        self.clients = 0

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The point's bytes, or what the reader wrote over them."""
        with self.guard():
            return self.overlay.read(self.view, offset, length)

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        """The point's bytes when they are the replica's (no undo data, nothing the reader
        wrote) and its page cache holds them; else None, and the NBD server runs :meth:`read` in
        a thread. Every READ passes here first, on the loop: this is where reading ahead is
        decided."""
        fd = self._image_fd
        if fd is None:
            return self.read(offset, length)
        if ahead := self._ahead.before(offset, length):
            prefetch(fd, *ahead)
        if self.overlay.written(offset, length):
            return None
        with self.guard():
            got = self.view.read_cached(offset, length, self._cache)
        return self.read(offset, length) if got is None and not self._cache.supported else got

    def cache(self, offset: int, length: int) -> None:
        """Prefetch what a read of the range takes, from the replica and from undo data: the
        NBD server is about to read it with others, which the disks then read side by side."""
        if self._image_fd is not None:
            self.view.prefetch(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Copy-on-write into the overlay; the replica is never touched."""
        with self.guard():  # a partial cluster is read from the point first
            self.overlay.write(self.view, offset, data)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discarded ranges read as zeroes from now on."""
        with self.guard():
            self.overlay.zero(self.view, offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        """Zero a range in the overlay."""
        with self.guard():
            self.overlay.zero(self.view, offset, length)

    def flush(self) -> None:
        """Make overlay writes durable (for the life of the export)."""
        self.overlay.flush()

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """What reads as zero at the point, as holes; the rest, and what the reader wrote, as
        data. Describes at most :data:`STATUS_SPAN` bytes and :data:`MAX_EXTENTS` extents."""
        length = min(length, STATUS_SPAN)
        if self._image_fd is None:
            return [(length, 0)]
        with self.guard():
            zeros = known_zero_ranges(self.view, self._image_fd, offset, length)
        return allocation_extents(
            offset,
            length,
            subtract([(s, e - s) for s, e in zeros], self.overlay.written(offset, length)),
        )

    def client_opened(self, peer: str) -> None:
        """Count clients (status shows whether a test VM is attached)."""
        self.clients += 1

    def client_closed(self, peer: str) -> None:
        """Count clients."""
        self.clients -= 1

    def close(self) -> None:
        """Delete the overlay and unpin the point (after the server stopped serving us)."""
        self.overlay.close()
        self.view.close()
        _log.info("pit_export_closed", export=self.name)


def allocation_extents(offset: int, length: int, zeros: Sequence[Region]) -> list[tuple[int, int]]:
    """``(length, flags)`` extents of ``[offset, offset+length)`` for NBD's ``base:allocation``:
    ``zeros`` (sorted, merged, inside the range) as holes that read as zero, the rest as data.
    At most :data:`MAX_EXTENTS`: the last one ends where the client asks again."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    for start, n in zeros:
        if start > pos:
            out.append((start - pos, 0))
        out.append((n, STATE_HOLE | STATE_ZERO))
        pos = start + n
        if len(out) >= MAX_EXTENTS:
            return out[:MAX_EXTENTS]
    if pos < end:
        out.append((end - pos, 0))
    return out


def prepare_socket_dir(directory: Path, group: str | None) -> int:
    """Make the NBD socket's ``directory`` ours, 0750, group ``group`` (``nbd_socket_group``;
    default: our own group); returns that group id. Who may open point-in-time exports is decided
    here: the broker's user and that group (the socket is 0660), nobody else."""
    try:
        gid = grp.getgrnam(group).gr_gid if group else os.getegid()
    except KeyError:
        raise ConfigError(
            f"nbd_socket_group {group!r} is not a group on this host",
            fix="create the group or change nbd_socket_group in broker.toml",
        ) from None
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        # Someone else made it (e.g. under /tmp): they could swap the socket for theirs.
        raise ConfigError(
            f"NBD socket directory {directory} is not a directory owned by this broker's "
            f"user (uid {os.geteuid()})",
            fix="remove it, or set nbd_socket_dir in broker.toml to a directory the broker owns",
        )
    # chown only when needed: the unit's system-call filter (~@privileged) refuses chown
    # outright, and a directory we just made already carries our own group.
    if st.st_gid != gid:
        try:
            os.chown(directory, -1, gid, follow_symlinks=False)
        except PermissionError:
            name = group or _group_name(gid)
            raise ConfigError(
                f"the broker's user may not give {directory} to group {name!r}",
                fix=f"add the broker's user to group {name!r}, or change nbd_socket_group",
            ) from None
    # The group's way in: read and search, never write (it cannot plant a socket of its own).
    os.chmod(directory, 0o750)  # noqa: S103
    return gid


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def socket_path(path: Path) -> Path:
    """``path``, or a short stand-in when it exceeds the 107-byte limit of unix socket names."""
    if len(os.fsencode(path)) <= 100:
        return path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"replikant-{digest}" / path.name
    _log.warning("nbd_socket_path_shortened", wanted=str(path), using=str(short))
    return short
