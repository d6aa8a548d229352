"""Seed export orchestration: cut each selected VM at one instant, write its disks to the
media, record the manifest, and cancel a wait for media that was lost."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import time
from typing import TYPE_CHECKING, Any

from agents.body import MAX_EXTENT
from agents.dirtymap import DATA
from agents.errors import SeedError
from agents.seed import (
    DiskPlan,
    ExportRequest,
    check_directory,
    check_space,
    plan_disk,
    planned_files,
    select,
)
from agents.seedmedia import MANIFEST, MARKER, SEED_FORMAT, MediaDir, MediaImage, Progress
from common.hrl import Consistency
from common.logs import get_logger

if TYPE_CHECKING:
    from agents.cut import Cut
    from agents.worker import VMWorker

log = get_logger("agents.seedexport")

_PROGRESS_SECONDS = 2.0


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
    dlog = rep.log.bind(seq=plan.seq)
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
        files = sorted(listed | set(planned_files(chosen)))
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
