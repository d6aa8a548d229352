"""Offline seed media, agent side: what a ``POST /v1/seed/export`` asks for, and every check
that runs before anything is written (the dry run stops after them).

``replikant seed export --dir DIR --vm NAME | --selector k=v`` asks the agents to write the
selected VMs to ``DIR`` on their host (:mod:`agents.seedmedia` writes the files,
:mod:`agents.seedexport` runs the export). For each VM, under its worker's lock (no batch ships
meanwhile), every disk is cut at the same instant with the machinery of the FULL batches
(:meth:`DiskReplicator.begin_seed_cut`): the active dirty map becomes the frozen map, the
allocated range is added to it, and guest writes copy unread blocks aside (copy-on-write) while
the export reads them. The cut is numbered like a batch it will never ship, ``seq``. Once the
images are durable the disk's state file records ``seed_seq`` and the disk waits (mode
``awaiting_seed``) until the broker's replica shows that seq durable — ``replikant seed import``
— and then ships what its dirty map collected since the cut.

An interrupted export is rerun with ``--resume``: it takes a new cut (the old one is gone) but
rewrites only the blocks that differ from what the media already holds.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid as uuid_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.errors import SeedError, ShipError
from agents.replicate import DiskReplicator
from common.config import path_problem
from common.fsio import data_extents
from common.logs import get_logger

if TYPE_CHECKING:
    from agents.worker import VMWorker

from agents.seedmedia import MANIFEST, MARKER, MediaDir

log = get_logger("agents.seed")


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


def planned_files(workers: list[VMWorker]) -> list[str]:
    """The media files an export of ``workers`` writes, relative to the media directory."""
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
            rep.log.warning("seed_export_broker_unreachable", error=str(exc))
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
