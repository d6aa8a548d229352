"""The durable journal: receive a batch stream, verify it, make it durable, only then ack.

:class:`BatchReceiver` is sans-network: the HTTP handler feeds it the request body chunk by chunk
(``feed``), then calls ``finish`` at end of body. Every chunk goes through
:class:`common.hrl.BatchDecoder` *before* its bytes are written to
``journal/<generation>-<seq>.hrl.part``, so the first bad byte refuses the upload and the
partial file is deleted. At the trailer: our own index is appended (the extent list, so the
applier can save undo data without a second decode), the file is fsynced, renamed to ``.hrl``,
the directory fsynced, ``durable_seq`` recorded (in memory: the journal file proves it, and
start-up recovers it from there; decision 014); then the caller acks.

A journal file is the batch's bytes exactly as received, followed by::

    index    count x (offset u64, length u64, kind u8, 7 zero bytes)
    footer   magic "RKJIDXv1", batch length u64, count u64, xxh3_64(index) u64
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import xxhash

from broker.errors import (
    BatchTooLarge,
    BrokerError,
    CorruptExtent,
    IdentityConflict,
    IdentityMismatch,
    MalformedBatch,
    SequenceGap,
    StaleGeneration,
    StoreCorrupt,
)
from broker.space import StoreSpace
from broker.store import Replica, Store, journal_name
from broker.verified import BATCH_LIMIT, HeldBatches
from common.fsio import fsync_dir, pread_exact, start_writeback, write_all
from common.hrl import (
    NEED_DATA,
    BatchDecoder,
    BatchEnd,
    BatchFormatError,
    BatchHeader,
    DecodeLimits,
    Extent,
    ExtentChecksumMismatch,
    ExtentKind,
)
from common.logs import get_logger

_log = get_logger("broker.journal")

_IDX_ENTRY = struct.Struct(">QQB7x")
_IDX_FOOTER = struct.Struct(">8sQQQ")
_IDX_MAGIC: Final = b"RKJIDXv1"
_READ_CHUNK: Final = 1 << 20
FAULT_DIE_BEFORE_ACK: Final = "REPLIKANT_TEST_FAULT_DIE_BEFORE_ACK"
"""Test-only fault (see :func:`_fault_die_before_ack`); unset in every deployment."""


class DirectSink(Protocol):
    """Applies a FULL batch straight into the image while it streams in (see ReplicaEngine)."""

    def begin(self, header: BatchHeader) -> bool:
        """Take the batch (True) or let it go through the journal (False)."""

    def extent(self, ext: Extent) -> None:
        """Write one verified extent."""

    def commit(self, header: BatchHeader) -> None:
        """Make it durable and applied (fdatasync, audit line, meta)."""

    def release(self) -> None:
        """Give up (refused or interrupted upload)."""


@dataclass(frozen=True)
class Receipt:
    """The outcome of one upload: what to answer the agent."""

    acked_seq: int
    duplicate: bool
    generation: int
    journal_bytes: int = 0
    direct: bool = False


def refuse_format_error(exc: BatchFormatError, replica: Replica) -> BrokerError:
    """Map a codec refusal to the HTTP error of http.md (corrupt extents name the disk offset)."""
    details = {"class": type(exc).__name__, "field": exc.field, "position": exc.position}
    if isinstance(exc, ExtentChecksumMismatch):
        return CorruptExtent(
            f"batch for {replica.label}: {exc.message}", fix=exc.fix, details=details
        )
    return MalformedBatch(f"batch for {replica.label}: {exc.message}", fix=exc.fix, details=details)


class BatchReceiver:
    """Journal one uploaded batch for ``replica``: feed chunks, then finish (or abort).

    ``min_free_bytes`` is the reserve the store keeps: a chunk that would eat into it refuses
    the upload with :class:`StorageFullError` (as does ENOSPC itself).
    """

    def __init__(
        self,
        store: Store,
        replica: Replica,
        *,
        url_identity: tuple[str, str],
        limits: DecodeLimits,
        min_free_bytes: int,
        max_batch_bytes: int,
        direct: DirectSink | None = None,
        epoch: int | None = None,
        held: HeldBatches | None = None,
        ahead: Callable[[BatchHeader, list[tuple[int, int]]], None] | None = None,
    ) -> None:
        self.store = store
        self.ahead = ahead
        """Told the header and the ranges of the journaled extents of each :meth:`feed_many`:
        the applier's undo capture reads the image's old bytes there, which can start while
        the upload goes on (broker/ahead.py)."""
        self._fetch: list[tuple[int, int]] = []
        self.held = held
        """Where the verified extents go for the applier (decision 014); None: not kept."""
        self._kept: list[Extent] | None = [] if held is not None else None
        self._kept_bytes = 0
        self.epoch = epoch
        """The owner epoch the batch is made durable under (``None``: no fence, for tools)."""
        self.direct = direct
        self._direct = False
        self.replica = replica
        self.url_identity = url_identity
        self.space = StoreSpace(store.root, min_free_bytes)
        self.max_batch_bytes = max_batch_bytes
        self._decoder = BatchDecoder(limits)
        self._pending: list[bytes] = []
        self._fd: int | None = None
        self._part: Path | None = None
        self.header: BatchHeader | None = None
        self.duplicate = False
        self.received = 0
        self._index = bytearray()
        self._written = 0
        self._count = 0

    # -- feeding
    def feed_many(self, chunks: list[bytes]) -> None:
        """:meth:`feed` each chunk (one worker-thread hop for many network reads)."""
        for chunk in chunks:
            self.feed(chunk)
            if self.duplicate:
                return
        if self._fetch and self.ahead is not None and self.header is not None:
            self.ahead(self.header, self._fetch)
            self._fetch = []

    def feed(self, chunk: bytes) -> None:
        """Verify and journal the next bytes of the body; raises a :class:`BrokerError`."""
        if self.duplicate or not chunk:
            return
        self.received += len(chunk)
        if self.received > self.max_batch_bytes:
            raise BatchTooLarge(
                f"batch for {self.replica.label} exceeds this broker's limit of "
                f"{self.max_batch_bytes} bytes",
                fix="split the change into smaller batches (the agent cuts more often)",
                details={"limit": self.max_batch_bytes, "received": self.received},
            )
        if self._direct:
            self.space.check(len(chunk), self._doing())  # the image grows instead of the journal
        self._decoder.receive_data(chunk)
        self._drain()
        if self._is_duplicate() or self._direct:
            return
        if self._fd is None:
            self._pending.append(chunk)
            if self.header is not None:
                self._open()
        else:
            self._write(chunk)

    def _is_duplicate(self) -> bool:
        # A method, not the attribute: _drain() may have just set it.
        return self.duplicate

    def _drain(self) -> None:
        while True:
            try:
                event = self._decoder.next_event()
            except BatchFormatError as exc:
                raise refuse_format_error(exc, self.replica) from None
            if event is NEED_DATA:
                return
            if isinstance(event, BatchHeader):
                self._check_header(event)
                if self.duplicate:
                    return
                if event.full and self.direct is not None and self.direct.begin(event):
                    # Initial copy with no recovery point to protect: no journal, no undo.
                    self._direct = True
                    self._pending = []
            elif isinstance(event, Extent):
                if self._direct:
                    assert self.direct is not None
                    with self.space.refusing_when_full(event.length, self._doing()):
                        self.direct.extent(event)
                    continue
                if self.ahead is not None:
                    self._fetch.append((event.offset, event.length))
                self._index += _IDX_ENTRY.pack(event.offset, event.length, int(event.kind))
                self._count += 1
                self._keep(event)
            elif isinstance(event, BatchEnd):
                return

    def _keep(self, ext: Extent) -> None:
        if self._kept is None:
            return
        # Count the extent's bookkeeping too, so a batch of many ZERO extents is bounded.
        self._kept_bytes += (len(ext.data) if ext.data is not None else 0) + 64
        if self._kept_bytes > BATCH_LIMIT:
            self._kept = None  # too big to hold: the applier decodes the journal file
        else:
            self._kept.append(ext)

    def _check_header(self, h: BatchHeader) -> None:
        r = self.replica
        m = r.meta
        url_uuid, url_disk = self.url_identity
        got = (str(h.vm_uuid), h.disk_id)
        if got != (url_uuid, url_disk):
            raise IdentityMismatch(
                f"batch names vm {got[0]} disk {got[1]} but was sent to the replica of "
                f"vm {url_uuid} disk {url_disk}",
                fix="the agent posted a batch to another disk's URL: check its configuration",
                details={
                    "batch": {"vm_uuid": got[0], "disk_id": got[1]},
                    "replica": {"vm_uuid": url_uuid, "disk_id": url_disk},
                },
            )
        if h.disk_size != m.disk_size:
            raise IdentityConflict(
                f"batch for {r.identity_text()} says the disk is {h.disk_size} bytes; the "
                f"replica is {m.disk_size} bytes",
                fix="resizing a protected disk needs the replica re-enabled at the new size",
                details={"batch_disk_size": h.disk_size, "replica_disk_size": m.disk_size},
            )
        if h.generation != m.generation:
            older = h.generation < m.generation
            raise StaleGeneration(
                f"batch for {r.identity_text()} has generation {h.generation} but the replica "
                f"is at generation {m.generation}",
                fix=(
                    "the source was failed over; reverse replication or re-enable it"
                    if older
                    else "announce the new generation with PUT on the replica first"
                ),
                details={"batch_generation": h.generation, "replica_generation": m.generation},
            )
        applied_here = m.applied_seq if m.applied_generation == m.generation else 0
        if h.seq <= max(m.durable_seq, applied_here):
            self.duplicate = True
            self.header = h
            _log.info(
                "batch_duplicate",
                vm=m.vm_name,
                disk=m.disk_id,
                seq=h.seq,
                generation=h.generation,
                durable_seq=m.durable_seq,
            )
            return
        expected = m.durable_seq + 1
        if h.seq != expected:
            raise SequenceGap(
                f"batch for {r.identity_text()} has seq {h.seq} but the replica expects "
                f"seq {expected} (durable_seq {m.durable_seq})",
                fix=f"resume from durable_seq + 1 = {expected} (GET the replica's state)",
                details={"expected_seq": expected, "received_seq": h.seq},
            )
        if h.cut_id and m.durable_seq and h.cut_id <= m.durable_cut_id:
            # One disk's batches are cuts of its VM in the order they were taken; a cut id that
            # does not grow would pair this disk's state with another instant's (VM points).
            raise SequenceGap(
                f"batch {h.seq} for {r.identity_text()} is VM cut {h.cut_id}, not after the "
                f"cut {m.durable_cut_id} of the replica's newest durable batch",
                fix="the agent's cut ids went back (its state directory was replaced?): it "
                "continues after the broker's durable_cut_id once it reads the replica's state",
                details={"durable_cut_id": m.durable_cut_id, "received_cut_id": h.cut_id},
            )
        self.header = h

    # -- writing
    def _doing(self) -> str:
        seq = str(self.header.seq) if self.header is not None else "?"
        return f"journaling batch {seq} of {self.replica.label}"

    def _open(self) -> None:
        h = self.header
        assert h is not None
        self.replica.journal_dir.mkdir(mode=0o700, exist_ok=True)
        self._part = self.replica.journal_dir / (journal_name(h.generation, h.seq) + ".part")
        # O_NOFOLLOW: a link planted as the .part name must not redirect the batch's bytes.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd = os.open(self._part, flags, 0o600)
        pending, self._pending = self._pending, []
        for chunk in pending:
            self._write(chunk)

    def _write(self, chunk: bytes | bytearray) -> None:
        assert self._fd is not None
        self.space.check(len(chunk), self._doing())
        with self.space.refusing_when_full(len(chunk), self._doing()):
            write_all(self._fd, chunk)
            start_writeback(self._fd, self._written, len(chunk))
            self._written += len(chunk)

    # -- completion
    def finish(self) -> Receipt:
        """End of body: verify the trailer, make the batch durable, record durable_seq.

        Blocking (fsyncs): call it in a worker thread.
        """
        h = self.header
        if self.duplicate:
            # The rest of the body was not even decoded: the batch is durable already.
            assert h is not None
            m = self.replica.meta
            return Receipt(
                acked_seq=max(m.durable_seq, h.seq), duplicate=True, generation=m.generation
            )
        self._decoder.receive_data(b"")
        self._drain()
        h = self.header
        if self._direct and self._decoder.done and h is not None:
            assert self.direct is not None
            with self.space.refusing_when_full(4096, self._doing()):
                self.direct.commit(h)
            self._direct = False
            return Receipt(
                acked_seq=h.seq,
                duplicate=False,
                generation=h.generation,
                journal_bytes=self.received,
                direct=True,
            )
        if not self._decoder.done or h is None or self._fd is None or self._part is None:
            # The decoder refuses truncation itself; this is for an empty body.
            raise MalformedBatch(
                f"upload for {self.replica.label} ended before a batch header",
                fix="send a batch body (Content-Type application/x-replikant-batch)",
                details={"class": "Truncated", "field": "header", "position": self.received},
            )
        index = bytes(self._index)
        footer = _IDX_FOOTER.pack(
            _IDX_MAGIC, self.received, self._count, xxhash.xxh3_64_intdigest(index)
        )
        with self.space.refusing_when_full(len(index), self._doing()):
            self._write(index + footer)
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        # Held before the rename: the applier may pick the file up the instant it is published.
        held = self.held if self._kept is not None and self.held is not None else None
        if held is not None and self._kept is not None:
            held.put((h.generation, h.seq), self._kept, self._kept_bytes)
            self._kept = None
        try:
            self._publish(h)
        except BaseException:
            if held is not None:
                # Never durable here: the agent's resend of this seq may differ.
                held.take((h.generation, h.seq))
            raise
        _fault_die_before_ack(self.replica)
        return Receipt(
            acked_seq=h.seq, duplicate=False, generation=h.generation, journal_bytes=self.received
        )

    def _publish(self, h: BatchHeader) -> None:
        """Rename the fsynced ``.part`` to its final name and record ``durable_seq``."""
        assert self._part is not None
        with contextlib.ExitStack() as section:
            if self.epoch is not None:
                # A deposed owner must not publish a journal file or write meta.json over the
                # new owner's (decision 031).
                section.enter_context(self.store.writing(self.replica, self.epoch))
            final = self._part.with_name(journal_name(h.generation, h.seq))
            os.rename(self._part, final)
            self._part = None
            fsync_dir(final.parent)
            self.replica.note_durable(h.seq, h.cut_time_ns, h.cut_id)

    def abort(self) -> None:
        """Forget a refused or interrupted upload: close and delete the partial file."""
        if self._direct and self.direct is not None:
            self._direct = False
            self.direct.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._part is not None:
            self._part.unlink(missing_ok=True)
            self._part = None


def _fault_die_before_ack(replica: Replica) -> None:
    """Test-only fault: SIGKILL this broker right after a batch became durable, before its ack.

    That instant (between the journal's fsync and the HTTP answer) is microseconds wide, so no
    outside ``kill -9`` hits it reliably; the multi-disk consistency test needs it many times.
    Armed only when the environment names a trigger file (``REPLIKANT_TEST_FAULT_DIE_BEFORE_ACK``)
    and that file exists, holding the disk id to fire on (empty: any disk); the file is removed
    before the kill, so each arming fires once.
    """
    trigger = os.environ.get(FAULT_DIE_BEFORE_ACK)
    if not trigger:
        return
    try:
        wanted = Path(trigger).read_text().strip()
    except FileNotFoundError:
        return
    if wanted and wanted != replica.meta.disk_id:
        return
    Path(trigger).unlink(missing_ok=True)
    _log.warning("fault_die_before_ack", vm=replica.meta.vm_name, disk=replica.meta.disk_id)
    sys.stdout.flush()  # the line above is the only trace the test's reader gets
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Reading journal files back (the applier)


@dataclass(frozen=True)
class JournalEntry:
    """A durable journal file: its header, its extent list, and how to decode its data."""

    path: Path
    header: BatchHeader
    batch_len: int
    extents: list[tuple[int, int, int]]  # (offset, length, kind)

    @property
    def key(self) -> tuple[int, int]:
        """``(generation, seq)``."""
        return self.header.generation, self.header.seq

    def ranges(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every extent: what the apply will overwrite."""
        return [(o, n) for o, n, _k in self.extents]

    def iter_extents(self, limits: DecodeLimits) -> Iterator[Extent]:
        """Decode the batch again (re-verifying every checksum) and yield its extents."""
        decoder = BatchDecoder(limits)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while True:
                n = min(_READ_CHUNK, self.batch_len - pos)
                if n > 0:
                    chunk = os.pread(fd, n, pos)
                    if not chunk:
                        n = 0
                    pos += len(chunk)
                    decoder.receive_data(chunk)
                if n <= 0:
                    decoder.receive_data(b"")
                while True:
                    try:
                        event = decoder.next_event()
                    except BatchFormatError as exc:
                        raise StoreCorrupt(
                            f"journal file {self.path} no longer decodes: {exc.message}",
                            fix="the store's disk corrupted an acked batch; run `replikant "
                            "verify` and repair",
                        ) from None
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Extent):
                        yield event
                    elif isinstance(event, BatchEnd):
                        return
                if n <= 0:
                    raise StoreCorrupt(f"journal file {self.path} ended early")
        finally:
            os.close(fd)


