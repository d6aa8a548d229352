"""A batch's undo captured while it streams in (broker/ahead.py): the applier keeps it only when
it is exactly the batch's undo on the state it applies to, and every point still reads as the
source did at its cut."""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from broker.ahead import UploadUndo
from broker.apply import ReplicaEngine
from broker.journal import BatchReceiver, Receipt
from broker.store import Replica, Store
from tests.support_broker import FakeSource, MiB
from tests.test_broker_store import enable, engine, image, journal, make_store, receiver


def upload(
    store: Store, replica: Replica, eng: ReplicaEngine, body: bytes, *, parts: int = 6
) -> tuple[BatchReceiver, UploadUndo]:
    """Feed ``body`` as the ingest does, in ``parts`` feeds, each told to ``UploadUndo``."""
    undo = UploadUndo(eng)
    rx = receiver(store, replica, held=eng.held, ahead=undo)
    step = -(-len(body) // parts)
    for i in range(0, len(body), step):
        part = body[i : i + step]
        rx.feed_many([part[j : j + 7000] for j in range(0, len(part), 7000)])
    return rx, undo


def replicated(
    tmp_path: Path, *, disk: int = 4 * MiB, seed: int = 1, bound: int = 1 << 40
) -> tuple[Store, FakeSource, Replica, ReplicaEngine]:
    """A replica of a disk with 4 KiB tracking blocks after its initial copy."""
    store = make_store(tmp_path)
    src = FakeSource(disk_size=disk, block_size=4096, seed=seed)
    replica = enable(store, src)
    eng = engine(store, replica, bound=bound)
    src.mutate(100)
    journal(store, replica, src.cut(full=True, all_blocks=True).body)
    eng.apply_pending()
    return store, src, replica, eng


def ship(store: Store, src: FakeSource, replica: Replica, eng: ReplicaEngine, writes: int) -> None:
    """Guest writes, then their batch uploaded and applied."""
    src.mutate(writes)
    rx, _undo = upload(store, replica, eng, src.cut().body)
    rx.finish()
    assert eng.apply_pending() == 1


def applied_events(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "batch_applied"]


def size_of(path: Path) -> int:
    """A file's size, 0 if it went meanwhile (dropped for room)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tmp_files(replica: Replica) -> list[str]:
    return sorted(p.name for p in replica.points_dir.glob("*.tmp"))


def test_the_undo_read_while_a_batch_streams_in_is_the_one_its_point_reads(
    tmp_path: Path,
) -> None:
    store, src, replica, eng = replicated(tmp_path, disk=8 * MiB)
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            ship(store, src, replica, eng, writes=200)
    assert [e["undo_ahead"] for e in applied_events(logs)] == [True] * 4
    assert not [e for e in logs if e["event"] == "undo_ahead_dropped"]
    assert image(replica) == bytes(src.image)
    for seq in range(1, 5):
        with eng.open_view((1, seq)) as view:
            assert view.read(0, src.disk_size) == src.cuts[seq].image, seq
    assert tmp_files(replica) == []
    eng.close()


def test_a_failed_upload_takes_its_capture_along_and_the_retry_captures_again(
    tmp_path: Path,
) -> None:
    store, src, replica, eng = replicated(tmp_path)
    src.mutate(150)
    body = src.cut().body
    rx, undo = upload(store, replica, eng, body[: len(body) // 2], parts=3)
    assert tmp_files(replica) != []  # its capture had begun
    rx.abort()
    undo.drop()  # what the ingest's _abandon does
    assert tmp_files(replica) == []
    with structlog.testing.capture_logs() as logs:
        rx, _undo = upload(store, replica, eng, body)
        rx.finish()
        assert eng.apply_pending() == 1
    assert [e["undo_ahead"] for e in applied_events(logs)] == [True], logs
    with eng.open_view((1, 1)) as view:
        assert view.read(0, src.disk_size) == src.cuts[1].image
    assert image(replica) == bytes(src.image)
    eng.close()


def test_a_capture_that_is_not_the_batchs_undo_is_dropped_and_the_applier_captures(
    tmp_path: Path,
) -> None:
    store, src, replica, eng = replicated(tmp_path)
    src.mutate(150)
    cut = src.cut()
    capture = eng.start_ahead(src.header(1, 4096))
    assert capture is not None
    capture.add([(0, 4096)])  # not the ranges the batch will write
    receipt: Receipt = journal(store, replica, cut.body)
    assert not receipt.duplicate
    with structlog.testing.capture_logs() as logs:
        assert eng.apply_pending() == 1
    dropped = [e for e in logs if e["event"] == "undo_ahead_dropped"]
    assert len(dropped) == 1
    assert "other ranges" in str(dropped[0]["reason"])
    assert dropped[0]["log_level"] == "warning"
    assert [e["undo_ahead"] for e in applied_events(logs)] == [False]
    with eng.open_view((1, 1)) as view:
        assert view.read(0, src.disk_size) == src.cuts[1].image
    assert image(replica) == bytes(src.image)
    assert tmp_files(replica) == []
    eng.close()


def test_no_capture_ahead_while_an_earlier_batch_waits_to_be_applied(tmp_path: Path) -> None:
    store, src, replica, eng = replicated(tmp_path)
    src.mutate(80)
    journal(store, replica, src.cut().body)  # durable, not applied: batch 3 must wait for it
    src.mutate(80)
    with structlog.testing.capture_logs() as logs:
        rx, _undo = upload(store, replica, eng, src.cut().body)
        assert tmp_files(replica) == []
        rx.finish()
        assert eng.apply_pending() == 2
    assert [e["undo_ahead"] for e in applied_events(logs)] == [False, False]
    for seq in (1, 2):
        with eng.open_view((1, seq)) as view:
            assert view.read(0, src.disk_size) == src.cuts[seq].image
    assert image(replica) == bytes(src.image)
    eng.close()


def test_closing_the_engine_removes_a_capture_in_progress(tmp_path: Path) -> None:
    store, src, replica, eng = replicated(tmp_path)
    src.mutate(150)
    body = src.cut().body
    upload(store, replica, eng, body[: len(body) // 2], parts=3)[0].abort()
    assert tmp_files(replica) != []
    eng.close()
    assert tmp_files(replica) == []


def test_a_capture_ahead_counts_against_the_disks_bound_from_its_first_byte(
    tmp_path: Path,
) -> None:
    """A 2 MiB bound on a 4 MiB disk: while each batch streams in, its capture ahead and the
    points kept stay within the bound together (older points make room, as at apply), and every
    point kept reads as the source did."""
    bound = 2 * MiB
    store, src, replica, eng = replicated(tmp_path, seed=3, bound=bound)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # the folder as a reader of the disk would see it, all along
        while not done.is_set():
            samples.append(sum(size_of(p) for p in replica.points_dir.iterdir()))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(12):
                ship(store, src, replica, eng, writes=15)
    finally:
        done.set()
        sampler.join()
    peak = max(samples)
    assert peak <= bound
    assert any(e["event"] == "undo_dropped" for e in logs)  # the bound made room
    assert [e["undo_ahead"] for e in applied_events(logs)] == [True] * 12
    for point in eng.points.points(eng.state()):
        with eng.open_view(point.state.key) as view:
            assert view.read(0, src.disk_size) == src.cuts[point.state.seq].image
    eng.close()
