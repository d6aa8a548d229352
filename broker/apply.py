"""Apply: turn durable journal files into replica data, exactly once, in order, crash-safely.

Per batch ``S`` (one worker thread per replica, in sequence order):

1. fence: the caller's owner epoch must not be older than the store's (invariant 7);
2. undo: save the image's current contents of every range ``S`` writes into an undo segment and
   fsync it, unless a complete segment for ``S`` exists already (a crash after this step: the
   image may be half written, so recapturing would save the wrong bytes);
3. publish the segment to open point views, *then* write the data: DATA by ``pwrite`` and read
   back against the batch's checksum, ZERO and TRIM by punching holes;
4. fdatasync the image, append ``S`` to ``applied.log`` (the commit), move meta's applied
   counters in memory (saved only when the initial sync's state changes: loading the replica
   brings them up to the log), delete the journal file.

A crash anywhere before 4 replays ``S`` from its journal file at the next start; steps 2-3 are
idempotent given the "capture once" rule, and the commit line is written exactly once, so the
audit proves every acked batch applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import structlog
import xxhash

from broker.ahead import AheadCapture
from broker.applied import applied_record
from broker.errors import ApplyVerifyError, BrokerError, FencedError, StoreCorrupt
from broker.journal import JournalEntry, clean_partials, read_journal
from broker.points import PointsIndex, StateInfo, written_segment
from broker.pointview import PointView
from broker.pools import APPLY, PREFETCH, run_in, submit_in
from broker.space import is_full
from broker.store import Replica, Store, journal_name
from broker.unbuffered import UnbufferedWriter
from broker.unchanged import Unchanged
from broker.undo import undo_size_bound
from broker.verified import HeldBatches
from common.fsio import prefetch, punch_hole, random_access, start_writeback
from common.heldio import may_hold, read_into, write_pages
from common.hrl import DEFAULT_LIMITS, BatchHeader, DecodeLimits, Extent, ExtentKind
from common.logs import get_logger

_log = get_logger("broker.apply")

Health = Literal["ok", "warning", "critical"]
_RETRY_MIN: Final = 0.2
# Start the image's writeback once this much was written since the last start: one call per
# 4 KiB extent was 40 % of applying a batch of 5,000 of them (issue 10, point 3).
WRITEBACK_BYTES: Final = 8 << 20
_RETRY_MAX: Final = 10.0


@dataclass
class Condition:
    """One reason a replica is not healthy, as status shows it."""

    code: str
    level: Health
    message: str
    since_ns: int = field(default_factory=time.time_ns)


AlertHook = Callable[[str, dict[str, Any]], None]
"""Called with (event, fields) when a condition is raised or cleared (for MQTT alerts)."""


SLOW_APPLY: Final = "REPLIKANT_TEST_SLOW_APPLY"
"""Test hook (docs/security.md): seconds to pause inside each apply's write section, after the
data is written and before the commit, so that a test can freeze an owner with work in hand.
Never set in production."""


def _prefetch_all(fd: int, ranges: list[tuple[int, int]]) -> None:
    # Best effort: after the engine closed, fd fails (EBADF, ignored) or names another of the
    # broker's files, which is then only read into memory.
    for offset, length in ranges:
        prefetch(fd, offset, length)


_READ_BACK: Final = 256 * 1024
_buffers = threading.local()  # each applier thread's read-back buffer


def digest_at(fd: int, offset: int, length: int, *, hold: bool) -> int:
    """xxh3-64 of ``length`` bytes of ``fd`` at ``offset`` as the page cache holds them (the
    bytes past the end of the file count as missing, so they never match). Read into the
    thread's buffer: hashed through an mmap of the image instead, each 4 KiB extent of a random
    batch faulted in a page of its own, 25 us an extent against 13 (issue 10)."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_READ_BACK)
    view = memoryview(buf)
    if length <= _READ_BACK:
        got = read_into(fd, buf, length, offset, hold=hold)
        return xxhash.xxh3_64_intdigest(view[:got])
    hasher = xxhash.xxh3_64()
    for pos in range(offset, offset + length, _READ_BACK):
        n = min(_READ_BACK, offset + length - pos)
        got = read_into(fd, buf, n, pos, hold=hold)
        hasher.update(view[:got])
        if got < n:
            break
    return hasher.intdigest()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _fault_slow_apply(log: structlog.stdlib.BoundLogger, seq: int) -> None:
    delay = os.environ.get(SLOW_APPLY)
    if delay:
        log.warning("apply_slowed_for_test", seq=seq, seconds=float(delay), hook=SLOW_APPLY)
        time.sleep(float(delay))


