"""common/heldio.py: page-cache reads, writes and seeks that keep the GIL, and the watch that
stops holding it after a call slept in the kernel.

Whether a call kept the GIL is seen from a thread spinning on Python code meanwhile: during a
call of a few milliseconds that lets go of it, the spinner runs; during a held one, it cannot.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common import heldio
from common.heldio import HoldWatch, may_hold, read_exact, read_into, seek, write_pages

BIG = 16 << 20  # a call long enough (milliseconds) for a waiting thread to run during it


def others_ran_during(call: Callable[[], object], *, until_it_ran: bool = False) -> list[int]:
    """How far a thread spinning on Python code got during each run of ``call``: 0 if the call
    kept the GIL throughout. Ten runs, or up to a hundred ``until_it_ran`` somewhere. A run may
    show 0 anyway, when the woken spinner found no free core before the call ended (a loaded
    host), or more than 0 for a held call, when CPython switched threads just before it: the
    tests look at the most and the least."""
    stop = threading.Event()
    count = [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    # CPython makes the holder let go of the GIL where it can (between bytecodes) once a thread
    # has waited a switch interval: a long one keeps such switches out of the Python around the
    # call. (A test before may have shortened it: agents/shiploop.py does, process-wide.)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        progress: list[int] = []
        runs = 100 if until_it_ran else 10
        while len(progress) < runs and not (until_it_ran and any(progress)):
            before = count[0]
            call()
            progress.append(count[0] - before)
        return progress
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)


@pytest.fixture
def watch() -> Iterator[HoldWatch]:
    """The process's watch, fresh (a test before may have paused it: a held write of the broker
    tests that slept), and put back as it was afterwards."""
    saved = dict(vars(heldio.WATCH))
    vars(heldio.WATCH).update(vars(HoldWatch()))
    yield heldio.WATCH
    vars(heldio.WATCH).update(saved)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[int]:
    """A file of BIG random bytes, in the page cache, open read-write."""
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, os.urandom(BIG), 0)
    try:
        yield fd
    finally:
        os.close(fd)


def test_the_watch_pauses_after_a_call_that_slept_and_longer_when_it_recurs() -> None:
    """Slow and asleep: pause 1 s, then 2, 4 ... up to the cap while slow calls keep coming; a
    quick call, or a slow one that never slept (preempted), pauses nothing; a quiet spell
    starts over at the shortest pause."""
    w = HoldWatch(slow=0.02, pauses=(1.0, 8.0))
    assert w.allowed(100.0)
    assert not w.took(100.0, 100.01, slept=True)  # quick
    assert not w.took(100.0, 100.5, slept=False)  # preempted, not asleep
    assert w.allowed(100.5)
    assert w.took(101.0, 101.05, slept=True)
    assert (w.pause, w.allowed(101.5), w.allowed(102.06)) == (1.0, False, True)
    pauses = []
    for t in (103.0, 106.0, 111.0, 120.0):
        assert w.took(t, t + 0.05, slept=True)
        pauses.append(w.pause)
    assert pauses == [2.0, 4.0, 8.0, 8.0]
    assert w.took(200.0, 200.05, slept=True)  # more than the cap after the last pause ended
    assert w.pause == 1.0


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_reads_return_the_bytes_cached_or_not(tmp_path: Path, where: str) -> None:
    """Cached, evicted from the cache (the kernel refuses to wait: the ordinary read takes over)
    and at the end of the file, the bytes are the file's; on tmpfs too, which refuses
    ``RWF_NOWAIT`` altogether."""
    data = os.urandom(256 << 10)
    path = (tmp_path if where == "tmp" else Path("/dev/shm")) / f"heldio-{os.getpid()}"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    path.unlink()
    try:
        buf = bytearray(64 << 10)
        assert read_into(fd, buf, 4096, 8192, hold=True) == 4096
        assert buf[:4096] == data[8192:12288]
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert read_exact(fd, 65536, 131072, hold=True) == data[131072:196608]
        assert read_into(fd, buf, 8192, len(data) - 4096, hold=True) == 4096  # short at the end
        assert read_exact(fd, 8192, len(data) - 4096, hold=True) == data[-4096:] + bytes(4096)
    finally:
        os.close(fd)


def test_cached_reads_and_page_writes_keep_the_gil(image: int, watch: HoldWatch) -> None:
    """No other thread runs during a held read of the cache or write of whole pages; during the
    same read through ``os`` one does (the measure can fail). A file system that refused
    ``RWF_NOWAIT`` before (tmpfs) changes nothing for the others."""
    buf = bytearray(BIG)
    data = os.urandom(BIG)
    shm = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.pwrite(shm, data[:4096], 0)
        assert read_into(shm, buf, 4096, 0, hold=True) == 4096
    finally:
        os.close(shm)
    assert min(others_ran_during(lambda: read_into(image, buf, BIG, 0, hold=True))) == 0
    assert min(others_ran_during(lambda: write_pages(image, data, 0, hold=True))) == 0
    assert max(others_ran_during(lambda: os.preadv(image, [buf], 0), until_it_ran=True)) > 0
    assert os.pread(image, BIG, 0) == data


def test_a_pause_makes_every_call_an_ordinary_one(image: int, watch: HoldWatch) -> None:
    """After a call slept too long, calls let go of the GIL again for the pause."""
    buf = bytearray(BIG)
    assert min(others_ran_during(lambda: read_into(image, buf, BIG, 0, hold=True))) == 0
    assert watch.took(0.0, 1e12, slept=True)  # a pause that outlasts the test
    assert (
        max(others_ran_during(lambda: read_into(image, buf, BIG, 0, hold=True), until_it_ran=True))
        > 0
    )


def test_only_local_file_systems_hold(image: int) -> None:
    """The test's own file system and tmpfs are local; /proc and a pipe are not in the list (nor
    NFS, SMB or FUSE, where a call may wait for a server). Not held, a read lets go of the GIL."""
    assert may_hold(image)
    shm = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    proc = os.open("/proc/self/stat", os.O_RDONLY)
    r, w = os.pipe()
    try:
        assert (may_hold(shm), may_hold(proc), may_hold(r)) == (True, False, False)
    finally:
        for fd in (shm, proc, r, w):
            os.close(fd)
    buf = bytearray(BIG)
    ran = others_ran_during(lambda: read_into(image, buf, BIG, 0, hold=False), until_it_ran=True)
    assert max(ran) > 0


def test_writes_of_any_shape_land(image: int) -> None:
    """Unaligned, partial-page, bytearray and memoryview writes take the ordinary path; every
    one lands where it was asked."""
    cases: list[tuple[int, bytes | bytearray | memoryview]] = [
        (4096, os.urandom(8192)),
        (100, os.urandom(5000)),
        (12288, bytearray(os.urandom(4096))),
        (20480, memoryview(os.urandom(4096))),
    ]
    for offset, data in cases:
        write_pages(image, data, offset, hold=True)
        assert os.pread(image, len(data), offset) == bytes(data)


def test_errors_are_raised_as_os_raises_them(tmp_path: Path) -> None:
    """A write to a read-only descriptor is EBADF and a seek for data past the last data is
    ENXIO, as ``os`` raises them (the undo capture's allocation walk relies on the second)."""
    ro = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="Bad file descriptor") as bad:
            write_pages(ro, bytes(4096), 0, hold=True)
        assert bad.value.errno == errno.EBADF
    finally:
        os.close(ro)
    sparse = os.open(tmp_path / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(sparse, 1 << 24)
        os.pwrite(sparse, b"x" * 4096, 1 << 20)
        assert seek(sparse, 0, os.SEEK_DATA, hold=True) == os.lseek(sparse, 0, os.SEEK_DATA)
        assert seek(sparse, 1 << 20, os.SEEK_HOLE, hold=True) == os.lseek(
            sparse, 1 << 20, os.SEEK_HOLE
        )
        with pytest.raises(OSError, match="No such device or address") as past:
            seek(sparse, 2 << 20, os.SEEK_DATA, hold=True)
        assert past.value.errno == errno.ENXIO
    finally:
        os.close(sparse)
