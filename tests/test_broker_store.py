"""Unit tests of the replica store, journal, apply and recovery points, without sockets."""

from __future__ import annotations

import gc
import json
import os
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from broker.apply import ReplicaEngine
from broker.errors import (
    CorruptExtent,
    FencedError,
    IdentityConflict,
    IdentityMismatch,
    MalformedBatch,
    SequenceGap,
    StaleGeneration,
    StorageFullError,
)
from broker.journal import BatchReceiver, DirectSink, Receipt
from broker.store import Replica, Store, journal_name
from broker.undo import AllocationCursor, SegmentWriter, StateInfo, UndoSegment, segment_meta
from broker.verified import HeldBatches, HeldBudget
from common.fsio import data_segments
from common.hrl import DEFAULT_LIMITS
from tests.support_broker import FakeSource, MiB

EPOCH = 1


def make_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    store.claim_epoch(EPOCH, "node1")
    return store


def enable(store: Store, src: FakeSource) -> Replica:
    replica, _ = store.create_replica(
        vm_uuid=str(src.vm_uuid),
        disk_id=src.disk_id,
        vm_name="web1",
        disk_size=src.disk_size,
        block_size=src.block_size,
        generation=src.generation,
        epoch=EPOCH,
    )
    return replica


def receiver(store: Store, replica: Replica, min_free: int = 0, **kw: Any) -> BatchReceiver:
    """A receiver for ``replica`` with no size limit (``kw``: the optional arguments)."""
    return BatchReceiver(
        store,
        replica,
        url_identity=replica.key,
        limits=DEFAULT_LIMITS,
        min_free_bytes=min_free,
        max_batch_bytes=1 << 40,
        **kw,
    )


def journal(
    store: Store,
    replica: Replica,
    body: bytes,
    chunk: int = 7000,
    min_free: int = 0,
    held: HeldBatches | None = None,
    direct: DirectSink | None = None,
) -> Receipt:
    epoch = EPOCH if direct is not None else None
    rx = receiver(store, replica, min_free, held=held, direct=direct, epoch=epoch)
    try:
        for i in range(0, len(body), chunk):
            rx.feed(body[i : i + chunk])
        return rx.finish()
    except BaseException:
        rx.abort()
        raise


def engine(
    store: Store, replica: Replica, epoch: int = EPOCH, bound: int = 1 << 40
) -> ReplicaEngine:
    # Unbounded by default: these tests keep more undo than their small disks' size on purpose
    # (tests/test_journal_bound.py proves the bound).
    eng = ReplicaEngine(store, replica, epoch=lambda: epoch)
    eng.journal_bound = bound
    return eng


def sync_state(replica: Replica) -> str:
    return replica.meta.initial_sync


def image(replica: Replica) -> bytes:
    return replica.image.read_bytes()


def test_create_replica_is_sparse_and_idempotent(tmp_path: Path) -> None:
    """Enabling creates a sparse image and meta once; re-enabling returns the same replica."""
    store = make_store(tmp_path)
    src = FakeSource(disk_size=64 * MiB)
    r = enable(store, src)
    assert r.image.stat().st_size == 64 * MiB
    assert r.image.stat().st_blocks == 0
    meta = json.loads((r.path / "meta.json").read_text())
    assert meta["vm_uuid"] == str(src.vm_uuid)
    assert meta["initial_sync"] == "pending"
    again = enable(store, src)
    assert again is r
    assert Store(store.root).get(*r.key) is not None


def test_identity_conflict_names_both(tmp_path: Path) -> None:
    """A second enable with another VM name is refused and names both."""
    store = make_store(tmp_path)
    src = FakeSource()
    enable(store, src)
    with pytest.raises(IdentityConflict) as err:
        store.create_replica(
            vm_uuid=str(src.vm_uuid),
            disk_id=src.disk_id,
            vm_name="db1",
            disk_size=src.disk_size,
            block_size=src.block_size,
            generation=1,
            epoch=EPOCH,
        )
    assert "web1" in err.value.message
    assert "db1" in err.value.message