def read_journal(path: Path, limits: DecodeLimits) -> JournalEntry:
    """Open a durable journal file: its footer and index, and its header (decoded and checked)."""
    # pread on a bare descriptor: a file object's seeks and checks are a system call each, and
    # each hands the GIL of a busy broker to another thread (issue 10).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < _IDX_FOOTER.size:
            raise StoreCorrupt(f"journal file {path} is too short ({size} bytes)")
        footer = pread_exact(fd, _IDX_FOOTER.size, size - _IDX_FOOTER.size)
        magic, batch_len, count, checksum = _IDX_FOOTER.unpack(footer)
        if magic != _IDX_MAGIC or batch_len + count * _IDX_ENTRY.size + _IDX_FOOTER.size != size:
            raise StoreCorrupt(f"journal file {path} has no valid index footer")
        index = pread_exact(fd, count * _IDX_ENTRY.size, batch_len)
        if xxhash.xxh3_64_intdigest(index) != checksum:
            raise StoreCorrupt(f"journal file {path} has a corrupt extent index")
        head = pread_exact(fd, min(batch_len, 4096), 0)
    finally:
        os.close(fd)
    decoder = BatchDecoder(limits)
    decoder.receive_data(head)
    try:
        event = decoder.next_event()
    except BatchFormatError as exc:
        raise StoreCorrupt(f"journal file {path} has a bad header: {exc.message}") from None
    if not isinstance(event, BatchHeader):
        raise StoreCorrupt(f"journal file {path} has no batch header")
    extents = [
        (o, n, k)
        for o, n, k in (_IDX_ENTRY.unpack_from(index, i * _IDX_ENTRY.size) for i in range(count))
    ]
    return JournalEntry(path=path, header=event, batch_len=batch_len, extents=extents)


def clean_partials(replica: Replica) -> int:
    """Delete ``.part`` files left by uploads a crash interrupted (never acked). Returns count."""
    n = 0
    for part in replica.journal_dir.glob("*.part"):
        part.unlink(missing_ok=True)
        n += 1
    return n


KIND_DATA = int(ExtentKind.DATA)
