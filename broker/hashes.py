"""Block hashes of a replica (or of a recovery point): the broker side of seeding and verify.

The hash list (:mod:`common.blockhash`) of every ``block_size`` block from ``offset``. Known-zero
ranges (``broker/zeros.py``: holes in the image that no undo data covers, and zero undo entries)
are not read: their hash is computed once per block length. Blocks no undo data covers are
hashed straight from a read-only mmap of the image (no copy); only blocks that differ at the
point go through :meth:`~broker.pointview.PointView.read`.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Final

from broker.pointview import PointView
from broker.zeros import known_zero_ranges
from common.blockhash import block_hash

_CHUNK: Final = 8 * 1024 * 1024


@cache
def zero_hash(length: int) -> bytes:
    """The hash of ``length`` zero bytes."""
    return block_hash(bytes(length))


def block_hashes(
    view: PointView,
    image_fd: int,
    *,
    offset: int,
    length: int,
    block_size: int,
    threads: int = 2,
) -> bytes:
    """The hashes of every block of ``[offset, offset+length)`` as of ``view``'s point."""
    if length <= 0:
        return b""
    zeros = known_zero_ranges(view, image_fd, offset, length)
    end = offset + length
    chunk = max(block_size, _CHUNK // block_size * block_size)
    size = os.fstat(image_fd).st_size
    mm = mmap.mmap(image_fd, size, prot=mmap.PROT_READ) if size else None
    image = memoryview(mm) if mm is not None else memoryview(b"")

    def one(chunk_start: int) -> bytes:
        chunk_end = min(end, chunk_start + chunk)
        out = bytearray()
        with view.reading():
            overlay = view.overlay_in(chunk_start, chunk_end)
            o = 0
            pos = chunk_start
            while pos < chunk_end:
                b_end = min(pos + block_size, chunk_end)
                while o < len(overlay) and overlay[o][1] <= pos:
                    o += 1
                if _inside(zeros, pos, b_end):
                    h = zero_hash(b_end - pos)
                elif o < len(overlay) and overlay[o][0] < b_end:
                    h = block_hash(view.read(pos, b_end - pos))  # some of it differs at the point
                else:
                    h = block_hash(image[pos:b_end])
                out += h
                pos = b_end
        return bytes(out)

    try:
        starts = range(offset, end, chunk)
        if len(starts) == 1 or threads <= 1:
            return b"".join(one(s) for s in starts)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hashes") as pool:
            return b"".join(pool.map(one, starts))
    finally:
        image.release()
        if mm is not None:
            mm.close()
        # The mapping's read-ahead left the range in large folios (ext4, Linux 6.16 and later),
        # where every later 4 KiB apply would spend ~25 us in the kernel instead of ~3: drop the
        # clean pages the hashing read (dirty ones stay, their writeback merely starts).
        with contextlib.suppress(OSError):  # advice refused costs speed, not data
            os.posix_fadvise(image_fd, offset, length, os.POSIX_FADV_DONTNEED)


def _inside(zeros: list[tuple[int, int]], start: int, end: int) -> bool:
    i = bisect.bisect_right(zeros, (start, float("inf"))) - 1
    return i >= 0 and zeros[i][0] <= start and zeros[i][1] >= end
