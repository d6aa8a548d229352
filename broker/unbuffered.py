"""Unbuffered replica writes for the initial copy: ``O_DIRECT``, then read back from the disk.

An initial copy writes a whole disk once and reads none of it soon after. Through the page cache
every byte is first copied into freshly allocated pages, which cost the broker more CPU than
decompressing them (docs/bench.md, "Initial replication"): 39 % of a two-core host's samples sat
in that copy. Written with ``O_DIRECT`` from one reused, aligned buffer, the same bytes cost a
tenth of the CPU, and the read-back check reads what the disk holds rather than the page cache.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from typing import Final

import xxhash

from common.logs import get_logger

_log = get_logger("broker.unbuffered")

ALIGN: Final = 4096
"""Offsets and lengths written unbuffered are multiples of this (any sector size up to 4 KiB)."""
_BUFFER_STEP: Final = 1 << 20


class UnbufferedWriter:
    """Writes aligned DATA extents to one image with ``O_DIRECT`` and reads each back.

    :meth:`write` answers ``None`` for what it cannot write unbuffered (an unaligned extent, or a
    filesystem that refuses ``O_DIRECT``); the caller then writes through the page cache as
    before. Mixing the two on one file is safe: the kernel flushes and drops cached pages of the
    range around each direct write. Durability is still the caller's ``fdatasync``, which also
    flushes the device's cache.
    """

    def __init__(self, image_fd: int) -> None:
        # Reopened through /proc rather than by path: the same file, no name an attacker could
        # have replaced meanwhile.
        try:
            self._fd = os.open(f"/proc/self/fd/{image_fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            self._fd = -1
            _note_refused(exc)
        self._out: mmap.mmap | None = None
        self._back: mmap.mmap | None = None
        self.written = 0
        """Bytes written unbuffered so far."""

    def write(self, offset: int, data: bytes | memoryview) -> int | None:
        """Write ``data`` at ``offset`` past the page cache; answer the xxh3 of the bytes read
        back from the disk, or ``None`` if it was not written."""
        n = len(data)
        if self._fd < 0 or not n or offset % ALIGN or n % ALIGN:
            return None
        out, back = self._buffers(n)
        out[:n] = data
        try:
            done = 0
            while done < n:
                done += os.pwrite(self._fd, memoryview(out)[done:n], offset + done)
            with memoryview(back) as view:
                got = os.preadv(self._fd, [view[:n]], offset)
                digest = xxhash.xxh3_64_intdigest(view[:got])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The device wants another alignment: the page cache from now on (the caller
            # rewrites the whole extent, so a partial write here is overwritten).
            _note_refused(exc)
            self.close()
            return None
        self.written += n
        return digest

    def _buffers(self, n: int) -> tuple[mmap.mmap, mmap.mmap]:
        if self._out is None or self._back is None or len(self._out) < n:
            self._release_buffers()
            size = -(-n // _BUFFER_STEP) * _BUFFER_STEP
            # Anonymous mappings are page aligned, as O_DIRECT wants its buffers.
            self._out, self._back = mmap.mmap(-1, size), mmap.mmap(-1, size)
        return self._out, self._back

    def _release_buffers(self) -> None:
        for buf in (self._out, self._back):
            if buf is not None:
                buf.close()
        self._out = self._back = None

    def close(self) -> None:
        """Release the descriptor and the buffers (further writes answer ``None``)."""
        self._release_buffers()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _note_refused(exc: OSError) -> None:
    _note_once(exc.strerror or str(exc))


@functools.cache
def _note_once(reason: str) -> None:
    # Said once per process and reason, not once per batch of every initial copy.
    _log.info("unbuffered_writes_unavailable", reason=reason)
