"""What an NBD export is to the server, and a plain file (or block device) export.

Threading contract, which backends may rely on:

- ``read_cached``, ``write``, ``trim``, ``write_zeroes``, ``block_status`` and ``cache`` are
  called on the event-loop thread, one at a time, in the order the requests arrived on a
  connection. They are synchronous because ``pread``/``pwrite`` on the page cache take
  microseconds, far less than a thread hand-off; a backend must therefore never block in them for
  long (no fsync, no network). Because every mutation happens on the loop thread, a backend that
  tracks changes (the agent's dirty map) can cut a consistent snapshot between two loop callbacks
  without locking.
- ``read`` is called for a READ whose ``read_cached`` returned None, in a worker thread,
  concurrently with the calls above and with other ``read`` calls: reading what the page cache
  does not hold waits for the disk, which would stop the loop and every other request with it.
  (It is called on the loop thread instead once a connection has many READ bytes in the pool.)
  Before a thread reads several such READs, it calls ``cache`` for each (a prefetch, so the disk
  reads them side by side); ``cache`` must therefore be thread-safe too. A READ answered later
  than a request sent after it is allowed: the client did not wait for it.
- ``flush`` is called in a worker thread, concurrently with the calls above, and must make durable
  every write that *returned* before ``flush`` was called (it may cover more). The server calls it
  for ``NBD_CMD_FLUSH`` and, after the write, for every request carrying ``NBD_CMD_FLAG_FUA``; so
  the ``fua`` argument of the mutating methods is informational and a backend may ignore it.
- Errors: raise :class:`ExportError` with an NBD error value, or let an :class:`OSError` escape (its
  errno is mapped: EROFS/EACCES -> EPERM, EDQUOT/EFBIG -> ENOSPC, and so on). Anything else is
  logged as a bug and answered with EIO. The server never lets a backend error end the connection.
- ``write`` receives a memoryview into the connection's receive buffer that is only valid during
  the call: copy it (``bytes(data)``) to keep it.

The server validates every request before calling a backend: offsets and lengths are inside
``size``, mutating calls never reach a read-only export, and calls for capabilities the export
does not claim never arrive.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from common.fsio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    HAVE_FALLOCATE,
    UNSUPPORTED_ERRNOS,
    PageCacheReads,
    data_segments,
    fallocate,
)
from common.nbd.constants import STATE_HOLE, STATE_ZERO, Errno
from common.nbd.errors import ExportError


class Export(Protocol):
    """One export as the NBD server sees it.

    Capabilities are read once per connection, when the client enters transmission; they must not
    change while the export is served.
    """

    @property
    def name(self) -> str:
        """The export name clients ask for."""

    @property
    def size(self) -> int:
        """Size in bytes; fixed while the export is served."""

    @property
    def description(self) -> str:
        """Human-readable text for ``NBD_INFO_DESCRIPTION`` (empty for none)."""

    @property
    def read_only(self) -> bool:
        """Refuse every mutating command with EPERM."""

    @property
    def can_flush(self) -> bool:
        """``flush`` makes writes durable (advertises FLUSH and FUA)."""

    @property
    def can_trim(self) -> bool:
        """``trim`` is implemented (advertises TRIM)."""

    @property
    def can_write_zeroes(self) -> bool:
        """``write_zeroes`` is implemented (advertises WRITE_ZEROES)."""

    @property
    def can_fast_zero(self) -> bool:
        """``write_zeroes`` is always much cheaper than writing the zeroes.

        Advertises ``NBD_FLAG_SEND_FAST_ZERO``; requests with ``NBD_CMD_FLAG_FAST_ZERO`` are then
        passed on like any other. Without it they are refused with EINVAL (clients must not send
        the flag unless it is advertised).
        """

    @property
    def can_multi_conn(self) -> bool:
        """A flush on one connection covers writes made through every connection to this export."""

    @property
    def can_cache(self) -> bool:
        """``cache`` is implemented (advertises CACHE, a prefetch hint)."""

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes at ``offset`` (thread-safe: see the module docstring)."""

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """Exactly ``length`` bytes at ``offset`` if they can be had without waiting for the
        disk; None to have :meth:`read` run in a worker thread."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Write ``data`` at ``offset`` (``data`` is only valid during the call)."""

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard a range; afterwards its contents are unspecified until rewritten."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        """Make a range read as zeroes; ``may_trim`` allows deallocating it."""

    def flush(self) -> None:
        """Make durable every write that returned before this call (called in a worker thread)."""

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """Describe ``base:allocation`` from ``offset`` as (length, STATE_* flags) extents.

        May describe less than ``length`` (the client asks again) but must start at ``offset``.
        """

    def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (a hint)."""

    def client_opened(self, peer: str) -> None:
        """A client entered transmission on this export."""

    def client_closed(self, peer: str) -> None:
        """A client that entered transmission on this export disconnected."""


