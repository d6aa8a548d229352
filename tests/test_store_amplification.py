"""The store's write amplification that docs/scale.md builds on, measured on the real journal
and apply code: bytes written and read, and syncs, per byte a guest changed."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from broker.store import Store
from tests.support_broker import FakeSource, MiB
from tests.test_broker_store import enable, engine, journal

# docs/scale.md, "Store throughput": per changed byte of a delta batch, once points are kept.
JOURNAL_WRITES_PER_SHIPPED = 1.01
APPLY_WRITES_PER_CHANGED = (1.95, 2.05)  # the image, plus the undo of what it overwrote
# The old data, the written data read back from the page cache (the checksum check), plus the
# journal back.
APPLY_READS_PER_CHANGED_OVER_SHIPPED = (1.95, 2.05)
SYNCS_PER_BATCH = 6  # journal 2, apply 4 (one disk, one undo segment; meta.json not saved)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(":") for line in fh)}


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count fsync/fdatasync calls (each still runs: a wrapper, not a mock)."""
    counts: Counter[str] = Counter()

    def counting(real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            counts["sync"] += 1
            real(fd)

        return call

    monkeypatch.setattr(os, "fsync", counting(os.fsync))
    monkeypatch.setattr(os, "fdatasync", counting(os.fdatasync))
    return counts


def test_write_amplification_matches_docs_scale(tmp_path: Path, syncs: Counter[str]) -> None:
    """Journal writes equal the shipped (compressed) bytes; apply writes twice the changed bytes
    (image + undo) and reads the old data, what it wrote (from the page cache) and the journal
    back; six syncs a batch; the replica equals the source."""
    store = Store(tmp_path / "store")
    store.claim_epoch(1, "n")
    src = FakeSource(disk_size=16 * MiB, seed=3)
    replica = enable(store, src)
    eng = engine(store, replica)
    half = (b"replikant " * 7000)[: src.block_size]
    totals: Counter[str] = Counter()
    with structlog.testing.capture_logs():  # logs are not store writes
        for b in range(src.blocks):
            src.write(b * src.block_size, src.rng.randbytes(src.block_size) if b % 2 else half)
        journal(store, replica, src.cut(full=True, all_blocks=True).body)
        eng.apply_pending()
        batches = 20
        for _ in range(batches):
            for _ in range(8):
                block = src.rng.randrange(src.blocks)
                data = src.rng.randbytes(src.block_size) if src.rng.random() < 0.5 else half
                src.write(block * src.block_size, data)
            totals["changed"] += len(src.dirty) * src.block_size
            body = src.cut().body
            totals["shipped"] += len(body)
            syncs.clear()
            before = _io()
            journal(store, replica, body)
            mid = _io()
            totals["journal_syncs"] += syncs["sync"]
            syncs.clear()
            assert eng.apply_pending() == 1
            after = _io()
            totals["apply_syncs"] += syncs["sync"]
            totals["journal_w"] += mid["wchar"] - before["wchar"]
            totals["apply_w"] += after["wchar"] - mid["wchar"]
            totals["apply_r"] += after["rchar"] - mid["rchar"]
    assert replica.image.read_bytes() == bytes(src.image)
    changed, shipped = totals["changed"], totals["shipped"]
    print(
        f"\nper changed byte: shipped {shipped / changed:.3f}, journal writes "
        f"{totals['journal_w'] / changed:.3f}, apply writes {totals['apply_w'] / changed:.3f}, "
        f"apply reads {totals['apply_r'] / changed:.3f}; syncs per batch: journal "
        f"{totals['journal_syncs'] / batches:.1f}, apply {totals['apply_syncs'] / batches:.1f}"
    )
    assert totals["journal_w"] <= shipped * JOURNAL_WRITES_PER_SHIPPED
    low, high = APPLY_WRITES_PER_CHANGED
    assert low * changed <= totals["apply_w"] <= high * changed
    low, high = APPLY_READS_PER_CHANGED_OVER_SHIPPED
    assert low * changed <= totals["apply_r"] - shipped <= high * changed
    # Plus one meta.json save (two syncs): the first delta batch completes the initial sync.
    assert totals["journal_syncs"] + totals["apply_syncs"] == SYNCS_PER_BATCH * batches + 2