def test_epoch_fence_refuses_old_owner(tmp_path: Path) -> None:
    """Two brokers share a store: once B claims a higher epoch, A's apply is fenced, unwritten."""
    root = tmp_path / "store"
    a = Store(root)
    a.claim_epoch(1, "a")
    src = FakeSource()
    replica = enable(a, src)
    src.mutate()
    journal(a, replica, src.cut().body)
    b = Store(root)
    with pytest.raises(FencedError):
        b.claim_epoch(1, "b")  # equal epoch held by another node
    b.claim_epoch(2, "b")
    eng = engine(a, replica, epoch=1)
    before = image(replica)
    with pytest.raises(FencedError):
        eng.apply_pending()
    assert image(replica) == before
    assert replica.applied_records() == []
    assert list(replica.points_dir.iterdir()) == []
    # The new owner applies, and its epoch is recorded next to the data.
    eng_b = engine(b, b.get(*replica.key) or replica, epoch=2)
    assert eng_b.apply_pending() == 1
    assert eng_b.replica.meta.epoch == 2
    assert a.claim_next_epoch("a") == 3


def test_journal_apply_roundtrip(tmp_path: Path) -> None:
    """Journal then apply ten batches: the replica equals the source, the audit is 1..10."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    for _ in range(10):
        src.mutate()
        receipt = journal(store, replica, src.cut().body)
        assert not receipt.duplicate
    assert replica.meta.durable_seq == 10
    assert eng.apply_pending() == 10
    assert image(replica) == bytes(src.image)
    assert [r.seq for r in replica.applied_records()] == list(range(1, 11))
    assert list(replica.journal_dir.iterdir()) == []
    assert replica.meta.initial_sync == "complete"


def test_apply_writes_the_extents_the_ingest_verified(tmp_path: Path) -> None:
    """A batch applies from the extents its ingest verified, without decoding its journal file
    again; held extents that do not list the journal index's ranges are not trusted."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    src.mutate()
    journal(store, replica, src.cut().body, held=eng.held)
    path = replica.journal_dir / journal_name(1, 1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # only a second decode of the file would see this
    path.write_bytes(raw)
    assert eng.apply_pending() == 1
    assert image(replica) == bytes(src.image)
    src.mutate()
    journal(store, replica, src.cut().body, held=eng.held)
    eng.held.put((1, 2), [], 0)  # a stale entry: the journal lists other extents
    assert eng.apply_pending() == 1
    assert image(replica) == bytes(src.image)
    assert len(eng.held) == 0
    eng.close()


def test_refusals_leave_no_partial_file(tmp_path: Path) -> None:
    """Gap, stale generation, wrong identity and corrupt extent are refused precisely."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    src.mutate()
    first = src.cut()
    journal(store, replica, first.body)
    # Duplicate: answered, nothing written.
    dup = journal(store, replica, first.body)
    assert dup.duplicate
    assert dup.acked_seq == 1
    # Gap.
    src.mutate()
    src.cut()
    src.mutate()
    third = src.cut()
    with pytest.raises(SequenceGap) as gap:
        journal(store, replica, third.body)
    assert gap.value.details == {"expected_seq": 2, "received_seq": 3}
    # Stale generation.
    old = FakeSource(vm_uuid=src.vm_uuid, generation=0)
    old.mutate()
    with pytest.raises(StaleGeneration):
        journal(store, replica, old.cut().body)
    # Wrong identity: a batch of another VM posted to this replica's URL.
    other = FakeSource()
    other.mutate()
    with pytest.raises(IdentityMismatch) as wrong:
        journal(store, replica, other.cut().body)
    assert str(other.vm_uuid) in wrong.value.message
    assert str(src.vm_uuid) in wrong.value.message
    # Corrupt extent: flip a byte in the middle of the data.
    src2 = FakeSource(vm_uuid=src.vm_uuid, compression=src.compression.NONE, seed=5)
    src2.seq = 1
    src2.mutate()
    body = bytearray(src2.cut().body)
    body[len(body) // 2] ^= 0xFF
    with pytest.raises((CorruptExtent, MalformedBatch)):
        journal(store, replica, bytes(body))
    # Truncated.
    with pytest.raises(MalformedBatch) as trunc:
        journal(store, replica, src2.cuts[2].body[:-10])
    assert trunc.value.details["class"] == "Truncated"
    assert sorted(p.name for p in replica.journal_dir.iterdir()) == ["1-1.hrl"]
    assert replica.meta.durable_seq == 1


def test_storage_full_refuses_and_removes_partial(tmp_path: Path) -> None:
    """With free space below the reserve the upload is refused naming the store; nothing is left."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    src.mutate()
    with pytest.raises(StorageFullError) as full:
        journal(store, replica, src.cut().body, min_free=1 << 62)
    assert str(store.root) in full.value.message
    assert full.value.details["needed_bytes"] > full.value.details["free_bytes"]
    assert list(replica.journal_dir.iterdir()) == []
    assert replica.meta.durable_seq == 0


def test_crash_mid_apply_replays_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the undo capture and half the data writes replays once, undo captured once."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    src.mutate(20)
    journal(store, replica, src.cut().body)
    eng.apply_pending()
    src.mutate(20)
    journal(store, replica, src.cut().body)

    from common.heldio import write_pages as real

    calls = {"n": 0}

    def dying_pwrite(fd: int, data: bytes, offset: int, *, hold: bool) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        real(fd, data, offset, hold=hold)

    monkeypatch.setattr("broker.apply.write_pages", dying_pwrite)  # the apply's only data write
    with pytest.raises(KeyboardInterrupt):
        eng.apply_pending()
    monkeypatch.setattr("broker.apply.write_pages", real)
    undo = sorted(p.name for p in replica.points_dir.iterdir())
    undo_stat = {p.name: p.stat().st_mtime_ns for p in replica.points_dir.iterdir()}
    eng.close()

    # "Restart": a fresh store object and engine over the same directory.
    store2 = Store(store.root)
    replica2 = store2.get(*replica.key)
    assert replica2 is not None
    eng2 = engine(store2, replica2)
    assert eng2.apply_pending() == 1
    assert image(replica2) == bytes(src.image)
    assert [r.seq for r in replica2.applied_records()] == [1, 2]
    # The undo of batch 2 was not recaptured (same file, untouched).
    assert {p.name: p.stat().st_mtime_ns for p in replica2.points_dir.iterdir()} == undo_stat
    assert sorted(p.name for p in replica2.points_dir.iterdir()) == undo
    # And point 1 still reads as the source at cut 1.
    with eng2.open_view((1, 1)) as view:
        assert view.read(0, src.disk_size) == src.cuts[1].image


def test_points_read_every_cut_while_applying(tmp_path: Path) -> None:
    """Every retained point reads as the source at that cut, also with batches applied meanwhile."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    for _ in range(6):
        src.mutate(10)
        journal(store, replica, src.cut().body)
    eng.apply_pending()
    view3 = eng.open_view((1, 3))
    for _ in range(6):
        src.mutate(10)
        journal(store, replica, src.cut().body)
        eng.apply_pending()
        assert view3.read(0, src.disk_size) == src.cuts[3].image
    points = eng.points.points(eng.state())
    assert [p.state.seq for p in points] == list(range(12, 0, -1))
    for p in points:
        with eng.open_view(p.state.key) as view:
            assert view.read(0, src.disk_size) == src.cuts[p.state.seq].image, p.id
            # Unaligned reads too.
            assert view.read(12345, 70000) == src.cuts[p.state.seq].image[12345 : 12345 + 70000]
    view3.close()


def test_retention_drops_and_merges(tmp_path: Path) -> None:
    """Dropping old points deletes files; thinning merges segments; kept points still read right."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    for _ in range(12):
        src.mutate(10)
        journal(store, replica, src.cut().body)
    eng.apply_pending()
    keep = {(1, 4), (1, 7), (1, 8), (1, 12)}
    pinned = eng.open_view((1, 10))  # an open export pins its point
    before = sum(p.stat().st_size for p in replica.points_dir.iterdir())
    dropped, merged = eng.points.apply_retention(keep)
    assert dropped == 4  # bases 0..3 (and so their segments) went
    ids = [p.state.seq for p in eng.points.points(eng.state())]
    assert ids == [12, 10, 8, 7, 4]
    assert merged > 0
    for seq in ids:
        with eng.open_view((1, seq)) as view:
            assert view.read(0, src.disk_size) == src.cuts[seq].image
    assert pinned.read(0, src.disk_size) == src.cuts[10].image
    pinned.close()
    after = sum(p.stat().st_size for p in replica.points_dir.iterdir())
    assert after < before
    # A restart sees exactly the same chain.
    eng.close()
    store2 = Store(store.root)
    r2 = store2.get(*replica.key)
    assert r2 is not None
    eng2 = engine(store2, r2)
    assert [p.state.seq for p in eng2.points.points(eng2.state())] == ids
    with eng2.open_view((1, 4)) as view:
        assert view.read(0, src.disk_size) == src.cuts[4].image


def initially_copied(tmp_path: Path) -> tuple[Store, FakeSource, Replica, ReplicaEngine]:
    """A replica with its engine and the FULL batch of a source's initial copy journaled."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    src.mutate(30)
    journal(store, replica, src.cut(full=True, all_blocks=True).body)
    return store, src, replica, eng


def test_full_batches_are_hidden_until_first_delta(tmp_path: Path) -> None:
    """Points after FULL (initial copy) batches are not listed; the first delta completes sync."""
    store, src, replica, eng = initially_copied(tmp_path)
    eng.apply_pending()
    assert sync_state(replica) == "in_progress"
    assert eng.points.points(eng.state()) == []
    src.mutate(3)
    journal(store, replica, src.cut().body)
    eng.apply_pending()
    assert sync_state(replica) == "complete"
    assert [p.state.seq for p in eng.points.points(eng.state())] == [2]
    assert image(replica) == bytes(src.image)


def test_undo_entries_are_left_out_of_the_garbage_collectors_walks(tmp_path: Path) -> None:
    """A disk's retained undo is hundreds of thousands of entries: made of ints only, the
    collector stops tracking them (entries naming their segment object were walked at every
    full collection, holding the GIL for tens of milliseconds), and views still read them."""
    store, src, replica, eng = initially_copied(tmp_path)
    images = []
    for _ in range(3):
        src.mutate(20)
        journal(store, replica, src.cut().body)
        images.append(bytes(src.image))
    eng.apply_pending()
    seg = eng.points.segment_for((1, 3))
    assert seg is not None
    entries = seg.entries
    assert entries
    with eng.points.open_view((1, 2), eng.state()) as view:
        view.attach_image(eng.image_fd)
        gc.collect()
        assert not [e for e in entries if gc.is_tracked(e)]
        overlay = view.overlay_in(0, src.disk_size)
        assert overlay
        assert not [e for e in overlay if gc.is_tracked(e)]
        assert view.read(0, src.disk_size) == images[0]
    eng.close()


def test_a_segment_in_memory_costs_little_more_than_its_index_on_disk(tmp_path: Path) -> None:
    """A loaded undo segment keeps its entries packed as in the file (32 bytes each): retained
    4 KiB undo runs to millions of entries per disk, at 188 bytes each as tuples in a list."""
    state = StateInfo(1, 1, 0, 0, False)
    writer = SegmentWriter(tmp_path, (1, 1), (1, 1))
    page = b"\x01" * 4096
    count = 20_000
    for i in range(count):
        writer.add_data(i * 8192, page)  # never adjacent: one entry each
    path = writer.finish(segment_meta((1, 1), state, state))
    tracemalloc.start()
    try:
        seg = UndoSegment.load(path)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seg is not None
    assert len(seg.entries) == count
    assert kept < 40 * count
    seg.release()


def test_torn_applied_log_line_is_cut(tmp_path: Path) -> None:
    """A half-written audit line (crash mid-append) means "not committed" and is removed."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    src.mutate()
    journal(store, replica, src.cut().body)
    eng.apply_pending()
    with replica.applied_log.open("ab") as fh:
        fh.write(b'{"generation":1,"seq":2')
    rec = replica.last_applied_record()
    assert rec is not None
    assert rec.seq == 1
    assert replica.applied_log.read_bytes().endswith(b"\n")
    assert len(replica.applied_records()) == 1
    os.sync()


def test_example_config_is_valid() -> None:
    """deploy/broker.example.toml passes validation as shipped."""
    from common.config import BrokerConfig, load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "deploy" / "broker.example.toml", BrokerConfig)
    assert cfg.broker.node == "b1"
    assert cfg.retention.any_point_minutes == 10
    assert cfg.retention.journal_bound == "100%"


