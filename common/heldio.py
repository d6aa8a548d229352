"""Reads, writes and seeks of the page cache made without letting go of the GIL.

A Python thread lets go of the GIL for every system call. When other threads are waiting for it,
one of them takes it, and the thread that made the call waits, after its few microseconds in the
kernel, until that one lets go in turn. With 100 replicas applying at once, each 4 KiB ``pwrite``
and read-back of the broker's apply cost 8 ``futex`` calls and two context switches: a third of the
broker's CPU per batch (issue 10, ``bench/broker_extents.py``'s scale phase). The calls here go
through :class:`ctypes.PyDLL`, which keeps the GIL, and are used only where the kernel answers
from memory:

- :func:`read_into` asks with ``RWF_NOWAIT``, which the kernel refuses (``EAGAIN``) instead of
  waiting for the disk; then, and on a file system without it (``EOPNOTSUPP``: tmpfs), the read
  is an ordinary one;
- :func:`write_pages` writes whole, aligned pages only (no page is read first). A buffered write
  can still wait (dirty-page throttling, memory reclaim, a file system journal), and no flag
  refuses that in advance (``RWF_NOWAIT`` on buffered writes is ``EOPNOTSUPP`` on ext4), so a
  watch (:class:`HoldWatch`) stops holding for a while once a held call was slow: a store that
  stalls costs the other threads one stall, not one per write. Only a call that slept in the
  kernel counts (the thread's voluntary context switches tell): on a busy host a held call is
  often preempted, which stalls the other threads no more than being preempted in Python does.

Only on local file systems (:func:`may_hold`; callers ask once per descriptor).
:func:`seek` keeps it for ``lseek`` (``SEEK_DATA``/``SEEK_HOLE`` read the file system's block
map, cached but for a wait now and then, under the same watch). Any error of a held call is
left to the ordinary call, which raises it as ``os`` does (``ENXIO`` past the last data, too).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import time
from collections.abc import Callable
from typing import Final

from common.fsio import pread_exact, pwrite_all
from common.logs import get_logger

_log = get_logger("common.heldio")

PAGE: Final = mmap.PAGESIZE
SLOW_SECONDS: Final = 0.02
"""A held call that slept longer than this pauses holding: four of CPython's switch intervals,
so that a wait for the GIL just before or after the call (the window the clock sees) rarely
looks like a stall; the disk stalls worth avoiding (dirty-page throttling, a journal commit)
last longer."""
PAUSE_SECONDS: Final = (1.0, 60.0)
"""How long system calls let go of the GIL again after a slow held call: the first, and the
most after slow calls in a row (each pause doubles while they keep coming)."""


class HoldWatch:
    """Whether calls may keep the GIL now: not for a while after one slept in the kernel and took
    over ``slow`` seconds, longer each time it happens again soon. Plain logic on what it is
    given (the callers read the clock and the thread's sleeps).

    One wait for the disk now and then (a file system reading its block map) costs the other
    threads one stall and a second of ordinary calls; a store that stalls again and again is
    left to ordinary calls for up to a minute at a time."""

    def __init__(
        self, slow: float = SLOW_SECONDS, pauses: tuple[float, float] = PAUSE_SECONDS
    ) -> None:
        self.slow = slow
        self.shortest, self.longest = pauses
        self.pause = 0.0
        self._until = float("-inf")

    def allowed(self, now: float) -> bool:
        """May a call keep the GIL at ``now``?"""
        return now >= self._until

    def took(self, started: float, ended: float, *, slept: bool) -> bool:
        """Record a held call's duration and whether it slept; True if it starts a pause."""
        if not slept or ended - started <= self.slow:
            return False
        again = ended - self._until < self.longest
        self.pause = (
            min(max(self.pause * 2, self.shortest), self.longest) if again else self.shortest
        )
        self._until = ended + self.pause
        return True


WATCH: Final = HoldWatch()
"""The process's watch: a stalled store stalls every held call of the process alike."""


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


_Calls = tuple[Callable[..., int], Callable[..., int], Callable[..., int]]


def _bind() -> _Calls | tuple[None, None, None]:
    try:
        libc = ctypes.PyDLL(None)
        preadv2, pwrite = libc.preadv2, libc.pwrite
    except (OSError, AttributeError):
        return None, None, None
    off, size = ctypes.c_int64, ctypes.c_size_t
    lseek = libc.lseek
    lseek.argtypes = [ctypes.c_int, off, ctypes.c_int]
    lseek.restype = off
    preadv2.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int, off, ctypes.c_int]
    preadv2.restype = ctypes.c_ssize_t
    pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, size, off]
    pwrite.restype = ctypes.c_ssize_t
    typed: _Calls = (preadv2, pwrite, lseek)
    return typed