def applied_state(replica: Replica) -> StateInfo:
    """The replica's committed state as a point description."""
    m = replica.meta
    return StateInfo(
        generation=m.applied_generation,
        seq=m.applied_seq,
        cut_ns=m.applied_cut_ns,
        consistency=m.applied_consistency,
        full=m.applied_full,
        cut_id=m.applied_cut_id,
        first_change_cut=m.applied_first_change_cut,
    )


class ReplicaEngine:
    """Everything live about one replica: its points index, image descriptor, applier and health.

    ``epoch`` is read on every apply (a callable, so an ownership change takes effect at once).
    """

    def __init__(
        self,
        store: Store,
        replica: Replica,
        *,
        epoch: Callable[[], int],
        limits: DecodeLimits = DEFAULT_LIMITS,
        alert: AlertHook | None = None,
    ) -> None:
        self.store = store
        self.replica = replica
        self.log = _log.bind(vm=replica.meta.vm_name, disk=replica.meta.disk_id)
        self.epoch = epoch
        self.limits = limits
        self.alert = alert
        self.points = PointsIndex(replica.points_dir)
        self.journal_bound = replica.meta.disk_size
        """Most bytes of recovery-point data (the service sets it from ``[retention]``)."""
        self.over_bound = 0
        """Bytes over the bound the last capture could not free: exports' pins, or a batch
        whose undo alone is larger than the bound."""
        self.conditions: dict[str, Condition] = {}
        # The agent's newest "unchanged since" statement (broker.current): memory only.
        self.current: Unchanged | None = None
        self._cond_lock = threading.Lock()
        self.ingest_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._fd = os.open(replica.image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        # No read-ahead through this descriptor: point-in-time exports read the image through
        # it, and a client reading one end to end (a restore) would otherwise leave the image
        # in the page cache as large folios, where each later 4 KiB apply costs ~10x the kernel
        # time (docs/bench.md). Explicit prefetches (the undo capture's) still read ahead.
        random_access(self._fd)
        self._hold = may_hold(self._fd)  # writes and read-backs keep the GIL (decision 016)
        self.apply_lock = threading.Lock()
        self.held = HeldBatches()
        """Verified extents of durable batches, handed over by the ingest (decision 014)."""
        self._stopping = False
        self._ahead: AheadCapture | None = None  # the next batch's undo, captured as it streams in
        self._ahead_lock = threading.Lock()
        self._unflushed = 0  # bytes written since writeback was last started
        self._task: asyncio.Task[None] | None = None
        removed = clean_partials(replica)
        if removed:
            _log.info("journal_partials_removed", replica=replica.label, count=removed)
        self.points.load(applied_state(replica))

    @property
    def image_fd(self) -> int:
        """The replica image's descriptor (read-write; readers only pread)."""
        return self._fd

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Have these ranges of the image read into memory soon, without waiting (best effort):
        on a thread of their own, as asking the kernel costs a few microseconds a range."""
        submit_in(PREFETCH, _prefetch_all, self._fd, ranges)

    def start_ahead(self, header: BatchHeader) -> AheadCapture | None:
        """An undo capture of ``header``'s batch to run while it streams in (broker/ahead.py),
        or None. Only for the batch next to apply with nothing durable before it, taken while
        the applier is idle: then the image does not change until that batch's own apply, since
        the upload holds the ingest lock (so no other batch becomes durable, and a handover,
        which takes it too, cannot roll the image back) and a FULL batch, the only one written
        while it streams in, is not captured."""
        key = (header.generation, header.seq)
        if header.full or self._stopping or not self.apply_lock.acquire(blocking=False):
            return None
        try:
            if (
                key != self.next_key()
                or self.backlog()
                or self.points.segment_for(key) is not None
                or (self.replica.journal_dir / journal_name(*key)).exists()
            ):
                return None
            capture = AheadCapture(self.points, self.journal_bound, self._fd, self.state().key, key)
            with self._ahead_lock:
                stale, self._ahead = self._ahead, capture
        finally:
            self.apply_lock.release()
        if stale is not None:
            self._forget(stale)
        return capture

    def drop_ahead(self, capture: AheadCapture | None = None) -> None:
        """Discard ``capture`` if it is still the engine's (default: whichever is)."""
        with self._ahead_lock:
            if capture is None:
                capture = self._ahead
            if capture is None or capture is not self._ahead:
                return
            self._ahead = None
        self._forget(capture)

    def _forget(self, capture: AheadCapture) -> None:
        """Discard a capture no apply takes over, and give back the room it reserved."""
        capture.discard()
        self.points.release(capture.reserved)

    def _take_ahead(
        self, base: StateInfo, top: StateInfo, ranges: list[tuple[int, int]]
    ) -> tuple[AheadCapture | None, int]:
        """The batch's capture if the ingest made one ahead and it is usable, and the room any
        capture ahead reserved (handed over to the apply, usable or not)."""
        with self._ahead_lock:
            capture, self._ahead = self._ahead, None
        if capture is None:
            return None, 0
        why = capture.unusable(base, top, ranges)
        if why is not None:
            capture.discard()
            self.log.warning("undo_ahead_dropped", seq=top.seq, reason=why)
            return None, capture.reserved
        return capture, capture.reserved

    # -- health
    def raise_condition(
        self, code: str, level: Health, message: str, *, fix: str, **fields: Any
    ) -> None:
        """Mark the replica unhealthy for ``code`` (idempotent) and fire the alert hook once;
        ``fix`` tells the operator what to do (every alert names one)."""
        with self._cond_lock:
            fresh = code not in self.conditions
            self.conditions[code] = Condition(code, level, message)
        if fresh:
            self.log.error(
                "replica_alert",
                condition=code,
                level=level,
                detail=message,
                fix=fix,
                **fields,
            )
            if self.alert is not None:
                self.alert(
                    "alert_raised",
                    {
                        "replica": self.replica.label,
                        "condition": code,
                        "level": level,
                        "message": message,
                        "fix": fix,
                        **fields,
                    },
                )

    def clear_condition(self, code: str) -> None:
        """The condition is over (e.g. space came back)."""
        with self._cond_lock:
            gone = self.conditions.pop(code, None)
        if gone is not None:
            self.log.info(
                "replica_alert_cleared",
                condition=code,
            )
            if self.alert is not None:
                self.alert("alert_cleared", {"replica": self.replica.label, "condition": code})

    def health(self) -> Health:
        """The worst current condition, or ``"ok"``."""
        with self._cond_lock:
            levels = {c.level for c in self.conditions.values()}
        if "critical" in levels:
            return "critical"
        return "warning" if levels else "ok"

    # -- state
    def state(self) -> StateInfo:
        """The committed state."""
        return applied_state(self.replica)

    def next_key(self) -> tuple[int, int]:
        """The batch the applier needs next."""
        m = self.replica.meta
        if m.applied_generation == m.generation:
            return m.generation, m.applied_seq + 1
        return m.generation, 1

    def backlog(self) -> int:
        """Durable batches not yet applied."""
        m = self.replica.meta
        applied = m.applied_seq if m.applied_generation == m.generation else 0
        return max(0, m.durable_seq - applied)

    # -- applying
    def apply_pending(self) -> int:
        """Apply every durable batch that is next in order; returns how many (blocking)."""
        n = 0
        while not self._stopping and self.apply_next():
            n += 1
        return n

    def apply_next(self) -> bool:
        """Apply the next batch if its journal file is there (blocking); False if none."""
        gen, seq = self.next_key()
        path = self.replica.journal_dir / journal_name(gen, seq)
        if not path.exists():
            self._drop_stale_journal()
            return False
        self.apply_one(read_journal(path, self.limits))
        return True

    def _apply_step(self) -> bool:
        """Apply the next batch if its journal file is there; True if the one after it is
        there too. Most of the time it is not: the loop then waits for the next wake without
        another hop that would only scan the journal directory and find nothing."""
        if not self.apply_next():
            return False
        gen, seq = self.next_key()
        return (self.replica.journal_dir / journal_name(gen, seq)).exists()

    def _drop_stale_journal(self) -> None:
        """Remove journal files already applied (a crash between commit and unlink)."""
        m = self.replica.meta
        for path in self.replica.journal_dir.glob("*.hrl"):
            name = path.name.removesuffix(".hrl")
            gen, _, seq = name.partition("-")
            if (
                gen.isdigit()
                and seq.isdigit()
                and (int(gen), int(seq))
                <= (
                    m.applied_generation,
                    m.applied_seq,
                )
            ):
                path.unlink(missing_ok=True)

    def apply_one(self, entry: JournalEntry) -> None:
        """Apply one durable batch (steps 1-4 of the module docstring)."""
        with self.apply_lock:
            self._apply_locked(entry)

    def _apply_locked(self, entry: JournalEntry) -> None:
        r = self.replica
        if entry.key != self.next_key():
            if entry.key <= (r.meta.applied_generation, r.meta.applied_seq):
                entry.path.unlink(missing_ok=True)
                self.held.drop_through(entry.key)
                return
            raise StoreCorrupt(
                f"journal of {r.label} holds batch {entry.key} but the next to apply is "
                f"{self.next_key()}"
            )
        epoch = self.epoch()
        # 1. fence: the whole apply is one write section (adopts a higher epoch before writing).
        with self.store.writing(r, epoch):
            self._apply_fenced(entry, epoch)

    def _apply_fenced(self, entry: JournalEntry, epoch: int) -> None:
        r = self.replica
        h = entry.header
        base = self.state()
        top = StateInfo(
            h.generation,
            h.seq,
            h.cut_time_ns,
            int(h.consistency),
            h.full,
            cut_id=h.cut_id,
            first_change_cut=h.first_change_cut,
        )
        started = time.perf_counter()
        ahead = False
        seg = self.points.segment_for(top.key)
        if seg is None:  # 2. undo, exactly once per batch, within the disk's bound
            ranges = entry.ranges()
            capture, held = self._take_ahead(base, top, ranges)
            needed = undo_size_bound(ranges)
            with self.points.room_for(needed, self.journal_bound, held) as over:
                self.over_bound = over
                if over and not self.points.pinned():  # this batch's undo alone is too big
                    if capture is not None:
                        capture.discard()
                    seg = self.points.capture_marker(base, top)
                elif capture is not None:
                    seg, ahead = written_segment(capture.seal(base, top)), True
                else:
                    seg = self.points.capture(self._fd, ranges, base, top)
                self.points.publish(seg)  # 3. views take the undo before the image changes
        else:
            # A crash came after the capture: the image may hold part of this batch already.
            self.log.info("undo_reused", seq=h.seq)
            self.drop_ahead()
            self.points.publish(seg)
        captured = time.perf_counter()
        for ext in self._extents_of(entry):
            self.write_extent(ext, ext_seq=h.seq)
        written = time.perf_counter()
        os.fdatasync(self._fd)
        synced = time.perf_counter()
        _fault_slow_apply(self.log, h.seq)
        self.store.check_epoch(epoch, r)  # a takeover during the writes must not be committed over
        # 4. commit: the audit line is the single point where the batch becomes applied.
        r.commit_applied(applied_record(h, epoch))
        entry.path.unlink(missing_ok=True)
        self.log.info(
            "batch_applied",
            seq=h.seq,
            generation=h.generation,
            epoch=epoch,
            extents=len(entry.extents),
            undo_bytes=seg.size_bytes,
            # Where a slow apply spends its time: the undo capture reads the image's old bytes.
            undo_ms=_ms(captured - started),
            undo_ahead=ahead,
            write_ms=_ms(written - captured),
            sync_ms=_ms(synced - written),
            ms=_ms(time.perf_counter() - started),
        )

    def _extents_of(self, entry: JournalEntry) -> Iterable[Extent]:
        """The batch's verified extents as the ingest held them, else decoded from its journal
        file; held ones must list exactly the ranges of the file's index (decision 014)."""
        held = self.held.take(entry.key)
        self.held.drop_through(entry.key)
        if held is not None and [(e.offset, e.length, e.kind) for e in held] == entry.extents:
            return held
        return entry.iter_extents(self.limits)

    def write_extent(
        self, ext: Extent, *, ext_seq: int | None, unbuffered: UnbufferedWriter | None = None
    ) -> None:
        """Write one verified extent to the image; DATA is read back against its checksum.

        With ``unbuffered`` (the initial copy), what it can take skips the page cache and is
        read back from the disk."""
        fd = self._fd
        if ext.kind is not ExtentKind.DATA:
            punch_hole(fd, ext.offset, ext.length)
            return
        assert ext.data is not None
        digest = unbuffered.write(ext.offset, ext.data) if unbuffered is not None else None
        if digest is None:
            write_pages(fd, ext.data, ext.offset, hold=self._hold)
            self._unflushed += ext.length
            if self._unflushed >= WRITEBACK_BYTES:
                self._unflushed = 0
                start_writeback(fd, 0, 0)  # every dirty page of the image, in one call
            digest = digest_at(fd, ext.offset, ext.length, hold=self._hold)
        if digest != ext.checksum:
            r = self.replica
            raise ApplyVerifyError(
                f"replica {r.label}: data read back at offset {ext.offset} ({ext.length} bytes) "
                f"after applying batch {ext_seq} does not match the batch's checksum",
                fix="the store's disk or memory corrupts writes; check it, then "
                "`replikant verify --repair`",
                details={"offset": ext.offset, "length": ext.length, "seq": ext_seq},
            )

    # -- the async loop
    def wake(self) -> None:
        """A new batch is durable: apply it soon."""
        self._wake.set()

    def start(self) -> None:
        """Start the background apply loop (replays the journal first); again after :meth:`stop`
        (an owner that stepped down and is elected again)."""
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"apply-{self.replica.label}"
        )
        self._wake.set()

    async def _run(self) -> None:
        delay = _RETRY_MIN
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                # One batch per thread hop, so that waiters see progress batch by batch.
                while not self._stopping and await run_in(APPLY, self._apply_step):
                    async with self._progress:
                        self._progress.notify_all()
                async with self._progress:
                    self._progress.notify_all()  # batches applied while streaming in, too
            except FencedError as exc:
                self.raise_condition(
                    "fenced",
                    "critical",
                    exc.message,
                    fix=exc.fix or "another broker owns this store now; send batches to it",
                )
                return  # a deposed owner stops applying for good
            except OSError as exc:
                if is_full(exc):
                    self.raise_condition(
                        "storage_full",
                        "critical",
                        f"store {self.store.root} is full: applying to {self.replica.label} "
                        "waits for space",
                        fix="free space on the store's file system; applying resumes by itself",
                    )
                else:
                    self.raise_condition(
                        "apply_failed",
                        "critical",
                        f"apply failed: {exc}",
                        fix="check the store's disk and the broker log; the broker retries",
                    )
                await self._retry_later(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            except BrokerError as exc:
                self.raise_condition(
                    "apply_failed",
                    "critical",
                    exc.message,
                    fix=exc.fix or "check the broker log's apply events; the broker retries",
                )
                await self._retry_later(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            delay = _RETRY_MIN
            for code in ("storage_full", "apply_failed"):
                self.clear_condition(code)

    async def _retry_later(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.set()

    async def stop(self) -> None:
        """Finish the batch being applied, then stop (graceful shutdown)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_for_state(self, key: tuple[int, int]) -> None:
        """Wait until the applied state reaches ``key`` (wrap in ``asyncio.timeout``)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.state().key >= key)

    async def wait_for_cut(self, cut: tuple[int, int]) -> None:
        """Wait until the applied state reaches VM cut ``cut`` ``(generation, cut_id)``: a
        disk's batches carry growing cut ids, so it then has its state at that cut, if any."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.state().cut >= cut)

    # -- reading points
    def open_view(self, key: tuple[int, int] | None = None) -> PointView:
        """A copy-free reader of the disk as of point ``key`` (default: newest applied state)."""
        # No lock against the applier needed: a batch's undo is published before the state
        # moves past it, so a view of a state read a moment ago still gets every later undo.
        state = self.state()
        view = self.points.open_view(key if key is not None else state.key, state)
        view.attach_image(self._fd)
        return view

    async def close_when_idle(self) -> None:
        """Close (after :meth:`stop`) once no upload uses the engine's descriptors: an upload in
        flight ends by itself (completed, or dropped when idle), and whatever it would write
        meanwhile is refused by the fence. The lock stays taken: nothing uses a closed engine."""
        await self.ingest_lock.acquire()
        self.close()

    def close(self) -> None:
        """Release descriptors (after :meth:`stop`)."""
        self.drop_ahead()  # its reads use the descriptor
        self.held.clear()
        self.points.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
