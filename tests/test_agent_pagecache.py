"""Replication reads leave the guest's page cache in single pages.

The initial copy reads a whole disk. Read through the guest's descriptor, with its read-ahead,
it would leave the image in the page cache as large folios (ext4 on Linux 6.16 and later), and
every later 4 KiB guest write into one of them costs ~25 us of kernel time instead of ~3
(docs/bench.md). The agent reads for replication through a descriptor of its own, marked for
random access (:func:`agents.disk.replication_descriptor`). Which pages sit in large folios is
read from the kernel's page tables (``/proc/self/pagemap``, ``/proc/kpageflags``: root only).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from tests.support_agent import MiB, wait_until
from tests.test_agent_ship import make_rig

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers are visible to root only"),
]

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


async def test_the_initial_copy_leaves_the_image_in_single_pages(tmp_path: Path) -> None:
    """The shipping process reads the 16 MiB of a cold image in order for the initial copy: all
    of it ends up cached, none of it in a large folio; read through a plain descriptor afterwards,
    the same file does fill large folios here (so the check can see them)."""
    rig = await make_rig(tmp_path)
    rig.image.write_bytes(os.urandom(rig.image.stat().st_size))  # one run of data, read in order
    drop_from_cache(rig.image)
    assert cached_pages(rig.image) == (0, 0)
    try:
        await rig.start()
        await wait_until(
            lambda: rig.rep.state is not None and rig.rep.state.initial_done, within=30
        )
        cached, large = cached_pages(rig.image)
    finally:
        await rig.halt()
        await rig.rx.stop()
    assert cached == 16 * MiB // PAGE  # the copy read the image through the page cache
    assert large == 0
    assert rig.replica.image.read_bytes() == rig.image.read_bytes()
    # The control: a sequential read with read-ahead, as the guest's descriptor would do it.
    drop_from_cache(rig.image)
    with rig.image.open("rb", buffering=0) as fh:
        while fh.read(MiB):
            pass
    assert cached_pages(rig.image)[1] > 0, "this kernel keeps no large folios: nothing to see"