_preadv2, _pwrite, _lseek = _bind()
_RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0x8)

LOCAL_FILE_SYSTEMS: Final = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
    0xCA451A4E: "bcachefs",
    0x2FC12FC1: "zfs",
    0x01021994: "tmpfs",
}
"""``statfs`` magic numbers of the file systems whose calls are held: their data is on this
host's disks or in its memory."""


def _fstatfs_type(fd: int) -> int | None:
    try:
        fstatfs = ctypes.CDLL(None).fstatfs
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
    if fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type comes first


def may_hold(fd: int) -> bool:
    """Whether calls on ``fd`` may keep the GIL: its file system is a local one
    (:data:`LOCAL_FILE_SYSTEMS`). On NFS, SMB, Ceph or FUSE a call may wait for a server as long
    as that takes, and held it would stop every thread of the process meanwhile (a hung store
    would then also silence the broker's status and its MQTT keepalives): never held there."""
    return _fstatfs_type(fd) in LOCAL_FILE_SYSTEMS


def _sleeps() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _note_slow(started: float, sleeps: int, call: str) -> None:
    ended = time.perf_counter()
    if ended - started > WATCH.slow and WATCH.took(started, ended, slept=_sleeps() > sleeps):
        _log.info(
            "held_io_paused",
            call=call,
            ms=round((ended - started) * 1000, 1),
            pause_s=WATCH.pause,
            why="a call that kept the GIL waited in the kernel; calls let go of it for a while",
        )


def read_into(fd: int, buf: bytearray, length: int, offset: int, *, hold: bool) -> int:
    """Read up to ``length`` bytes at ``offset`` into the start of ``buf``; how many were read
    (fewer only at the end of the file). Kept under the GIL when the page cache has them and
    ``hold`` (:func:`may_hold` of ``fd``)."""
    if hold and _preadv2 is not None and length <= len(buf):
        now = time.perf_counter()
        if WATCH.allowed(now):
            iov = _Iovec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), length)
            sleeps = _sleeps()
            got = _preadv2(fd, ctypes.byref(iov), 1, offset, _RWF_NOWAIT)
            _note_slow(now, sleeps, "preadv2")
            if got >= 0:
                return got
    return os.preadv(fd, [memoryview(buf)[:length]], offset)


def read_exact(fd: int, length: int, offset: int, *, hold: bool) -> bytes:
    """Exactly ``length`` bytes at ``offset`` (past the end of the file: zeroes), as
    :func:`common.fsio.pread_exact`, kept under the GIL when the page cache has them all and
    ``hold``."""
    buf = bytearray(length)
    if read_into(fd, buf, length, offset, hold=hold) == length:
        return bytes(buf)
    return pread_exact(fd, length, offset)


def seek(fd: int, pos: int, how: int, *, hold: bool) -> int:
    """``os.lseek``, kept under the GIL if ``hold`` and the watch allows: for ``SEEK_DATA`` and
    ``SEEK_HOLE``, which a local file system answers from its cached block map (the undo capture
    of a sparse replica asks twice per range)."""
    if hold and _lseek is not None and WATCH.allowed(now := time.perf_counter()):
        sleeps = _sleeps()
        got = _lseek(fd, pos, how)
        _note_slow(now, sleeps, "lseek")
        if got >= 0:
            return got
    return os.lseek(fd, pos, how)


def write_pages(fd: int, data: bytes | bytearray | memoryview, offset: int, *, hold: bool) -> None:
    """Write all of ``data`` at ``offset``, as :func:`common.fsio.pwrite_all`; kept under the GIL
    if ``hold`` and it is ``bytes`` of whole pages at a page boundary (no page is read first) and
    the watch allows."""
    length = len(data)
    if (
        hold
        and _pwrite is not None
        and type(data) is bytes
        and not (offset | length) % PAGE
        and WATCH.allowed(now := time.perf_counter())
    ):
        sleeps = _sleeps()
        done = max(0, _pwrite(fd, data, length, offset))  # -1: the ordinary call raises
        _note_slow(now, sleeps, "pwrite")
        if done < length:
            pwrite_all(fd, memoryview(data)[done:], offset + done)
        return
    pwrite_all(fd, data, offset)


__all__ = [
    "LOCAL_FILE_SYSTEMS",
    "PAGE",
    "WATCH",
    "HoldWatch",
    "may_hold",
    "read_exact",
    "read_into",
    "seek",
    "write_pages",
]
