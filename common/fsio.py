"""File-system primitives every component shares: durable replacement, full writes, hole
punching, the sparse-file walker and the zero test. One behaviour each, written once.

Durability follows one recipe (:func:`atomic_write`): a new temporary file in the same directory,
created with its final mode, written in full and fsynced, renamed over the target, and the
directory fsynced. A crash at any instant leaves either the old or the new file, never a torn one.
Files are created 0600 unless the caller says otherwise, and never through a symbolic link.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10

# Errors that mean "this file system cannot do that", not "something went wrong".
UNSUPPORTED_ERRNOS: Final = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})

_ZEROS_SIZE: Final = 1 << 20
_ZEROS: Final = bytes(_ZEROS_SIZE)
_SYNC_FILE_RANGE_WRITE: Final = 2


# --- the libc calls the standard library lacks ----------------------------------------------------


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def libc_func(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """The C library's ``name`` with these argument types, returning an ``int``; None where
    the C library lacks it (or cannot be loaded)."""
    libc = _load_libc()
    func = getattr(libc, name, None) if libc is not None else None
    if func is None:
        return None
    func.argtypes = argtypes
    func.restype = ctypes.c_int
    typed: Callable[..., int] = func
    return typed


_fallocate = libc_func("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_sync_file_range = libc_func(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
)

HAVE_FALLOCATE: Final = _fallocate is not None
"""Whether libc offers ``fallocate(2)`` (hole punching and zero ranges)."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call Linux ``fallocate(2)``; raise :class:`OSError` on failure (ENOSYS without libc's)."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of dirty pages to disk now, without waiting (best effort).

    The fdatasync at the end of a batch then finds little left to write: disk writes overlap
    with receiving the rest of the batch instead of stalling the ack.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def random_access(fd: int) -> None:
    """Tell the kernel to read nothing ahead through ``fd`` (best effort: advice a file system
    refuses costs speed, not data). Its reads then fill the page cache with single pages, never
    the large folios that make each later 4 KiB write into them cost several times as much."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def prefetch(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading a range into the page cache now, without waiting (best
    effort): many ranges asked for at once are read in parallel, where one ``pread`` after
    another waits for each in turn."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


class PageCacheReads:
    """``pread`` that never waits for the disk (``RWF_NOWAIT``), for the files of one user: off
    for good once a file system says it cannot read that way."""

    def __init__(self) -> None:
        self.supported = hasattr(os, "RWF_NOWAIT")

    def pread(self, fd: int, length: int, offset: int) -> bytearray | None:
        """Exactly ``length`` bytes at ``offset`` when the page cache holds them all; None when
        reading them would wait for the disk, runs past the end of the file, or the file system
        cannot tell (:attr:`supported` is then False)."""
        if not self.supported:
            return None
        buf = bytearray(length)
        try:
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            self.supported = False
            return None
        return buf if n == length else None


# --- whole writes and reads -----------------------------------------------------------------------


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (short writes happen on signals and pipes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``os.pwrite`` at ``offset`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset``; bytes past the end of the file read as zero."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past the end of the file read as zero."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            buf[got:] = bytes(len(buf) - got)
            return
        got += n


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` so it reads as zeroes; falls back to writing zeroes.

    The file size never changes (``FALLOC_FL_KEEP_SIZE``).
    """
    if length <= 0:
        return
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as exc:
        if exc.errno not in UNSUPPORTED_ERRNOS:
            raise
    end = offset + length
    while offset < end:
        n = min(_ZEROS_SIZE, end - offset)
        pwrite_all(fd, _ZEROS[:n], offset)
        offset += n


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte of ``data`` is zero, without copying it (``startswith`` is a memcmp)."""
    n = len(data)
    if n <= _ZEROS_SIZE:
        return _ZEROS.startswith(data)
    view = memoryview(data)
    return all(_ZEROS.startswith(view[i : i + _ZEROS_SIZE]) for i in range(0, n, _ZEROS_SIZE))


# --- sparse files ---------------------------------------------------------------------------------


def data_segments(fd: int, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """Split ``[offset, offset+length)`` into ``(start, length, allocated)`` runs, in order.

    Uses ``SEEK_DATA``/``SEEK_HOLE`` so that holes of a sparse file cost nothing to walk. Where
    the file system cannot tell (an errno of :data:`UNSUPPORTED_ERRNOS`), the rest of the range is
    reported allocated; other errors propagate.
    """
    end = offset + length
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield pos, end - pos, False
                return
            if exc.errno in UNSUPPORTED_ERRNOS:
                yield pos, end - pos, True
                return
            raise
        if data >= end:
            yield pos, end - pos, False
            return
        if data > pos:
            yield pos, data - pos, False
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data, True
        pos = hole


def data_extents(fd: int, offset: int, end: int) -> Iterator[tuple[int, int]]:
    """The ``(start, stop)`` byte ranges of ``[offset, end)`` that hold data (not holes)."""
    for start, length, allocated in data_segments(fd, offset, end - offset):
        if allocated:
            yield start, start + length


# --- durable replacement --------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create, rename, unlink) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    *,
    mode: int = 0o600,
    dir_fd: int | None = None,
) -> None:
    """Replace ``path`` by ``data`` atomically and durably.

    The temporary file ``.<name>.<random>.tmp`` is created next to the target with ``O_EXCL``
    and ``O_NOFOLLOW`` and with ``mode`` from its creation on (a private key is never readable by
    anyone else, not even for an instant), written in full, fsynced, renamed over the target
    (a link planted at the target is replaced, not followed), and the directory is fsynced. On
    failure the temporary file is removed. With ``dir_fd``, ``path`` is a name in that directory.
    """
    target = Path(path)
    name = target.name
    if dir_fd is None:
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        parent = dir_fd
    try:
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=parent)
        try:
            write_all(fd, data)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp, dir_fd=parent)
            raise
        os.fsync(parent)
    finally:
        if dir_fd is None:
            os.close(parent)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o600) -> None:
    """:func:`atomic_write` of ``obj`` as JSON (indent 1, sorted keys, a final newline)."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode=mode)


_READ_AT_ONCE = 1 << 16


def read_small(path: Path) -> bytes:
    """The bytes of the regular file ``path``, opened without following a symbolic link, in few
    system calls: an open, a read per 64 KiB (a short read of a regular file is its end), a
    close. A buffered file object makes nine for a small file, and on a busy broker each one
    hands the GIL to another thread, which keeps it for up to 5 ms (issue 10)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, _READ_AT_ONCE)
            chunks.append(chunk)
            if len(chunk) < _READ_AT_ONCE:
                return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """The JSON document in ``path``, read with :func:`read_small`.

    Raises :class:`FileNotFoundError` when it is absent, another :class:`OSError` when it cannot be
    read (``ELOOP`` for a link), :class:`ValueError` when it is not JSON.
    """
    return json.loads(read_small(path))