def test_a_new_owner_takes_a_replica_over_only_after_its_write_section(tmp_path: Path) -> None:
    """A replica inside the old owner's write section is skipped by the new owner's load and
    loaded once the section ends; a section begun after the claim is refused."""
    old = make_store(tmp_path)
    replica = enable(old, FakeSource(disk_size=MiB))
    with old.writing(replica, EPOCH):
        new = Store(old.root, load=False)
        new.claim_epoch(EPOCH + 1, "node2")
        busy = new.load(wait=False)
        assert busy == [replica.path]
        assert new.get(*replica.key) is None
        assert new.load_replica(replica.path) is None
    taken = new.load_replica(replica.path)
    assert taken is not None
    assert taken.key == replica.key
    with pytest.raises(FencedError), old.writing(replica, EPOCH):
        pass


def test_allocation_cursor_matches_seek_data_walk(tmp_path: Path) -> None:
    """The undo capture's remembering hole/data walk reports the same runs as one
    SEEK_DATA/SEEK_HOLE walk per range, over a sparse file of random data and holes."""
    rng = random.Random(7)
    path = tmp_path / "sparse.img"
    size = 16 * MiB
    with path.open("wb") as fh:
        fh.truncate(size)
        for _ in range(60):
            at = rng.randrange(0, size // 4096) * 4096
            fh.seek(at)
            fh.write(rng.randbytes(4096 * rng.randint(1, 40))[: size - at])
    fd = os.open(path, os.O_RDONLY)
    try:
        cursor = AllocationCursor(fd)
        for _ in range(400):
            offset = rng.randrange(0, size // 512) * 512
            length = min(size - offset, rng.choice((512, 4096, 65536, 3 * MiB)))
            got = list(cursor.segments(offset, length))
            want = list(data_segments(fd, offset, length))
            # Either walk may split a run where the other does not: compare byte by byte.
            assert _allocated_bytes(got) == _allocated_bytes(want), (offset, length)
            assert sum(n for _s, n, _a in got) == length
    finally:
        os.close(fd)


def _allocated_bytes(runs: list[tuple[int, int, bool]]) -> set[int]:
    return {block for s, n, a in runs if a for block in range(s // 512, (s + n) // 512)}


def test_held_extents_stay_within_the_shared_budget() -> None:
    """Replicas together hold at most the budget of verified extent bytes; what does not fit is
    not held, and a replica's share comes back when it is taken, cleared or dropped."""
    budget = HeldBudget(10_000)
    a, b = HeldBatches(budget), HeldBatches(budget)
    assert a.put((1, 1), [], 6_000)
    assert not b.put((1, 1), [], 6_000)  # over the budget: the applier decodes the journal
    assert b.put((1, 1), [], 4_000)
    assert budget.used == 10_000
    assert a.take((1, 1)) == []
    assert a.take((1, 1)) is None
    assert budget.used == 4_000
    del b
    gc.collect()
    assert budget.used == 0


def test_applied_counters_come_back_from_the_audit_log_after_a_crash(tmp_path: Path) -> None:
    """An apply saves meta.json only when the initial sync's state changes: the audit line is
    the commit, and a restart brings meta's applied counters and sync state up to the log."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    journal(store, replica, src.cut(full=True, all_blocks=True).body)
    assert eng.apply_pending() == 1
    assert json.loads((replica.path / "meta.json").read_text())["initial_sync"] == "in_progress"
    for _ in range(3):
        src.mutate()
        journal(store, replica, src.cut().body)
    assert eng.apply_pending() == 3
    saved = json.loads((replica.path / "meta.json").read_text())
    assert saved["initial_sync"] == "complete"  # saved by the first delta batch
    assert saved["applied_seq"] == 2  # and not after the next two
    assert replica.meta.applied_seq == 4
    newest = src.cuts[4]
    # "kill -9": no close, nothing saved; a new broker loads the store.
    replica2 = Store(store.root).get(*replica.key)
    assert replica2 is not None
    m = replica2.meta
    assert (m.applied_seq, m.applied_cut_id, m.applied_cut_ns) == (4, 4, newest.cut_ns)
    assert (m.applied_full, m.initial_sync) == (False, "complete")
    assert json.loads((replica.path / "meta.json").read_text())["applied_seq"] == 4
    eng.close()
    assert engine(store, replica2).apply_pending() == 0
    assert replica2.image.read_bytes() == bytes(src.image)


def test_durable_counters_come_back_from_the_journal_after_a_crash(tmp_path: Path) -> None:
    """A durable batch's seq and cut are kept in memory only at the ack; after a crash the
    broker recovers them from its journal file's header, so the agent's resend is a duplicate
    and an older cut id is still refused."""
    store = make_store(tmp_path)
    src = FakeSource()
    replica = enable(store, src)
    eng = engine(store, replica)
    src.mutate()
    journal(store, replica, src.cut().body)
    eng.apply_pending()
    src.mutate()
    second = src.cut()
    journal(store, replica, second.body)
    saved = json.loads((replica.path / "meta.json").read_text())
    assert (saved["durable_seq"], saved["durable_cut_id"]) == (1, 1)  # no meta write at the ack
    eng.close()

    replica2 = Store(store.root).get(*replica.key)  # "restart"
    assert replica2 is not None
    m = replica2.meta
    assert (m.durable_seq, m.durable_cut_id, m.durable_cut_ns) == (2, 2, second.cut_ns)
    assert journal(store, replica2, second.body).duplicate
