"""The replica store: one directory per protected disk, plus the owner-epoch fence.

Layout under the store root (``[broker] store`` in ``broker.toml``)::

    store.json                      the owner-epoch fence of this store (invariant 7)
    .lock                           flock()ed for the fence's read-compare-write
    .overlays/[<node>/]             private copy-on-write files of point-in-time exports
    .run/                           each running broker's address (``<node>.json``, the owner's
                                    also as ``broker.json``)
    <vm-uuid>/<disk-id>/
        .fence                      flock()ed shared by every write section, exclusively by a new
                                    owner before it loads the replica (decision 031)
        replica.img                 sparse image of the disk, ``disk_size`` bytes
        meta.json                   identity, generation, durable/applied seq, epoch, sync state
        applied.log                 append-only audit: one JSON line per applied batch (the commit)
        journal/<gen>-<seq>.hrl     durable batches not yet applied (``.part`` while receiving)
        points/undo-*.dat           undo segments that keep older recovery points readable

``meta.json`` is always replaced atomically (tmp + fsync + rename + fsync dir). ``applied.log`` is
the commit point of an apply: a batch is applied exactly when its line is there, so the audit can
prove that no acked batch was lost and none applied twice. meta's applied and durable counters
may trail the log and the journal (they are saved with other changes, not per batch); loading a
replica brings them up to what those prove.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from broker import names
from broker.applied import AppliedRecord, applied_fields
from broker.errors import BrokerError, IdentityConflict, StoreCorrupt
from broker.fence import NO_FENCE, WRITER_FIX, OwnerFence
from broker.journalhead import journal_cut
from common.fsio import atomic_write_json, fsync_dir, read_json
from common.logs import get_logger

_log = get_logger("broker.store")

META_FORMAT = 1
InitialSync = Literal["pending", "seeded", "in_progress", "complete"]


@dataclass
class ReplicaMeta:
    """Everything durable about one replica except its data and its points."""

    vm_uuid: str
    disk_id: str
    vm_name: str
    disk_size: int
    block_size: int
    generation: int = 1
    durable_seq: int = 0
    applied_generation: int = 1
    applied_seq: int = 0
    durable_cut_ns: int = 0
    applied_cut_ns: int = 0
    applied_consistency: int = 0
    applied_full: bool = False
    # The VM cut of the newest durable / applied batch (0: none, or written before cut ids).
    durable_cut_id: int = 0
    applied_cut_id: int = 0
    applied_first_change_cut: int = 0
    epoch: int = 0
    source_host: str = ""
    source_site: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    rpo_seconds: float | None = None
    initial_sync: InitialSync = "pending"
    created_ns: int = 0
    seed: dict[str, Any] | None = None
    # Failover (decision 041): the image was handed to this site's agent at ``generation``
    # ("uncommitted" until `failover commit`, then "committed"); nothing applies into it then.
    handed_over: Literal["", "uncommitted", "committed"] = ""
    # A replica adopted by `replikant reverse` applies into the old primary's own image file,
    # outside the store ("": the store's ``replica.img``).
    image_path: str = ""
    format: int = META_FORMAT

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaMeta:
        """Load, ignoring keys a newer broker may have added."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Replica:
    """One protected disk's directory: meta, image path, journal and points folders, audit log.

    Thread-safe for meta updates: the ingest path (durable_seq) and the applier thread
    (applied_seq) both change meta, each change is saved whole under ``_meta_lock``.
    """

    def __init__(self, path: Path, meta: ReplicaMeta) -> None:
        self.path = path
        self.meta = meta
        self._meta_lock = threading.Lock()

    # -- paths
    @property
    def image(self) -> Path:
        """The replica image: the store's sparse file, or the old primary's adopted image."""
        return Path(self.meta.image_path) if self.meta.image_path else self.path / "replica.img"

    @property
    def journal_dir(self) -> Path:
        """Durable batches waiting to be applied."""
        return self.path / "journal"

    @property
    def points_dir(self) -> Path:
        """Undo segments of recovery points."""
        return self.path / "points"

    @property
    def applied_log(self) -> Path:
        """The append-only apply audit."""
        return self.path / "applied.log"

    @property
    def key(self) -> tuple[str, str]:
        """``(vm_uuid, disk_id)``."""
        return self.meta.vm_uuid, self.meta.disk_id

    @property
    def label(self) -> str:
        """``vm-uuid/disk-id`` for messages."""
        return f"{self.meta.vm_uuid}/{self.meta.disk_id}"

    def identity_text(self) -> str:
        """The replica's identity as messages name it."""
        m = self.meta
        return f"vm {m.vm_name} ({m.vm_uuid}) disk {m.disk_id}"

    # -- meta
    def update_meta(self, **changes: Any) -> None:
        """Change some meta fields and save the whole, atomically and durably."""
        with self._meta_lock:
            self._set_meta(changes)
            # vars(), not asdict(): the same mapping without a deep copy (5x cheaper per batch).
            atomic_write_json(self.path / "meta.json", dict(vars(self.meta)))

    def note_durable(self, seq: int, cut_ns: int, cut_id: int) -> None:
        """Record a newly durable batch in memory only: its journal file proves it, and start-up
        recovers these counters from the file (``Store._recover_counters``), so saving meta
        here would cost two fsyncs per batch for nothing. The apply saves them with the rest."""
        with self._meta_lock:
            self._set_meta({"durable_seq": seq, "durable_cut_ns": cut_ns, "durable_cut_id": cut_id})

    def _set_meta(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if name not in ReplicaMeta.__dataclass_fields__:
                raise AttributeError(name)
            setattr(self.meta, name, value)

    # -- audit
    def commit_applied(self, record: AppliedRecord) -> None:
        """Commit an apply: append its line to ``applied.log`` (fsynced), then move meta's
        applied counters to it. meta.json is saved only when the initial sync's state changes:
        the line is the commit, and loading the replica brings meta's counters up to the log's
        last line (``Store._recover_counters``), so saving them after every batch cost two
        fsyncs, a file's creation and a rename for nothing (0.4 ms of the broker's CPU per
        batch, issue 10)."""
        changes = applied_fields(record)
        with self._meta_lock:  # a meta save meanwhile would save counters behind the log
            self.append_applied(record)
            save = changes["initial_sync"] != self.meta.initial_sync
            self._set_meta(changes)
            if save:
                atomic_write_json(self.path / "meta.json", dict(vars(self.meta)))

    def append_applied(self, record: AppliedRecord) -> None:
        """Commit an apply: append its line to ``applied.log`` and fsync."""
        fd = os.open(self.applied_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, record.line())
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def applied_records(self) -> list[AppliedRecord]:
        """Every committed apply, oldest first (the sequence audit)."""
        try:
            raw = self.applied_log.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in raw.split(b"\n"):
            if line.strip():
                out.append(AppliedRecord(**json.loads(line)))
        return out

    def last_applied_record(self) -> AppliedRecord | None:
        """The newest committed apply; a torn last line (crash mid-append) is cut off first."""
        path = self.applied_log
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size == 0:
            return None
        with path.open("r+b") as fh:
            tail_len = min(size, 64 * 1024)
            fh.seek(size - tail_len)
            tail = fh.read(tail_len)
            if not tail.endswith(b"\n"):
                # The append never completed, so the apply never committed: drop the fragment.
                cut = tail.rfind(b"\n")
                new_size = size - tail_len + cut + 1
                fh.truncate(new_size)
                os.fsync(fh.fileno())
                _log.warning("applied_log_truncated", replica=self.label, dropped=size - new_size)
                tail = tail[: cut + 1]
                if not tail:
                    return None
            lines = tail.rstrip(b"\n").split(b"\n")
            return AppliedRecord(**json.loads(lines[-1]))


class Store(OwnerFence):
    """All replicas under one root directory, and the owner-epoch fence that guards them.

    The fence (invariant 7): ``store.json`` holds the highest owner epoch ever claimed here.
    :meth:`claim_epoch` raises it with a locked read-compare-write; every journal and apply
    call passes its caller's epoch to :meth:`check_epoch`, which refuses a lower one, so a
    deposed owner that still believes it owns cannot write.
    """

    def __init__(self, root: Path, *, overlays: Path | None = None, load: bool = True) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._overlays = overlays or root / ".overlays"
        self._replicas: dict[tuple[str, str], Replica] = {}
        self._lock = threading.Lock()
        self.vm_fence = None
        # VMs that member placement serves apart (broker/scaleout.py): load() leaves them out.
        self.placed_apart: Callable[[str], bool] | None = None
        # The placed VMs this member adopted (reload_vm, hold_vm): the per-VM token, not the
        # owner epoch, decides who writes them, so an owner's load() and forget() keep them.
        self._held: set[str] = set()
        self._swept = False  # load() removed the overlays of exports from before the start
        self.fence_enabled = os.environ.get(NO_FENCE) != "1"
        if not self.fence_enabled:
            _log.critical("fence_disabled", store=str(root), hook=NO_FENCE)
        if load:
            self.load()

    def load(self, *, wait: bool = True) -> list[Path]:
        """Read every replica from disk (again: a member that becomes the owner reloads what
        the previous owner wrote). A replica a deposed owner is still writing (its write
        section, :meth:`writing`) is waited for, so nothing is read half-done; with
        ``wait=False`` it is skipped instead, and its directory returned for
        :meth:`load_replica` later."""
        (self.root / ".overlays").mkdir(mode=0o700, exist_ok=True)
        self._overlays.mkdir(mode=0o700, exist_ok=True)
        # Exports do not survive a restart: their private overlays are garbage at the first
        # load, and those of the exports kept through a step-down are theirs at a later one.
        for stale in () if self._swept else self._overlays.iterdir():
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)
        self._swept = True
        self.forget()  # the VMs held through placement stay: their own token decides
        return self._load(wait)

    def load_replica(self, disk_dir: Path) -> Replica | None:
        """Load one replica :meth:`load` skipped, once its writer is gone (``None``: not yet)."""
        if self.fence_enabled and not self._barrier(disk_dir, wait=False):
            return None
        return self._load_replica(disk_dir)

    def forget(self, *, held: bool = False) -> None:
        """Drop the owner's replicas from memory (a member that stops owning); with ``held``
        the VMs held through placement too (a broker that stops)."""
        with self._lock:
            if held:
                self._held.clear()
            self._replicas = {k: r for k, r in self._replicas.items() if k[0] in self._held}

    # -- replicas
    def _load(self, wait: bool) -> list[Path]:
        busy: list[Path] = []
        for vm_dir in sorted(self.root.iterdir()):
            if vm_dir.name.startswith(".") or vm_dir.is_symlink() or not vm_dir.is_dir():
                continue
            if not _valid(names.vm_uuid, vm_dir.name):
                _log.warning("store_entry_ignored", path=str(vm_dir), reason="not a VM UUID")
                continue
            if self.placed_apart is not None and self.placed_apart(vm_dir.name):
                continue
            for disk_dir in sorted(vm_dir.iterdir()):
                if disk_dir.name.startswith("."):
                    if disk_dir.name.endswith(".creating") and not disk_dir.is_symlink():
                        # A creation that crashed before its rename: never visible, never used.
                        _remove_tree(disk_dir)
                    continue
                if disk_dir.is_symlink() or not _valid(names.disk_id, disk_dir.name):
                    _log.warning("store_entry_ignored", path=str(disk_dir), reason="not a disk")
                    continue
                if self.fence_enabled and not self._barrier(disk_dir, wait=wait):
                    _log.warning(
                        "takeover_waiting_for_writer", replica=str(disk_dir), fix=WRITER_FIX
                    )
                    busy.append(disk_dir)
                    continue
                self._load_replica(disk_dir)
        return busy

    def _load_replica(self, disk_dir: Path) -> Replica:
        try:
            meta = ReplicaMeta.from_json(read_json(disk_dir / "meta.json"))
        except (OSError, ValueError, TypeError) as exc:
            raise StoreCorrupt(
                f"replica directory {disk_dir} has an unreadable meta.json ({exc})",
                fix="restore meta.json from backup or remove the directory",
            ) from None
        replica = Replica(disk_dir, meta)
        self._recover_counters(replica)
        with self._lock:
            self._replicas[replica.key] = replica
        return replica

    def _recover_counters(self, replica: Replica) -> None:
        """Bring meta's counters up to what the audit log and the journal prove durable."""
        m = replica.meta
        rec = replica.last_applied_record()
        changes: dict[str, Any] = {}
        if rec is not None and (rec.generation, rec.seq) > (m.applied_generation, m.applied_seq):
            changes.update(applied_fields(rec))
        applied_gen = changes.get("applied_generation", m.applied_generation)
        applied = changes.get("applied_seq", m.applied_seq)
        durable = max(m.durable_seq, applied if applied_gen == m.generation else 0)
        newest: Path | None = None
        for path in replica.journal_dir.glob("*.hrl"):
            gen_seq = parse_journal_name(path.name)
            if gen_seq is not None and gen_seq[0] == m.generation and gen_seq[1] > durable:
                durable, newest = gen_seq[1], path
        if durable != m.durable_seq:
            changes["durable_seq"] = durable
        cut = journal_cut(newest) if newest is not None else None
        if cut is not None and cut != (m.durable_cut_id, m.durable_cut_ns):
            changes.update(durable_cut_id=cut[0], durable_cut_ns=cut[1])
        if changes:
            _log.info("replica_counters_recovered", replica=replica.label, **changes)
            replica.update_meta(**changes)

    def reload_vm(self, vm_uuid: str) -> list[Replica]:
        """Re-read VM ``vm_uuid``'s disks from the store: another cluster member may have created
        or written them since we loaded (decision 032). Returns the fresh replicas."""
        vm_dir = names.inside(self.root, names.vm_uuid(vm_uuid))
        fresh: list[Replica] = []
        for disk_dir in sorted(vm_dir.iterdir()) if vm_dir.is_dir() else []:
            if disk_dir.is_symlink() or not _valid(names.disk_id, disk_dir.name):
                continue  # hidden (.creating) and foreign entries: _load says why at start
            # The member the VM was moved from may be inside a write section: wait it out.
            self._barrier(disk_dir, wait=True)
            replica = Replica(disk_dir, ReplicaMeta.from_json(read_json(disk_dir / "meta.json")))
            self._recover_counters(replica)
            fresh.append(replica)
        with self._lock:
            for key in [k for k in self._replicas if k[0] == vm_uuid]:
                del self._replicas[key]
            self._replicas.update((r.key, r) for r in fresh)
            self._held.add(vm_uuid)
        return fresh

    def hold_vm(self, vm_uuid: str, *, hold: bool = True) -> None:
        """Keep VM ``vm_uuid``'s loaded disks through ownership changes (placed on this member,
        or exported by an owner that stepped down); ``hold=False``: no longer, still loaded."""
        with self._lock:
            (self._held.add if hold else self._held.discard)(vm_uuid)

    def holds_vm(self, vm_uuid: str) -> bool:
        """Whether this member serves VM ``vm_uuid`` through placement, apart from owning."""
        with self._lock:
            return vm_uuid in self._held

    def forget_vm(self, vm_uuid: str) -> None:
        """Drop VM ``vm_uuid``'s disks from memory (placed on another member)."""
        with self._lock:
            for key in [k for k in self._replicas if k[0] == vm_uuid]:
                del self._replicas[key]
            self._held.discard(vm_uuid)

    def replicas(self) -> list[Replica]:
        """Every replica, sorted by VM name then disk."""
        with self._lock:
            items = list(self._replicas.values())
        return sorted(items, key=lambda r: (r.meta.vm_name, r.meta.vm_uuid, r.meta.disk_id))

    def get(self, vm_uuid: str, disk_id: str) -> Replica | None:
        """The replica of ``(vm_uuid, disk_id)``, if enabled here."""
        with self._lock:
            return self._replicas.get((vm_uuid, disk_id))

    def vm_disks(self, vm_uuid: str) -> list[Replica]:
        """Every disk of VM ``vm_uuid``, unsorted (cheap enough for a check on every request)."""
        with self._lock:
            return [r for (v, _d), r in self._replicas.items() if v == vm_uuid]

    def find_vm(self, vm: str) -> list[Replica]:
        """Every disk of the VM named ``vm`` (a name or a UUID)."""
        return [r for r in self.replicas() if vm in (r.meta.vm_name, r.meta.vm_uuid)]

    def create_replica(
        self,
        *,
        vm_uuid: str,
        disk_id: str,
        vm_name: str,
        disk_size: int,
        block_size: int,
        generation: int,
        source_host: str = "",
        source_site: str = "",
        labels: dict[str, str] | None = None,
        rpo_seconds: float | None = None,
        image_path: str = "",
        epoch: int,
    ) -> tuple[Replica, bool]:
        """Return the replica of ``(vm_uuid, disk_id)``, creating it if absent.

        Created whole or not at all: the directory is built under a hidden name and renamed into
        place. An existing replica with another VM name or disk size is an
        :class:`IdentityConflict`. Returns ``(replica, created)``. A new replica appears only
        under owner ``epoch`` still valid: the check and the rename into place hold the store's
        fence lock, so no claim (or placement) can come between them (decision 031).
        """
        vm_uuid = names.vm_uuid(vm_uuid)
        disk_id = names.disk_id(disk_id)
        with self._lock:
            existing = self._replicas.get((vm_uuid, disk_id))
            if existing is not None:
                m = existing.meta
                if m.vm_name != vm_name or m.disk_size != disk_size:
                    raise IdentityConflict(
                        f"replica {vm_uuid}/{disk_id} exists for vm {m.vm_name!r} with "
                        f"{m.disk_size} bytes; the request names vm {vm_name!r} with "
                        f"{disk_size} bytes",
                        fix="a VM keeps its UUID, name and disk size; remove the old replica "
                        "if this really is another disk",
                        details={
                            "replica": {"vm_name": m.vm_name, "disk_size": m.disk_size},
                            "request": {"vm_name": vm_name, "disk_size": disk_size},
                        },
                    )
                return existing, False
            vm_dir = names.inside(self.root, vm_uuid)
            final = names.inside(self.root, vm_uuid, disk_id)
            tmp = names.inside(self.root, vm_uuid, f".{disk_id}.creating")
            vm_dir.mkdir(mode=0o700, exist_ok=True)
            _remove_tree(tmp)
            meta = ReplicaMeta(
                vm_uuid=vm_uuid,
                disk_id=disk_id,
                vm_name=vm_name,
                disk_size=disk_size,
                block_size=block_size,
                generation=generation,
                applied_generation=generation,
                source_host=source_host,
                source_site=source_site,
                labels=dict(labels or {}),
                rpo_seconds=rpo_seconds,
                created_ns=time.time_ns(),
                image_path=image_path,
                epoch=epoch,
            )
            try:
                _make_replica_dir(tmp, meta)
                with self.fence_lock():
                    self.check_epoch(epoch, Replica(tmp, meta))
                    os.rename(tmp, final)
            except BaseException:
                _remove_tree(tmp)  # e.g. ENOSPC, or fenced: leave nothing half-made behind
                raise
            fsync_dir(vm_dir)
            fsync_dir(self.root)
            replica = Replica(final, meta)
            self._replicas[replica.key] = replica
        _log.info("replica_created", vm=vm_name, vm_uuid=vm_uuid, disk=disk_id, disk_size=disk_size)
        return replica, True

    def overlay_dir(self) -> Path:
        """Where point-in-time exports keep their private copy-on-write files."""
        return self._overlays


