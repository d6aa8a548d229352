"""The views' reader/writer lock (broker/undo.py:RWLock), with real threads."""

from __future__ import annotations

import threading
import time

from broker.undo import RWLock


def test_a_writer_waits_for_every_reader_and_readers_wait_for_the_writer() -> None:
    """Readers share the lock; a writer gets it only when the last reader leaves (the release
    that wakes it); readers arriving while it holds the lock wait until it lets go."""
    lock = RWLock()
    events: list[str] = []
    lock.acquire_read()
    lock.acquire_read()  # two readers at once
    wrote = threading.Event()

    def writer() -> None:
        lock.acquire_write()
        events.append("write")
        wrote.set()
        time.sleep(0.05)
        events.append("write done")
        lock.release_write()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    assert not wrote.is_set()  # two readers still in
    lock.release_read()
    time.sleep(0.05)
    assert not wrote.is_set()  # one still in
    events.append("last reader leaves")
    lock.release_read()
    assert wrote.wait(2)

    def reader() -> None:
        lock.acquire_read()
        events.append("read")
        lock.release_read()

    r = threading.Thread(target=reader)
    r.start()
    r.join(2)
    t.join(2)
    assert events == ["last reader leaves", "write", "write done", "read"]


def test_readers_alone_never_block_each_other() -> None:
    """Many threads reading at once, no writer: all get in without waiting for each other."""
    lock = RWLock()
    inside = threading.Barrier(8, timeout=2)

    def reader() -> None:
        lock.acquire_read()
        inside.wait()  # all eight hold the read side at the same moment
        lock.release_read()

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3)
    assert not inside.broken
    lock.acquire_write()  # and nobody is left inside
    lock.release_write()