class ExportBase:
    """Defaults for :class:`Export`: a read-only export of nothing, able to do nothing.

    Subclasses set the capability attributes they support and override the matching methods.
    Plain class attributes satisfy the :class:`Export` properties.
    """

    name: str = ""
    size: int = 0
    description: str = ""
    read_only: bool = True
    can_flush: bool = False
    can_trim: bool = False
    can_write_zeroes: bool = False
    can_fast_zero: bool = False
    can_multi_conn: bool = False
    can_cache: bool = False

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Refuse: subclasses that serve data override this."""
        raise ExportError(Errno.EIO, "export cannot be read")

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """:meth:`read`, on the loop thread: for backends whose reads never wait for a disk."""
        return self.read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Refuse (unreachable unless ``read_only`` is False)."""
        raise ExportError(Errno.EPERM, "export is read-only")

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Ignore: trim is a hint."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        """Refuse (unreachable unless ``can_write_zeroes``)."""
        raise ExportError(Errno.EINVAL, "write zeroes is not supported")

    def flush(self) -> None:
        """Nothing to make durable."""

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """Everything allocated, contents unknown: always a correct answer."""
        return [(length, 0)]

    def cache(self, offset: int, length: int) -> None:
        """Ignore: cache is a hint."""

    def client_opened(self, peer: str) -> None:
        """No bookkeeping by default."""

    def client_closed(self, peer: str) -> None:
        """No bookkeeping by default."""


_ZERO_CHUNK = 1024 * 1024


def pread_or_eio(fd: int, offset: int, length: int) -> bytes:
    """``pread`` exactly ``length`` bytes at ``offset``; a short read (the file shrank behind
    our back) is EIO."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ExportError(Errno.EIO, f"short read at {offset}: file shrank?")
    return data


class FileExport(ExportBase):
    """An export backed by a regular file or a block device, through one shared descriptor.

    ``pread``/``pwrite`` on one descriptor shared by every connection, so one ``fdatasync``
    covers writes from all of them (hence ``can_multi_conn``). Trim punches holes where the
    filesystem can; write-zeroes punches (when allowed) or zero-fills allocated space, falling
    back to writing zeroes. Block status walks SEEK_DATA/SEEK_HOLE.
    """

    can_flush = True
    can_trim = True
    can_write_zeroes = True
    # Zeroing falls back to writing zeroes where fallocate cannot, so we cannot promise "fast".
    can_fast_zero = False
    can_multi_conn = True
    can_cache = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        read_only: bool = False,
        description: str = "",
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.read_only = read_only
        self.description = description
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self.path, flags)
        try:
            st = os.fstat(self._fd)
            self._regular = stat.S_ISREG(st.st_mode)
            self.size = st.st_size if self._regular else os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        # Learned on first use: which fallocate modes this filesystem supports.
        self._punch_ok = self._regular and HAVE_FALLOCATE
        self._zero_range_ok = self._regular and HAVE_FALLOCATE
        # Block devices have no holes to find.
        self._seek_ok = self._regular
        self._cache = PageCacheReads()

    @property
    def fd(self) -> int:
        """The open descriptor (for backends that wrap this one)."""
        return self._fd

    def close(self) -> None:
        """Close the descriptor; the export must no longer be served."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, offset: int, length: int) -> bytes:
        """``pread`` the range; a short read (file shrunk behind our back) is EIO."""
        return pread_or_eio(self._fd, offset, length)

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        """The range if the page cache holds it, else None; read here as always where the
        file system cannot read without waiting."""
        got = self._cache.pread(self._fd, length, offset)
        return self.read(offset, length) if got is None and not self._cache.supported else got

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """``pwrite`` all of ``data`` (looping only on the rare short write)."""
        written = os.pwrite(self._fd, data, offset)
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], offset + written)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Punch a hole where supported; otherwise do nothing (trim is only a hint)."""
        if length and self._punch_ok:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise
                self._punch_ok = False

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        """Zero a range: punch (if allowed), else zero-range, else write zeroes."""
        if not length:
            return
        if may_trim and self._punch_ok:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise
                self._punch_ok = False
        if self._zero_range_ok:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise
                self._zero_range_ok = False
        zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeroes))
            self.write(offset, zeroes[:n], fua=False)
            offset += n

    def flush(self) -> None:
        """``fdatasync``: the size never changes, so metadata sync is not needed."""
        os.fdatasync(self._fd)

    def cache(self, offset: int, length: int) -> None:
        """Ask the kernel to read ahead."""
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Walk SEEK_DATA/SEEK_HOLE; holes read as zeroes. At most 1024 extents per call."""
        if not self._seek_ok:
            return [(length, 0)]
        extents: list[tuple[int, int]] = []
        for _start, run, allocated in data_segments(self._fd, offset, length):
            extents.append((run, 0 if allocated else STATE_HOLE | STATE_ZERO))
            if len(extents) == 1024:
                break
        return extents