def placement_fence(store: Store, replica: Replica) -> None:
    """Run the per-VM fence of decision 032 alone (the journal path: the owner fence of an
    owner-only cluster is the ingest's owner check)."""
    if store.vm_fence is not None:
        store.vm_fence(replica)


def journal_name(generation: int, seq: int) -> str:
    """The journal file name of batch ``(generation, seq)``."""
    return f"{generation}-{seq}.hrl"


def parse_journal_name(name: str) -> tuple[int, int] | None:
    """``(generation, seq)`` from a journal file name, or ``None``."""
    if not name.endswith(".hrl"):
        return None
    stem = name[: -len(".hrl")]
    gen, sep, seq = stem.partition("-")
    if not sep or not gen.isdigit() or not seq.isdigit():
        return None
    return int(gen), int(seq)


def _make_replica_dir(tmp: Path, meta: ReplicaMeta) -> None:
    """A new replica's directories, sparse image and meta, durable, under its hidden name."""
    tmp.mkdir(mode=0o700)
    (tmp / "journal").mkdir(mode=0o700)
    (tmp / "points").mkdir(mode=0o700)
    if meta.image_path:
        atomic_write_json(tmp / "meta.json", asdict(meta))
        fsync_dir(tmp)
        return
    fd = os.open(
        tmp / "replica.img",
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        os.ftruncate(fd, meta.disk_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic_write_json(tmp / "meta.json", asdict(meta))
    fsync_dir(tmp)


def _valid(check: Callable[[str], str], text: str) -> bool:
    try:
        check(text)
    except BrokerError:
        return False
    return True


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            child.unlink()
    path.rmdir()
