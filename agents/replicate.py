"""Replication of one disk: the initial copy, hash-compare resync, shipping, and status.

Sequencing (so that resends are harmless, see ``docs/agent.md``) is decided by the sans-I/O
:class:`agents.sequence.Sequencer`; this class does the I/O around it:

- the broker's ``durable_seq`` is the truth. Before the first batch and after *any* failed
  upload, the replicator asks the broker for the replica's state and numbers the next batch
  ``durable_seq + 1``;
- a batch that was not acked is merged back into the active map (its copies dropped) and goes
  again, with whatever changed since, in the next batch. If it was in fact durable (the ack was
  lost), the re-sent blocks simply apply again on top: same contents or newer;
- persisted state changes only after a durable ack.

Modes (:class:`agents.sequence.Mode`): ``initial`` ships the whole disk as FULL batches of at
most ``full_batch_bytes`` of allocated data each (sized by the copy's rate unless set:
:func:`full_batch_size`; holes skipped, zero blocks sent as ZERO extents), resumable from the
last acked chunk; ``verify`` compares block hashes with the replica and marks only the differing
blocks (when tracking cannot vouch for every change, or to seed from an existing copy);
``delta`` ships what the dirty map says; ``awaiting_seed`` ships nothing: the disk waits for
seed media (``replikant seed export``/``import``, see :mod:`agents.seed`) to reach the broker,
its dirty map tracking every change since the export's cut.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agents import resync
from agents.body import MAX_EXTENT, BatchStats, batch_body, make_header
from agents.cut import Cut
from agents.dirtymap import BlockMap, Recovery
from agents.disk import TrackedExport
from agents.errors import FencedError, ShipError
from agents.sequence import Mode, SequenceError, Sequencer
from agents.ship import Ack, BrokerClient, ReplicaState, TokenBucket
from agents.shiploop import Uploader
from agents.state import DiskState, write_state
from common.config import DiskConfig, Policy, VMConfig
from common.fsio import data_extents
from common.hrl import Compression, Consistency
from common.logs import get_logger
from common.regions import Region

FULL_BATCH_BYTES = 256 * 1024 * 1024
"""Allocated data in the first FULL batch of a copy, and in each one where copying is slow."""
FULL_BATCH_MAX = 1024 * 1024 * 1024
"""What a FULL batch grows to at most where copying is fast (:data:`FULL_BATCH_SECONDS`)."""
FULL_BATCH_SECONDS = 2.0
"""A FULL batch is sized to about this long at the rate of the one before: every batch ends with
the broker's fdatasync and the pipeline starting again (~100 ms on loopback), which cost a 4 GiB
copy at 256 MiB a batch about a tenth of its time; bounded in time, a batch still resends little
after an interruption and the progress still moves every few seconds."""


def full_batch_size(rate: float) -> int:
    """Allocated bytes for the next FULL batch after one that copied ``rate`` bytes a second."""
    return int(min(FULL_BATCH_MAX, max(FULL_BATCH_BYTES, rate * FULL_BATCH_SECONDS)))


# Refusals only an operator can lift (the broker refuses this agent's identity, or its
# generation until `replikant replica rebind / set-generation`): no retry succeeds until a
# configuration changes, so they are errors, retried only this often.
REFUSED_CODES = frozenset({"not_authorised", "wrong_identity", "generation_ahead"})
REFUSAL_RETRY = 60.0
# A request to the broker unanswered this long shows in status as the disk's error: in a network
# black hole nothing fails for minutes (the ack timeout), yet the operator must see it at once.
STALL_SECONDS = 15.0


@dataclass
class DiskStatus:
    """Counters for the status endpoint."""

    last_cut_ns: int = 0
    last_acked_seq: int = 0
    last_acked_cut_ns: int = 0
    batches: int = 0
    bytes_shipped: int = 0  # encoded bytes acked
    throughput_bps: float = 0.0  # of the last batch, encoded bytes per second
    errors: int = 0
    last_error: str | None = None
    last_error_ns: int = 0
    full_batches: int = 0
    hashed_bytes: int = 0  # read and hashed locally by resyncs (reverse: only mapped regions)
    extra: dict[str, Any] = field(default_factory=dict)


class DiskReplicator:
    """Replicates one tracked disk of one VM to the broker."""

    def __init__(
        self,
        *,
        vm: VMConfig,
        disk: DiskConfig,
        export: TrackedExport,
        policy: Policy,
        client: BrokerClient,
        state_path: Path,
        recovery: Recovery,
        site: str,
        host: str,
        bucket: TokenBucket | None = None,
        full_batch_bytes: int | None = None,
        max_extent: int = MAX_EXTENT,
        uploader: Uploader | None = None,
    ) -> None:
        self.vm = vm
        self.uploader = uploader  # uploads on the shipping loop (decision 025); None: this loop
        self.disk = disk
        self.export = export
        self.policy = policy
        self.client = client
        self.state_path = state_path
        self.recovery = recovery
        self.site = site
        self.host = host
        self.bucket = bucket
        self.full_batch_bytes = full_batch_bytes  # None: sized by the copy's rate
        self._full_bytes = FULL_BATCH_BYTES  # the next FULL batch's size when sized by rate
        self.max_extent = max_extent
        self.log = get_logger("agents.replicate", vm=vm.name, disk=disk.id)
        self.state = DiskState.load(state_path)
        self.ready = False
        self.fenced: str | None = None
        # Called once the broker shows the VM was failed over (a newer generation): the agent
        # then fences the VM's exports and persists it (decision 041).
        self.on_fenced: Callable[[DiskReplicator, str, str], None] | None = None
        self.refused: str | None = None  # the broker refuses this agent (403): config must change
        self.refused_until = 0.0  # monotonic time of the next attempt while refused
        self.seq = Sequencer(export.map.guest_ops)
        self._chunk_end = 0
        self.status = DiskStatus()
        self.on_progress: Callable[[DiskReplicator, int, int], None] | None = None
        self._initial_mark: tuple[float, int] | None = None
        self._completing = False  # the initial copy just ended: cut again without waiting
        self.seed_export: dict[str, Any] | None = None  # progress while an export writes media
        self._seed_restore: BlockMap | None = None  # the dirty blocks pending before that cut
        self._waiting: tuple[float, str] | None = None  # (monotonic start, what) of a request
        if self.state is not None:
            self.status.last_acked_seq = self.state.acked_seq
            self.status.last_acked_cut_ns = self.state.last_cut_ns

    @property
    def mode(self) -> Mode:
        """What the next batch of this disk is."""
        return self.seq.mode

    @property
    def broker_cut_id(self) -> int:
        """The newest VM cut the broker holds durably for this disk."""
        return self.seq.broker_cut_id

    # -- talking to the broker -------------------------------------------------------------

    def _enable_body(self) -> dict[str, Any]:
        return {
            "vm_name": self.vm.name,
            "disk_size": self.export.size,
            "block_size": self.export.block_size,
            "generation": self.state.generation if self.state else 1,
            "site": self.site,
            "host": self.host,
            "labels": dict(self.vm.labels),
            "rpo_seconds": self.policy.rpo_seconds,
        }

    async def prepare(self) -> None:
        """Announce the disk (PUT), learn the replica's state and choose the mode.

        Called before the first batch and again after every failure; raises :class:`ShipError`.
        """
        self._waiting = (time.monotonic(), "announcing the disk (PUT)")
        try:
            rs = await self.client.enable(self.vm.uuid, self.disk.id, self._enable_body())
        except ShipError as exc:
            if exc.code in REFUSED_CODES:
                self.refuse(exc)
            if exc.code == "stale_generation":  # the VM was failed over (others: refusals)
                self.fence(str(exc), exc.code)
            raise
        finally:
            self._waiting = None
        if self.refused is not None:
            self.log.info("replication_accepted", previously=self.refused)
            self.refused = None
        await self._adopt(rs)
        self.ready = self.mode is not Mode.AWAITING_SEED

    def fence(self, reason: str, code: str | None) -> None:
        """Stop replicating this disk until an operator acts (``code`` says why: a newer
        generation at the broker, ``stale_generation``, means the VM was failed over)."""
        self.fenced = reason
        if self.on_fenced is not None:
            self.on_fenced(self, reason, code or "")

    def record_error(self, exc: ShipError) -> None:
        """Count a failure and show it in status until the next durable ack."""
        self.status.errors += 1
        self.status.last_error = str(exc)
        self.status.last_error_ns = time.time_ns()

    def refuse(self, exc: ShipError) -> None:
        """The broker refused this agent (403): an error, not retried before ``REFUSAL_RETRY``."""
        self.ready = False
        self.refused = str(exc)
        self.refused_until = time.monotonic() + REFUSAL_RETRY
        self.status.last_error = str(exc)
        self.status.last_error_ns = time.time_ns()
        self.log.error(
            "replication_refused",
            error=exc.message,
            fix=exc.fix,
            code=exc.code,
            retry_seconds=REFUSAL_RETRY,
        )

    async def _adopt(self, rs: ReplicaState) -> None:
        local = self.state
        self.seq.broker_holds(rs.durable_cut_id)
        if rs.disk_size and rs.disk_size != self.export.size:
            raise FencedError(
                f"replica of {self.vm.name}/{self.disk.id} has size {rs.disk_size}, the disk "
                f"has {self.export.size}",
                fix="resize the replica at the recovery site or re-enable replication",
                code="identity_conflict",
            )
        if local is not None and rs.generation > local.generation:
            self.fenced = (
                f"the replica is at generation {rs.generation}, this disk at {local.generation}: "
                "the VM was failed over"
            )
            self.fence(self.fenced, "stale_generation")
            raise FencedError(self.fenced, fix="reverse replication", code="stale_generation")
        if local is not None and local.seed_seq:
            if rs.durable_seq in (0, local.seed_base_seq):
                self._await_seed(local, rs)  # the media has not been imported yet
                return
            local = self._seed_arrived(local, rs)
        elif (
            self.policy.initial_copy == "media"
            and rs.durable_seq == 0
            and rs.initial_sync == "pending"
        ):
            fresh = DiskState(str(self.vm.uuid), self.disk.id, self.export.size, rs.generation)
            self._await_seed(local or fresh, rs)  # no network copy: `replikant seed export` it
            return
        previous_mode = self.mode
        seeded = rs.initial_sync == "seeded" and rs.durable_seq == 0
        regions: list[Region] | None = None
        if rs.durable_seq == 0 and not seeded:
            # Nothing durable at the broker: (re)start the initial copy from the beginning.
            if local is None or local.acked_seq or local.initial_done or local.verify_pending:
                local = DiskState(str(self.vm.uuid), self.disk.id, self.export.size, rs.generation)
            mode = Mode.INITIAL
        elif (
            seeded
            or local is None
            or self.recovery.tracking_lost
            or local.verify_pending
            or local.acked_seq > rs.durable_seq
        ):
            if seeded:
                regions, why = self._reverse_regions()
            elif local is None:
                why = "no local replication state for a replica that has data"
            elif local.verify_pending:
                why = "a hash comparison was interrupted"
            else:
                why = self.recovery.tracking_lost or "the replica is behind what it acked"
            local = DiskState(
                str(self.vm.uuid),
                self.disk.id,
                self.export.size,
                rs.generation,
                acked_seq=rs.durable_seq,
                initial_done=True,
                initial_cursor=self.export.size,
                verify_pending=True,
            )
            # Recorded before comparing: a crash in the middle must compare again, since the
            # dirty map alone does not know the differences not found yet.
            local.save(self.state_path)
            mode = Mode.VERIFY
            if regions is None:
                self.log.warning("resync_by_hashes", reason=why, durable_seq=rs.durable_seq)
        else:
            mode = Mode.DELTA if local.initial_done else Mode.INITIAL
        self.state = local
        self.seq.adopt(mode, rs.durable_seq)
        if mode is Mode.VERIFY:
            self.seq.unknown_changes()  # the differences found have no known age
            self.status.hashed_bytes += await resync.compare(
                self.client, self.export, self.vm.uuid, self.disk.id, self.log, regions
            )
            self.seq.adopt(Mode.DELTA, rs.durable_seq)
            self.recovery = Recovery(
                fresh=False, clean=True, recovered_blocks=0, tracking_lost=None
            )
            local.acked_seq = rs.durable_seq
            local.verify_pending = False
            local.save(self.state_path)
            resync.drop_hint(resync.hint_path(self.state_path))
        elif mode is not previous_mode or not self.ready:
            self.log.info(
                "replica_state_adopted",
                mode=mode.value,
                durable_seq=rs.durable_seq,
                generation=rs.generation,
                initial_cursor=local.initial_cursor,
            )

    def _reverse_regions(self) -> tuple[list[Region] | None, str]:
        """The regions a seeded replica differs in at most (None: compare the whole disk), why."""
        if self.recovery.tracking_lost:
            return None, f"this site's change map is unusable: {self.recovery.tracking_lost}"
        regions, why = resync.load_hint(resync.hint_path(self.state_path))
        if regions is not None:
            self.log.info("resync_by_change_maps", regions=len(regions), why=why)
        return regions, why

    def _await_seed(self, local: DiskState, rs: ReplicaState) -> None:
        if self.mode is not Mode.AWAITING_SEED:
            self.log.info(
                "seed_awaited",
                seq=local.seed_seq or None,
                seed_dir=local.seed_dir or None,
                durable_seq=rs.durable_seq,
                initial_sync=rs.initial_sync,
            )
        self.seq.adopt(Mode.AWAITING_SEED, rs.durable_seq)
        self.state = local

    def _seed_arrived(self, local: DiskState, rs: ReplicaState) -> DiskState:
        """The replica moved past the state it had at the export: imported, or superseded."""
        log = self.log.bind(seq=local.seed_seq)
        if rs.durable_seq == local.seed_seq:
            # The media is in: the dirty map holds exactly the changes since its cut.
            log.info("seed_import_detected", seed_dir=local.seed_dir, durable_seq=rs.durable_seq)
            local.acked_seq = rs.durable_seq
            local.last_cut_ns = local.seed_cut_ns
            local.initial_done = True
            local.initial_cursor = self.export.size
            self.status.last_acked_seq = rs.durable_seq
            self.status.last_acked_cut_ns = local.seed_cut_ns
        else:
            # Other media (an older export) or another copy reached the replica: what differs
            # from it is unknown to the dirty map, so compare hashes.
            log.warning(
                "seed_superseded",
                seed_dir=local.seed_dir,
                durable_seq=rs.durable_seq,
                reason="the replica holds another state than this disk's last export",
            )
            local.verify_pending = True
        local.seed_seq = local.seed_base_seq = local.seed_cut_ns = 0
        local.seed_dir = ""
        local.save(self.state_path)
        return local

    # -- seed export (agents.seedexport drives these) ----------------------------------------

    def begin_seed_cut(self, cut_time_ns: int, cut_id: int) -> Cut:
        """Freeze the whole disk (allocated data and pending changes) for an export to media.

        Synchronous, like :meth:`begin_cut`: a VM cuts all its disks in one loop step. The
        export reads the cut like a FULL batch (copy-on-write keeps it point-in-time).
        """
        cut = self.export.begin_cut(cut_time_ns, cut_id)
        self._seed_restore = cut.frozen.copy()
        cut.add_full_range(0, self.export.size, self.export.fd)
        return cut

    def finish_seed_export(
        self, cut: Cut, *, seq: int, base_seq: int, generation: int, directory: Path
    ) -> None:
        """The media holds ``cut`` durably as ``seq``: wait for its import from now on.

        The state is saved *before* the persisted map forgets the pre-cut changes, so a kill
        in between only leaves the map pessimistic.
        """
        st = self.state or DiskState(str(self.vm.uuid), self.disk.id, self.export.size)
        st.generation = generation
        st.seed_seq = seq
        st.seed_base_seq = base_seq
        st.seed_cut_ns = cut.cut_time_ns
        st.seed_dir = str(directory)
        st.verify_pending = False  # the media holds the whole disk: nothing left to compare
        st.save(self.state_path)
        self.export.end_cut(acked=True)
        self.seq.seed_exported()
        self._drop_seed_restore()
        # Tracking is exact from the cut on, whatever the map recovered at start.
        self.recovery = Recovery(fresh=False, clean=True, recovered_blocks=0, tracking_lost=None)
        self.state = st
        self.ready = False

    def abort_seed_export(self) -> None:
        """The export failed: the blocks pending before its cut are pending again."""
        self.export.end_cut(acked=False, merge=self._seed_restore)
        self._drop_seed_restore()

    def cancel_seed(self) -> bool:
        """Forget the export this disk waits for (lost media); True if there was one.

        The map no longer holds the changes made before that cut, so a replica that has data
        is compared by hashes; an empty one gets the initial copy its policy asks for.
        """
        st = self.state
        if st is None or not st.seed_seq:
            return False
        self.log.warning("seed_cancelled", seq=st.seed_seq, seed_dir=st.seed_dir)
        st.verify_pending = st.seed_base_seq > 0 or st.acked_seq > 0
        st.seed_seq = st.seed_base_seq = st.seed_cut_ns = 0
        st.seed_dir = ""
        st.save(self.state_path)
        self.ready = False
        return True

    def _drop_seed_restore(self) -> None:
        if self._seed_restore is not None:
            self._seed_restore.close()
            self._seed_restore = None

    def seed_status(self) -> dict[str, Any] | None:
        """The ``seed`` part of this disk's status (None when no seeding is going on)."""
        st = self.state
        if self.seed_export is not None:
            return dict(self.seed_export)
        if st is not None and st.seed_seq:
            return {
                "state": "awaiting_import",
                "seq": st.seed_seq,
                "dir": st.seed_dir,
                "cut_time": st.seed_cut_ns / 1e9,
                # By design, but it must not go unnoticed: nothing ships until the import.
                "replication": "paused until `replikant seed import` at the recovery site "
                "(or `replikant seed cancel`)",
            }
        if self.mode is Mode.AWAITING_SEED:
            return {"state": "awaiting_export"}
        return None

    # -- cutting and shipping --------------------------------------------------------------

    def note_cut(self, cut_id: int) -> None:
        """The VM takes cut ``cut_id`` now, with or without this disk: note whether it changed.

        Synchronous, in the loop step of the cut, for *every* disk of the VM: a disk left out of
        a cut (not ready) still has to remember that it changed before it.
        """
        self.seq.note_cut(cut_id, self.export.map.guest_ops)

    def begin_cut(self, cut_time_ns: int, cut_id: int) -> Cut:
        """Freeze this disk's changes (synchronous; the VM cuts all its disks in one step)."""
        cut = self.export.begin_cut(cut_time_ns, cut_id)
        self.status.last_cut_ns = cut_time_ns
        if self.mode is Mode.INITIAL:
            assert self.state is not None
            start = self.state.initial_cursor
            self._chunk_end = self._next_chunk_end(start)
            cut.add_full_range(start, self._chunk_end, self.export.fd)
        return cut

    def _next_chunk_end(self, start: int) -> int:
        """Where the next FULL batch ends: after ``full_batch_bytes`` of allocated data (or
        what the last batch's rate asks for, :data:`FULL_BATCH_SECONDS`)."""
        size = self.export.size
        bs = self.export.block_size
        budget = self.full_batch_bytes or self._full_bytes
        for lo, hi in data_extents(self.export.fd, start, size):
            if hi - lo >= budget:
                end = lo + budget
                return min(size, (end + bs - 1) // bs * bs)
            budget -= hi - lo
        return size

    async def ship(self, cut: Cut, consistency: Consistency) -> bool:
        """Send ``cut`` as the next batch; True once durably acked, False after a failure."""
        assert self.state is not None
        seq = self.seq.next_seq
        full = self.mode is Mode.INITIAL
        log = self.log.bind(seq=seq, generation=self.state.generation)
        stats = BatchStats()
        started = time.monotonic()
        try:
            self._waiting = (time.monotonic(), f"uploading batch seq {seq}")
            try:
                ack = await self._upload(cut, consistency, seq, full, stats)
            finally:
                self._waiting = None
            try:
                self.seq.check_ack(seq, ack.seq, duplicate=ack.duplicate)
            except SequenceError as exc:
                raise ShipError(str(exc), code="sequence_mismatch") from None
        except ShipError as exc:
            self.export.end_cut(acked=False)
            self.ready = False  # ask the broker where it stands before the next attempt
            self.record_error(exc)
            if exc.code in REFUSED_CODES:
                self.refuse(exc)
                return False
            if isinstance(exc, FencedError):
                self.fence(str(exc), exc.code)
            log.warning("batch_failed", error=exc.message, code=exc.code, status=exc.status)
            return False
        except BaseException:
            self.export.end_cut(acked=False)
            self.ready = False
            raise
        cleared = self.export.end_cut(acked=True)
        initial_done = full and self._chunk_end >= self.export.size
        self.seq.acked(seq, cut.cut_id, initial_done=initial_done)
        if not full:
            self._completing = False
        elapsed = max(time.monotonic() - started, 1e-6)
        st = self.state
        st.acked_seq = seq
        st.last_cut_ns = cut.cut_time_ns
        if full:
            st.initial_cursor = self._chunk_end
            self._full_bytes = full_batch_size(stats.payload_bytes / elapsed)
            if initial_done:
                st.initial_done = True
                self._completing = True
                # The map has tracked every write since this copy began: from now on it is no
                # longer "missing" to reverse replication (agents/resync.py).
                self.recovery = replace(self.recovery, fresh=False)
        # Off the event loop, which also serves every disk's guest: the two fsyncs of this
        # write, after each ack of each disk, kept it from serving guests for 11 % of its time
        # with 100 busy disks (issue 10). Encoded here, as the loop may change st meanwhile.
        await asyncio.to_thread(write_state, self.state_path, st.encoded())
        s = self.status
        s.last_error = None  # recovered: the count and the time of the last error stay
        s.last_acked_seq = seq
        s.last_acked_cut_ns = cut.cut_time_ns
        s.batches += 1
        s.full_batches += int(full)
        s.bytes_shipped += stats.wire_bytes
        if stats.wire_bytes >= 64 * 1024:  # empty batches say nothing about the link
            s.throughput_bps = stats.wire_bytes / elapsed
        log.info(
            "batch_acked",
            full=full,
            consistency=consistency.name.lower(),
            extents=stats.extents,
            data_bytes=stats.data_bytes,
            payload_bytes=stats.payload_bytes,
            wire_bytes=stats.wire_bytes,
            zero_extents=stats.zero_extents,
            cow_copies=cut.cow.copied_blocks,
            cow_spilled=cut.cow.spilled_blocks,
            regions_cleared=cleared,
            seconds=round(elapsed, 4),
        )
        if full:
            if self.on_progress is not None:
                self.on_progress(self, st.initial_cursor, self.export.size)
            rate, eta = self._initial_rate(st.initial_cursor)
            log.info(
                "initial_sync_progress",
                done_bytes=st.initial_cursor,
                total_bytes=self.export.size,
                percent=round(100 * st.initial_cursor / self.export.size, 1),
                rate_bytes_per_second=round(rate),
                eta_seconds=None if eta is None else round(eta, 1),
                complete=st.initial_done,
            )
        return True

    async def _upload(
        self, cut: Cut, consistency: Consistency, seq: int, full: bool, stats: BatchStats
    ) -> Ack:
        """Send the encoded batch ``seq`` of ``cut`` (``stats`` counts what it held)."""
        assert self.state is not None
        header = make_header(
            vm_uuid=self.vm.uuid,
            disk_id=self.disk.id,
            generation=self.state.generation,
            seq=seq,
            cut=cut,
            consistency=consistency,
            compression=Compression.ZSTD if self.policy.compression == "zstd" else Compression.NONE,
            full=full,
            first_change_cut=self.seq.first_change_cut(cut.cut_id),
        )
        level = self.policy.initial_compression_level if full else self.policy.compression_level
        what = f"batch seq {seq} of {self.vm.name}/{self.disk.id}"
        if self.uploader is not None:
            # Planned, read, encoded and uploaded by the shipping process, each hop settled in
            # a step of this (the NBD) loop (decision 029).
            send = self.uploader.shipper.sender(
                cut,
                header,
                level=level,
                bucket=self.bucket,
                stats=stats,
                max_extent=self.max_extent,
            )
            return await self.uploader.upload_from(self.vm.uuid, self.disk.id, send, what=what)
        body = batch_body(
            cut, header, level=level, bucket=self.bucket, stats=stats, max_extent=self.max_extent
        )
        return await self.client.upload(self.vm.uuid, self.disk.id, body, what=what)

    def _initial_rate(self, cursor: int) -> tuple[float, float | None]:
        """Disk bytes per second covered by this run of the initial copy, and the ETA.

        Measured from the first FULL ack of this process, so a resumed copy reports the rate of
        this run, not an average diluted by the time the agent was down.
        """
        now = time.monotonic()
        if self._initial_mark is None:
            self._initial_mark = (now, cursor)
            return 0.0, None
        since, first = self._initial_mark
        rate = (cursor - first) / (now - since) if now > since else 0.0
        eta = (self.export.size - cursor) / rate if rate > 0 else None
        return rate, eta

    @property
    def unchanged(self) -> bool:
        """Nothing changed since the last acked batch: the cut needs no batch (agents.current)."""
        return (
            self.mode is Mode.DELTA
            and not self._completing
            and self.seq.change_cut is None
            and self.status.last_acked_seq > 0
            and self.export.map.dirty_bytes == 0
        )

    @property
    def backlog(self) -> bool:
        """More work is waiting that should not wait for the next interval: the initial copy,
        and right after it the first delta batch, which makes the replica a consistent cut."""
        return self.ready and (self.mode is Mode.INITIAL or self._completing)

    def stalled(self) -> str | None:
        """What the disk has waited for from the broker for ``STALL_SECONDS`` or more."""
        if self._waiting is None:
            return None
        since, what = self._waiting
        waited = time.monotonic() - since
        if waited < STALL_SECONDS:
            return None
        return f"no answer from broker {self.client.url} for {waited:.0f} s while {what}"

    def snapshot(self) -> dict[str, Any]:
        """The status endpoint's view of this disk."""
        s = self.status
        now = time.time_ns()
        st = self.state
        stalled = self.stalled()
        return {
            "vm": self.vm.name,
            "vm_uuid": str(self.vm.uuid),
            "disk": self.disk.id,
            "export": self.export.name,
            "size": self.export.size,
            "mode": self.mode.value,
            "ready": self.ready,
            "fenced": self.fenced,
            "refused": self.refused,
            "dirty_bytes": self.export.map.dirty_bytes,
            "persisted_regions": self.export.map.persisted_regions,
            "last_cut_time": s.last_cut_ns / 1e9 if s.last_cut_ns else None,
            "last_acked_seq": s.last_acked_seq,
            "lag_seconds": (now - s.last_acked_cut_ns) / 1e9 if s.last_acked_cut_ns else None,
            "throughput_bytes_per_second": round(s.throughput_bps, 1),
            "bytes_shipped": s.bytes_shipped,
            "batches": s.batches,
            "full_batches": s.full_batches,
            "hashed_bytes": s.hashed_bytes,
            "errors": s.errors,
            "last_error": stalled or s.last_error,
            "stalled": stalled is not None,
            "last_error_time": s.last_error_ns / 1e9 if s.last_error_ns else None,
            "initial_sync": {
                "done": bool(st and st.initial_done),
                "cursor": st.initial_cursor if st else 0,
            },
            "tracking": {
                "guest_ops": self.export.map.guest_ops,
                "map_writes": self.export.map.map_writes,
                "map_syncs": self.export.map.map_syncs,
            },
            "clients": self.export.clients,
            "seed": self.seed_status(),
        }
