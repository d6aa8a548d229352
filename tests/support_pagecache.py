"""Which pages of a file sit in the page cache, and in large folios (root only).

Read from the kernel's page tables: ``mincore`` for what is cached, ``/proc/self/pagemap`` for
each page's frame, ``/proc/kpageflags`` for whether that frame is part of a compound page (a
large folio).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE
_COMPOUND = (1 << 15) | (1 << 16)  # KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL
_PFN = (1 << 55) - 1


def cached_pages(path: Path) -> tuple[int, int]:
    """``(cached pages, of them in large folios)`` of the file at ``path``.

    Only pages already cached (``mincore``) are touched, so looking reads nothing in.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    npages = -(-size // PAGE)
    with path.open("rb") as fh:
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        vec = (ctypes.c_ubyte * npages)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        cached = [i for i in range(npages) if vec[i] & 1]
        for i in cached:
            mm[i * PAGE]  # map the cached page (a minor fault: nothing is read)
        large = 0
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for i in cached:
                pm.seek((addr // PAGE + i) * 8)
                pfn = int.from_bytes(pm.read(8), "little") & _PFN
                kf.seek(pfn * 8)
                large += bool(int.from_bytes(kf.read(8), "little") & _COMPOUND)
        del addr
        return len(cached), large
    finally:
        mm.close()


def drop_from_cache(path: Path) -> None:
    """Write ``path`` back and evict it from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
