"""Offline seed media, agent side: ``POST /v1/seed/export`` on the control socket.

``replikant seed export --dir DIR --vm NAME | --selector k=v`` asks the agents to write the
selected VMs to ``DIR`` on their host, in the format ``broker/seed.py`` reads (docs/protocol/
http.md, "Offline seed media")::

    DIR/manifest.json                written last, atomically: the media is complete
    DIR/.replikant-export.json       which export wrote here (lets ``--resume`` recognise it)
    DIR/<vm-name>/<disk-id>.img      the disk at the export's cut, sparse (holes, zero blocks)
    DIR/<vm-name>/<disk-id>.xxh3     its hash list (:mod:`common.blockhash`: XXH3-64 per block)

For each VM, under its worker's lock (no batch ships meanwhile), every disk is cut at the same
instant with the machinery of the FULL batches (:meth:`DiskReplicator.begin_seed_cut`): the
active dirty map becomes the frozen map, the allocated range is added to it, and guest writes
copy unread blocks aside (copy-on-write) while the export reads them. The cut is numbered like
a batch it will never ship, ``seq``. Once the images are durable the disk's state file records
``seed_seq`` and the disk waits (mode ``awaiting_seed``) until the broker's replica shows that seq
durable — ``replikant seed import`` — and then ships what its dirty map collected since the cut.

An interrupted export is rerun with ``--resume``: it takes a new cut (the old one is gone) but
rewrites only the blocks that differ from what the media already holds.

The agent may run as root and the media directory is named by whoever may use the control
socket, so every write is made safe against links planted there: ``DIR`` is opened once without
following a link (:class:`MediaDir`) and must belong to the agent's user or to the requester,
writable by nobody else; everything below it is created or opened relative to that descriptor
with ``O_NOFOLLOW``; new files are created exclusively, mode 0600, directories 0700 (a copy of
a disk is as secret as the disk). ``--resume`` reuses only regular files the agent itself wrote
and listed in its marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import os
import stat
import time
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.dirtymap import DATA
from agents.errors import AgentError, ShipError
from agents.replicate import DiskReplicator
from agents.ship import MAX_EXTENT
from common.blockhash import block_hash
from common.config import path_problem
from common.errors import refusal_body
from common.fsio import atomic_write, data_extents, is_zero, punch_hole, pwrite_all, write_all
from common.hrl import Consistency
from common.logs import get_logger

if TYPE_CHECKING:
    from agents.cut import Cut
    from agents.service import VMWorker

log = get_logger("agents.seed")

MANIFEST = "manifest.json"
MARKER = ".replikant-export.json"
SEED_FORMAT = "replikant-seed"
_HASH_FLUSH = 64 * 1024  # hash entries buffered before they are written (512 KiB)
_PROGRESS_SECONDS = 2.0

Progress = Callable[[DiskReplicator, int, int], None]


class SeedError(AgentError):
    """An export refused or failed; ``code`` and ``status`` become the HTTP error."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int = 409,
        fix: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, fix=fix)
        self.code = code
        self.status = status
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body (the broker's shape: error, message, fix, details)."""
        return refusal_body(self, self.code, self.details)


@dataclass(frozen=True)
class ExportRequest:
    """``{"dir", "vms", "selector", "force", "resume", "dry_run", "export_id"}``."""

    directory: Path
    vms: tuple[str, ...] = ()
    selector: dict[str, str] = field(default_factory=dict)
    force: bool = False
    resume: bool = False
    dry_run: bool = False
    export_id: str = ""

    @classmethod
    def from_json(cls, body: Any) -> ExportRequest:
        """Validate the request body; raises :class:`SeedError` (400)."""
        try:
            directory = Path(str(body["dir"]))
            vms = tuple(str(v) for v in body.get("vms") or ())
            selector = {str(k): str(v) for k, v in (body.get("selector") or {}).items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise SeedError(
                f"the export request is malformed ({exc!r})",
                code="bad_request",
                status=400,
                fix='send {"dir": PATH, "vms": [names], "selector": {label: value}}',
            ) from None
        problem = path_problem(directory)
        if problem is not None:
            raise SeedError(
                f"the media directory {str(directory)!r} {problem}",
                code="bad_request",
                status=400,
                fix="give an absolute path on the agent's host, without '..'",
            )
        if not vms and not selector:
            raise SeedError(
                "the export names no VM and no label selector",
                code="bad_request",
                status=400,
                fix="name VMs (--vm NAME) or select them by label (--selector key=value)",
            )
        return cls(
            directory=directory,
            vms=vms,
            selector=selector,
            force=bool(body.get("force", False)),
            resume=bool(body.get("resume", False)),
            dry_run=bool(body.get("dry_run", False)),
            export_id=str(body.get("export_id") or uuid_mod.uuid4()),
        )


@dataclass
class DiskPlan:
    """One disk to export: the seq its cut takes, and the replica state it was judged by."""

    rep: DiskReplicator
    seq: int
    base_seq: int  # the replica's durable seq now (the disk keeps waiting while it stays so)
    generation: int
    replica: str  # how the replica looked: "absent", "pending", ... or "unknown (...)"


def select(
    workers: list[VMWorker], names: tuple[str, ...], selector: dict[str, str]
) -> tuple[list[VMWorker], list[str]]:
    """The workers named (name or uuid) or whose labels match every selector pair, and the
    names no VM here carries; 404 ``unknown_vm`` when nothing matches."""
    chosen = []
    found: set[str] = set()
    for w in workers:
        keys = {w.vm.name, str(w.vm.uuid)}
        named = keys & set(names)
        found |= named
        labelled = bool(selector) and all(w.vm.labels.get(k) == v for k, v in selector.items())
        if named or labelled:
            chosen.append(w)
    unknown = [n for n in names if n not in found]
    if not chosen:
        wanted = [*names, *(f"{k}={v}" for k, v in selector.items())]
        here = ", ".join(f"{w.vm.name} {dict(w.vm.labels)}" for w in workers) or "none"
        raise SeedError(
            f"no VM here matches {', '.join(wanted)} (protected here: {here})",
            code="unknown_vm",
            status=404,
            fix="check the names and labels (replikant agent status)",
            details={"unknown": unknown},
        )
    return chosen, unknown


# --------------------------------------------------------------------------------------------
# checks (all of them run before anything is written; the dry run stops after them)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _unsafe(what: str, why: str, fix: str, code: str = "media_unsafe") -> SeedError:
    return SeedError(f"{what} {why}", code=code, status=403, fix=fix)


def _check_owner(st: os.stat_result, what: str, owners: set[int]) -> None:
    """Refuse a directory that others may write to or that belongs to someone not in ``owners``."""
    if st.st_uid not in owners:
        raise _unsafe(
            what,
            f"belongs to user id {st.st_uid}; the agent (user id {os.geteuid()}) writes media "
            "only into a directory of its own user or of the user who asked",
            "create the directory yourself (mkdir -m 0700 DIR) or name a new one for the agent "
            "to create",
            code="media_not_owned",
        )
    if st.st_mode & 0o022:
        raise _unsafe(
            what,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): another "
            "user could plant links there",
            "chmod go-w the directory, or name one only you can write to",
        )


class MediaDir:
    """The media directory, opened once without following a link: every name below it is
    resolved from this descriptor (blocking calls: run them in a worker thread)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.uid = os.geteuid()

    @classmethod
    def open(cls, path: Path, *, peer_uid: int | None, create: bool) -> MediaDir | None:
        """Open (``create``: make, mode 0700) ``path``; None when it does not exist."""
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            # O_NOFOLLOW|O_DIRECTORY on a link fails with ELOOP or ENOTDIR.
            if exc.errno == errno.ELOOP or os.path.islink(path):
                raise _unsafe(
                    str(path), "is a symbolic link", "name the real directory, not a link"
                ) from None
            if exc.errno == errno.ENOTDIR:
                raise SeedError(
                    f"{path} exists and is not a directory",
                    code="media_not_directory",
                    fix="name a new or empty directory for the media",
                ) from None
            raise
        try:
            owners = {os.geteuid()} | ({peer_uid} if peer_uid is not None else set())
            _check_owner(os.fstat(fd), str(path), owners)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def entries(self) -> list[str]:
        """The names in the directory, sorted."""
        return sorted(os.listdir(self.fd))

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file the agent wrote here; None if absent or written by another user."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SeedError(
                f"{self.path / name} cannot be opened ({exc.strerror}): the directory holds "
                "damaged or foreign seed media",
                code="media_damaged",
                fix="use an empty directory",
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid:
                return None
            raw = os.read(fd, max(st.st_size, 1) + 1)
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise SeedError(
                f"{self.path / name} is unreadable ({exc}): the directory holds damaged seed media",
                code="media_damaged",
                fix="use an empty directory",
            ) from None
        return doc if isinstance(doc, dict) else None

    def write_json(self, name: str, doc: dict[str, Any]) -> None:
        """Replace ``name`` atomically and durably (a new 0600 file renamed over it)."""
        atomic_write(name, json.dumps(doc, indent=1).encode(), dir_fd=self.fd)

    def subdir(self, name: str) -> int:
        """Make (mode 0700) or open the agent's own subdirectory ``name``; returns its fd."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=self.fd)
        what = str(self.path / name)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _unsafe(
                what, f"is not a directory the agent can use ({exc.strerror})", "remove it"
            ) from None
        try:
            _check_owner(os.fstat(fd), what, {self.uid})
        except BaseException:
            os.close(fd)
            raise
        return fd

    def foreign(self, listed: set[str]) -> list[str]:
        """Entries the agent did not write: anything but its own regular files named by
        ``listed`` (paths relative to the directory), its marker, manifest and their temps."""
        out = []
        for name in self.entries():
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                own = name in (MARKER, MANIFEST) or (
                    name.startswith((f".{MARKER}.", f".{MANIFEST}.")) and name.endswith(".tmp")
                )
                if not (own and st.st_uid == self.uid):
                    out.append(name)
                continue
            if not (stat.S_ISDIR(st.st_mode) and st.st_uid == self.uid):
                out.append(name)
                continue
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
            try:
                for child in os.listdir(fd):
                    cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    ours = stat.S_ISREG(cst.st_mode) and cst.st_uid == self.uid
                    if not (ours and cst.st_nlink == 1 and f"{name}/{child}" in listed):
                        out.append(f"{name}/{child}")
            finally:
                os.close(fd)
        return out


def _planned_files(workers: list[VMWorker]) -> list[str]:
    return [
        f"{w.vm.name}/{rep.disk.id}.{ext}" for w in workers for rep in w.replicators
        for ext in ("img", "xxh3")
    ]  # fmt: skip


def check_directory(req: ExportRequest, workers: list[VMWorker], media: MediaDir | None) -> None:
    """Refuse a directory that is not empty (unless it continues an export) or not writable."""
    d = req.directory
    entries = media.entries() if media is not None else []
    marker = media.read_json(MARKER) if media is not None else None
    manifest = media.read_json(MANIFEST) if media is not None else None
    if entries and not (marker and marker.get("export_id") == req.export_id):
        held = sorted(str(v.get("name")) for v in (manifest or {}).get("vms", []))
        if not req.resume:
            if manifest is not None:
                what = f"{d} already holds complete seed media ({', '.join(held) or 'no VMs'})"
                fix = (
                    "import it first (`replikant seed import DIR` at the recovery site), use an "
                    "empty directory, or pass --resume to refresh it at a new cut"
                )
            elif marker is not None:
                what = (
                    f"{d} holds an interrupted export (started {marker.get('started')} by host "
                    f"{marker.get('host')})"
                )
                fix = (
                    "rerun with --resume to continue it (a new cut; only blocks that differ "
                    "from the media are rewritten), or use an empty directory"
                )
            else:
                shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                what = f"{d} is not empty ({len(entries)} entries: {shown})"
                fix = "name a new or empty directory for the media"
            raise SeedError(what, code="media_not_empty", fix=fix, details={"entries": entries})
        if marker is None:
            raise SeedError(
                f"{d} is not empty and holds no seed media this agent wrote: --resume continues "
                "only an export that `replikant seed export` began there",
                code="media_not_empty",
                fix="name a new or empty directory for the media",
                details={"entries": entries},
            )
    if media is not None and entries:
        # The marker lets an export continue only over what the agent itself wrote there.
        foreign = media.foreign(set((marker or {}).get("files") or ()))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise SeedError(
                f"{d} holds entries this agent did not write ({shown}): links or files planted "
                "there are never written through",
                code="media_not_empty",
                fix="name a new or empty directory for the media",
                details={"entries": foreign},
            )
    # Media of another VM under the same name is never overwritten.
    for vm in (manifest or {}).get("vms", []):
        for w in workers:
            if vm.get("name") == w.vm.name and vm.get("uuid") != str(w.vm.uuid):
                raise SeedError(
                    f"{d} holds vm {w.vm.name} ({vm.get('uuid')}), but vm {w.vm.name} here is "
                    f"{w.vm.uuid}: a different VM with the same name",
                    code="wrong_identity",
                    status=403,
                    fix="export this VM to another directory",
                    details={"media": vm.get("uuid"), "vm": str(w.vm.uuid)},
                )
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SeedError(
            f"{parent} is not writable by the agent (user id {os.getuid()})",
            code="media_unwritable",
            status=403,
            fix="mount the media writable for the agent's user, or choose another directory",
        )


def check_space(req: ExportRequest, workers: list[VMWorker], media: MediaDir | None) -> int:
    """Refuse media with less free space than the allocated data to write; returns the need."""
    need = 0
    for w in workers:
        for rep in w.replicators:
            fd = rep.export.fd
            need += sum(hi - lo for lo, hi in data_extents(fd, 0, rep.export.size))
            if req.resume and media is not None:
                with contextlib.suppress(OSError):
                    old = os.stat(
                        f"{w.vm.name}/{rep.disk.id}.img", dir_fd=media.fd, follow_symlinks=False
                    )
                    if stat.S_ISREG(old.st_mode):
                        need -= old.st_blocks * 512  # already there, mostly reused
    if media is not None:
        vfs = os.statvfs(media.fd)
    else:
        parent = req.directory
        while not parent.exists():
            parent = parent.parent
        vfs = os.statvfs(parent)
    free = vfs.f_bavail * vfs.f_frsize
    if need > free:
        raise SeedError(
            f"the media at {req.directory} has {free} bytes free; the export needs up to {need}",
            code="media_full",
            status=507,
            fix="use a larger medium or fewer VMs per directory",
            details={"free_bytes": free, "needed_bytes": need},
        )
    return max(need, 0)


async def plan_disk(rep: DiskReplicator, *, force: bool) -> DiskPlan:
    """Ask the broker how the replica stands; refuse one that already holds data."""
    where = f"vm {rep.vm.name} disk {rep.disk.id}"
    if rep.fenced is not None:
        raise SeedError(
            f"{where} is fenced: {rep.fenced}",
            code="fenced",
            fix="reverse or re-enable replication before seeding it",
        )
    st = rep.state
    local_acked = st.acked_seq if st else 0
    try:
        rs = await rep.client.state(rep.vm.uuid, rep.disk.id)
        durable, sync, generation = rs.durable_seq, rs.initial_sync, rs.generation
        replica = sync
    except ShipError as exc:
        if exc.status == 404:
            durable, sync, generation, replica = 0, "pending", st.generation if st else 1, "absent"
        else:
            # The recovery site may not be reachable yet: judge by what the broker acked to us.
            durable = local_acked
            done = st is not None and st.initial_done
            sync = "complete" if done else ("in_progress" if durable else "pending")
            generation = st.generation if st else 1
            replica = f"unknown (broker: {exc.message}); by local state {sync}"
            log.warning(
                "seed_export_broker_unreachable", vm=rep.vm.name, disk=rep.disk.id, error=str(exc)
            )
    if (durable or sync in ("in_progress", "complete")) and not force:
        state = (
            "is complete: it replicates over the network, there is nothing to seed"
            if sync == "complete"
            else "is receiving a network initial copy"
        )
        raise SeedError(
            f"the replica of {where} already holds data (durable seq {durable}) and {state}; "
            "the broker would refuse to import media over it",
            code="replica_has_data",
            fix="to seed it anyway, remove that replica at the recovery site, then export with "
            "--force",
            details={"vm": rep.vm.name, "disk": rep.disk.id, "durable_seq": durable, "sync": sync},
        )
    seq = max(durable, local_acked, st.seed_seq if st else 0) + 1
    return DiskPlan(rep, seq, durable, generation, replica)


# --------------------------------------------------------------------------------------------
# writing one disk


@dataclass
class MediaStats:
    """What one image write did, in bytes."""

    written: int = 0  # data blocks written to the media
    zero: int = 0  # data blocks that read all zero: left as holes
    reused: int = 0  # blocks the media already held (``--resume``)
    holes: int = 0  # unallocated or zeroed at the cut: never read


class MediaImage:
    """The sparse image and block-hash file of one disk on the media (blocking calls: run them
    in a worker thread). Extents arrive in offset order; what lies between them is zero."""

    def __init__(
        self,
        vm_dir: int,
        where: str,
        disk_id: str,
        size: int,
        block_size: int,
        *,
        reuse: set[str] | None,
    ) -> None:
        self.vm_dir = vm_dir
        self.where = where  # "<vm-name>": the files' directory relative to the media
        self.image = f"{disk_id}.img"
        self.hashes = f"{disk_id}.xxh3"
        self.size = size
        self.bs = block_size
        self.nblocks = -(-size // block_size)
        self.allowed = reuse  # --resume: the files the marker lists (None: new files only)
        self.reuse = False
        self.stats = MediaStats()
        self._next = 0  # the first block whose hash is not yet recorded
        self._pending = bytearray()
        self._zero_hash = block_hash(bytes(block_size))
        tail = size % block_size
        self._last_zero_hash = block_hash(bytes(tail)) if tail else self._zero_hash
        self._fd = -1
        self._hfd = -1

    def open(self) -> None:
        """Create the files (mode 0600, exclusively), or, to resume, reopen the agent's own."""
        self._fd, self.reuse = self._open(self.image)
        os.ftruncate(self._fd, self.size)
        self._hfd, _ = self._open(self.hashes)
        os.ftruncate(self._hfd, 0)

    def _open(self, name: str) -> tuple[int, bool]:
        """(fd, whether it existed); never through a link, never a file the agent did not
        write and list in its marker."""
        rel = f"{self.where}/{name}"
        if self.allowed is not None:
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=self.vm_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _unsafe(rel, f"cannot be reused ({exc.strerror})", "remove it") from None
            else:
                st = os.fstat(fd)
                ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                if ours and st.st_nlink == 1 and rel in self.allowed:
                    return fd, True
                os.close(fd)
                raise _unsafe(
                    rel,
                    "was not written by this agent's export (not its own regular file)",
                    "remove it, or name a new or empty directory for the media",
                )
        flags = os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            return os.open(name, flags, 0o600, dir_fd=self.vm_dir), False
        except FileExistsError:
            raise SeedError(
                f"{rel} already exists on the media and this export did not write it",
                code="media_not_empty",
                fix="name a new or empty directory, or pass --resume to continue an export",
            ) from None

    def data(self, offset: int, data: bytes | bytearray) -> None:
        """Store a DATA extent read from the cut: hash every block, write the non-zero ones
        that the media does not already hold."""
        self._zero_to(offset)
        view = memoryview(data)
        old = os.pread(self._fd, len(data), offset) if self.reuse else None
        run = -1  # start (relative) of blocks to write in one go
        for i in range(0, len(view), self.bs):
            block = view[i : i + self.bs]
            self._pending += block_hash(block)
            if old is not None and old[i : i + len(block)] == block:
                self.stats.reused += len(block)
                keep = False
            elif is_zero(block):
                self.stats.zero += len(block)
                if old is not None:
                    self._clear(offset + i, len(block))
                keep = False
            else:
                self.stats.written += len(block)
                keep = True
            if keep and run < 0:
                run = i
            elif not keep and run >= 0:
                pwrite_all(self._fd, view[run:i], offset + run)
                run = -1
        if run >= 0:
            pwrite_all(self._fd, view[run:], offset + run)
        self._next = (offset + len(data) + self.bs - 1) // self.bs
        self._flush_hashes(force=False)

    def zero(self, offset: int, length: int) -> None:
        """A ZERO or TRIM extent of the cut (the guest zeroed it): nothing to read."""
        self._zero_to(offset + length)

    def finish(self) -> None:
        """Everything after the last extent is a hole; make both files durable."""
        self._zero_to(self.size)
        self._flush_hashes(force=True)
        os.fdatasync(self._fd)
        os.fsync(self._hfd)

    def close(self) -> None:
        """Close the files (idempotent)."""
        for fd in (self._fd, self._hfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._hfd = -1

    def _zero_to(self, offset: int) -> None:
        """Blocks from the last one recorded up to ``offset`` are zero at the cut."""
        b1 = min(-(-offset // self.bs), self.nblocks)
        if b1 <= self._next:
            return
        start = self._next * self.bs
        self.stats.holes += min(b1 * self.bs, self.size) - start
        if self.reuse:
            self._clear(start, min(b1 * self.bs, self.size) - start)
        while self._next < b1:
            n = min(b1, self._next + _HASH_FLUSH) - self._next
            self._pending += self._zero_hash * n
            self._next += n
            if self._next == self.nblocks:
                self._pending[-8:] = self._last_zero_hash
            self._flush_hashes(force=False)

    def _clear(self, offset: int, length: int) -> None:
        """Make media bytes read as zero where an earlier export left data (resume only)."""
        for lo, hi in data_extents(self._fd, offset, offset + length):
            punch_hole(self._fd, lo, hi - lo)

    def _flush_hashes(self, *, force: bool) -> None:
        if self._pending and (force or len(self._pending) >= 8 * _HASH_FLUSH):
            write_all(self._hfd, self._pending)
            self._pending.clear()


async def write_disk(
    plan: DiskPlan,
    cut: Cut,
    vm_dir: int,
    req: ExportRequest,
    progress: Progress | None,
    reuse: set[str] | None,
) -> dict[str, Any]:
    """Read the frozen cut extent by extent (each read atomic with respect to guest requests)
    and write it to the media; memory stays at one extent."""
    rep = plan.rep
    dlog = log.bind(vm=rep.vm.name, disk=rep.disk.id, seq=plan.seq)
    size = rep.export.size
    total = sum(e.length for e in cut.plan(MAX_EXTENT) if e.kind == DATA)
    state: dict[str, Any] = {
        "state": "exporting",
        "dir": str(req.directory),
        "seq": plan.seq,
        "done_bytes": 0,
        "total_bytes": total,
    }
    rep.seed_export = state
    media = MediaImage(vm_dir, rep.vm.name, rep.disk.id, size, rep.export.block_size, reuse=reuse)
    started = last_report = time.monotonic()
    try:
        await asyncio.to_thread(media.open)
        for ext in cut.plan(MAX_EXTENT):
            if ext.kind != DATA:
                await asyncio.to_thread(media.zero, ext.offset, ext.length)
                continue
            data = cut.read(ext)  # synchronous: image, copy-on-write overlay, state change
            await asyncio.to_thread(media.data, ext.offset, data)
            state["done_bytes"] += ext.length
            now = time.monotonic()
            if now - last_report >= _PROGRESS_SECONDS:
                last_report = now
                done = state["done_bytes"]
                if progress is not None:
                    progress(rep, done, total)
                dlog.info(
                    "seed_export_progress",
                    done_bytes=done,
                    total_bytes=total,
                    percent=round(100 * done / max(total, 1), 1),
                    bytes_per_second=round(done / max(now - started, 1e-6)),
                )
        await asyncio.to_thread(media.finish)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise SeedError(
            f"writing {req.directory / rep.vm.name / media.image} for vm {rep.vm.name} disk "
            f"{rep.disk.id} failed: "
            f"{exc.strerror or exc}",
            code="media_full" if full else "media_error",
            status=507 if full else 500,
            fix="free space on the media (or use a larger one), then rerun with --resume"
            if full
            else "check the media, then rerun with --resume",
        ) from None
    finally:
        media.close()
    if progress is not None:
        progress(rep, total, total)
    seconds = round(time.monotonic() - started, 3)
    s = media.stats
    dlog.info(
        "seed_image_written",
        written_bytes=s.written,
        zero_bytes=s.zero,
        reused_bytes=s.reused,
        hole_bytes=s.holes,
        seconds=seconds,
    )
    return {
        "id": rep.disk.id,
        "disk_size": size,
        "block_size": rep.export.block_size,
        "seq": plan.seq,
        "cut_time_ns": cut.cut_time_ns,
        "cut_id": cut.cut_id,
        "image": f"{rep.vm.name}/{rep.disk.id}.img",
        "hashes": f"{rep.vm.name}/{rep.disk.id}.xxh3",
        "written_bytes": s.written,
        "zero_bytes": s.zero,
        "reused_bytes": s.reused,
        "hole_bytes": s.holes,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------
# one VM, and the whole request


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_to_manifest(media: MediaDir, vm_entry: dict[str, Any], source: dict[str, str]) -> None:
    """Put ``vm_entry`` into ``DIR/manifest.json`` (replacing an older entry of the VM)."""
    doc = media.read_json(MANIFEST) or {
        "format": SEED_FORMAT,
        "version": 1,
        "source": source,
        "vms": [],
    }
    doc["created"] = _now()
    doc["vms"] = [v for v in doc.get("vms", []) if v.get("uuid") != vm_entry["uuid"]]
    doc["vms"].append(vm_entry)
    media.write_json(MANIFEST, doc)


async def export_vm(
    worker: VMWorker,
    req: ExportRequest,
    source: dict[str, str],
    progress: Progress | None,
    media: MediaDir,
    reuse: set[str] | None,
) -> dict[str, Any]:
    """Cut every disk of the VM at one instant and write them to the media."""
    vm = worker.vm
    vm_dir = await asyncio.to_thread(media.subdir, vm.name)
    try:
        return await _export_vm(worker, req, source, progress, media, vm_dir, reuse)
    finally:
        os.close(vm_dir)


async def _export_vm(
    worker: VMWorker,
    req: ExportRequest,
    source: dict[str, str],
    progress: Progress | None,
    media: MediaDir,
    vm_dir: int,
    reuse: set[str] | None,
) -> dict[str, Any]:
    vm = worker.vm
    async with worker.lock:  # no batch of this VM ships while its disks are frozen for media
        plans = [await plan_disk(rep, force=req.force) for rep in worker.replicators]
        frozen = await worker.hooks.freeze() if worker.hooks.configured else False
        # No await between these: one loop step, so one instant for all the VM's disks. The
        # media's cut is a cut of the VM like any other: it takes the VM's next cut id.
        cut_id = worker.next_cut_id()
        cut_time = time.time_ns()
        cuts = [(p, p.rep.begin_seed_cut(cut_time, cut_id)) for p in plans]
        if frozen:
            await worker.hooks.thaw()
        log.info(
            "seed_export_started",
            vm=vm.name,
            seqs={p.rep.disk.id: p.seq for p in plans},
            dir=str(req.directory),
            app_consistent=frozen,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(write_disk(p, cut, vm_dir, req, progress, reuse))
                    for p, cut in cuts
                ]
        except BaseException as exc:
            for p, _cut in cuts:
                p.rep.abort_seed_export()
                p.rep.seed_export = None
            cause = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
            log.warning("seed_export_failed", vm=vm.name, error=str(cause))
            raise cause from None
        disks = [t.result() for t in tasks]
        # The images are durable: from here on each disk waits for the import of its seq.
        for i, (p, cut) in enumerate(cuts):
            p.rep.seed_export = None
            try:
                p.rep.finish_seed_export(
                    cut,
                    seq=p.seq,
                    base_seq=p.base_seq,
                    generation=p.generation,
                    directory=req.directory,
                )
            except BaseException:
                for q, _cut in cuts[i:]:
                    q.rep.abort_seed_export()
                raise
        entry = {
            "name": vm.name,
            "uuid": str(vm.uuid),
            "generation": plans[0].generation,
            "labels": dict(vm.labels),
            "source": source,
            "disks": [
                {**d, "consistency": int(Consistency.APP if frozen else Consistency.CRASH)}
                for d in disks
            ],
        }
        try:
            await asyncio.to_thread(add_to_manifest, media, entry, source)
        except OSError as exc:
            raise SeedError(
                f"writing {req.directory / MANIFEST} failed: {exc.strerror or exc}; the disks of "
                f"vm {vm.name} wait for media that is not complete",
                code="media_error",
                status=507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500,
                fix="free space on the media, then rerun the export with --resume",
            ) from None
    log.info("seed_exported", vm=vm.name, dir=str(req.directory), seqs=[d["seq"] for d in disks])
    return entry


async def export_media(
    workers: list[VMWorker],
    req: ExportRequest,
    *,
    host: str,
    site: str,
    progress: Progress | None = None,
    peer_uid: int | None = None,
) -> dict[str, Any]:
    """The whole ``POST /v1/seed/export``: select, check everything, then export VM by VM.

    ``peer_uid`` is the user who asked (``SO_PEERCRED``): the media directory must belong to
    them or to the agent's user.
    """
    chosen, unknown = select(workers, req.vms, req.selector)
    answer: dict[str, Any] = {
        "host": host,
        "site": site,
        "dir": str(req.directory),
        "export_id": req.export_id,
        "dry_run": req.dry_run,
        "unknown": unknown,
        "vms": [],
    }
    media = await asyncio.to_thread(MediaDir.open, req.directory, peer_uid=peer_uid, create=False)
    try:
        await asyncio.to_thread(check_directory, req, chosen, media)
        plans = {
            w.vm.name: [await plan_disk(r, force=req.force) for r in w.replicators] for w in chosen
        }
        need = await asyncio.to_thread(check_space, req, chosen, media)
        if req.dry_run:
            answer["needed_bytes"] = need
            answer["vms"] = [
                {
                    "name": w.vm.name,
                    "uuid": str(w.vm.uuid),
                    "disks": [
                        {
                            "id": p.rep.disk.id,
                            "seq": p.seq,
                            "disk_size": p.rep.export.size,
                            "replica": p.replica,
                        }
                        for p in plans[w.vm.name]
                    ],
                }
                for w in chosen
            ]
            return answer
        if media is None:
            media = await asyncio.to_thread(
                MediaDir.open, req.directory, peer_uid=peer_uid, create=True
            )
            assert media is not None
        marker = await asyncio.to_thread(media.read_json, MARKER)
        listed = set((marker or {}).get("files") or ())
        reuse = set(listed) if req.resume else None
        # Listed before they are written: --resume trusts only the files the marker names.
        files = sorted(listed | set(_planned_files(chosen)))
        if marker is None or marker.get("export_id") != req.export_id or listed != set(files):
            doc = {
                "format": "replikant-seed-export",
                "export_id": req.export_id,
                "host": host,
                "started": _now(),
                "files": files,
            }
            await asyncio.to_thread(media.write_json, MARKER, doc)
        source = {"host": host, "site": site}
        for w in chosen:
            answer["vms"].append(await export_vm(w, req, source, progress, media, reuse))
        return answer
    finally:
        if media is not None:
            media.close()


async def cancel_seeds(workers: list[VMWorker], names: tuple[str, ...]) -> dict[str, Any]:
    """``POST /v1/seed/cancel``: the named VMs' disks stop waiting for their media."""
    chosen, unknown = select(workers, names, {})
    out = []
    for w in chosen:
        async with w.lock:
            disks = [{"id": r.disk.id, "cancelled": r.cancel_seed()} for r in w.replicators]
        out.append({"name": w.vm.name, "uuid": str(w.vm.uuid), "disks": disks})
    return {"vms": out, "unknown": unknown}
