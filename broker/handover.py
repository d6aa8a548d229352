"""Failover at the broker (decision 041): hand a replica's image to this site's agent, settle
the failover, and adopt an old primary's image as the replica of a reversed VM.

- :func:`promote` (``POST /v1/vms/{vm}/promote``): with every disk's ingest locked, wait until the
  journal is applied, raise the generation (the old primary is fenced from then on: its batches
  carry the old one), stop the engines and forget the points (the image will change under them),
  and mark the replica ``handed_over``. From then on the file belongs to the agent at this site.
- :func:`settle` (``POST /v1/vms/{vm}/failover``): ``commit`` or ``cancel`` an uncommitted one.
- :func:`adopt` (``POST /v1/vms/{vm}/adopt``): make an existing image (the old primary's disk,
  released by its agent) the replica of the VM at a new generation, bound to the new primary's
  host and marked ``seeded``, so the new primary compares block hashes and ships only the blocks
  that differ: never a full copy of a disk that exists on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.api import Admin
from broker.apply import ReplicaEngine
from broker.errors import BadRequest, BrokerError, IdentityConflict, StaleGeneration
from broker.points import Key
from broker.store import Replica
from broker.views import resolve_vm_point
from common.config import NAME_PATTERN
from common.fsio import pread_exact, pwrite_all
from common.logs import get_logger
from common.regions import Region, total, union
from common.tls import Identity

_log = get_logger("broker.handover")

DRAIN_SECONDS = 60.0
ROLLBACK_CHUNK = 4 * 1024 * 1024


class FailoverState(BrokerError):
    """The VM's failover state forbids the act asked for (the message names state and fix)."""

    status = 409
    code = "failover_state"


class PromoteRequest(BaseModel):
    """Body of ``POST /v1/vms/{vm}/promote``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    generation: int = Field(ge=2)
    point: str = Field(default="latest", pattern=r"^(latest|[0-9]{1,18}:[0-9]{1,18})$")


class SettleRequest(BaseModel):
    """Body of ``POST /v1/vms/{vm}/failover``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    action: Literal["commit", "cancel"]


class AdoptDisk(BaseModel):
    """One disk of an adopt request: the old primary's image of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    disk_id: str = Field(pattern=NAME_PATTERN)
    image: str = Field(min_length=2, max_length=4096)
    disk_size: int = Field(gt=0)
    block_size: int = Field(ge=4096, le=4 * 1024 * 1024)


class AdoptRequest(BaseModel):
    """Body of ``POST /v1/vms/{vm}/adopt``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vm_uuid: str = Field(min_length=36, max_length=36)
    generation: int = Field(ge=2)
    source_host: str = Field(pattern=NAME_PATTERN)
    source_site: str = Field(pattern=NAME_PATTERN)
    disks: list[AdoptDisk] = Field(min_length=1)


def failover_state(replicas: list[Replica]) -> str:
    """``""`` (a replica), ``"uncommitted"`` or ``"committed"`` (handed over at this site)."""
    return replicas[0].meta.handed_over


async def promote(
    service: Admin,
    replicas: list[Replica],
    admin: Identity,
    generation: int,
    *,
    point: str = "latest",
    drain_seconds: float = DRAIN_SECONDS,
) -> dict[str, list[Region]]:
    """Drain, roll back to ``point`` unless it is the latest, raise the generation, stop
    applying, and hand the image over (all disks or none). Returns the regions rolled back per
    disk (the new primary's change map must hold them: decision 042)."""
    first = replicas[0].meta
    engines = [service.engine_for(r) for r in replicas]
    async with contextlib.AsyncExitStack() as stack:
        for engine in engines:
            await stack.enter_async_context(engine.ingest_lock)
        # Checked under the locks: of two concurrent failovers of one VM, the second sees this.
        if first.handed_over:
            raise FailoverState(
                f"vm {first.vm_name} is already failed over at this site ({first.handed_over}, "
                f"generation {first.generation})",
                fix=f"`replikant failover commit {first.vm_name}` or `failover cancel "
                f"{first.vm_name}`, then `replikant reverse {first.vm_name}`",
                details={"state": first.handed_over, "generation": first.generation},
            )
        top = max(r.meta.generation for r in replicas)
        if generation <= top:
            raise StaleGeneration(
                f"vm {first.vm_name} is at generation {top}; promotion needs a higher one",
                fix=f"give generation {top + 1}",
                details={"requested": generation, "replica_generation": top},
            )
        try:
            async with asyncio.timeout(drain_seconds):
                # Polled: the appliers signal progress per disk, and this waits for all of them.
                while any(e.backlog() for e in engines):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            busy = {e.replica.meta.disk_id: e.backlog() for e in engines if e.backlog()}
            raise FailoverState(
                f"vm {first.vm_name}: the journal still holds unapplied batches after "
                f"{drain_seconds:.0f} s ({busy}); the image cannot be handed over half applied",
                fix="see the broker's log for the apply error, then retry the failover",
                details={"backlog": busy},
            ) from None
        rolled: dict[str, list[Region]] = {}
        if point != "latest":
            # A point of every disk at one cut (refused, naming the fix, if there is none).
            _, keys = resolve_vm_point(service, replicas, point)
            for engine, key in zip(engines, keys, strict=True):
                rolled[engine.replica.meta.disk_id] = await service.fenced(
                    engine.replica, _roll_back, engine, key
                )
        for engine in engines:
            await engine.stop()
            service.engines.pop(engine.replica.key, None)
            await service.fenced(engine.replica, engine.points.drop_all)
            engine.close()
        for replica in replicas:
            await service.fenced(
                replica, replica.update_meta, generation=generation, handed_over="uncommitted"
            )
    _log.warning(
        "replica_handed_over",
        vm=first.vm_name,
        vm_uuid=first.vm_uuid,
        disks=[r.meta.disk_id for r in replicas],
        generation=generation,
        point=point,
        rolled_back_bytes={d: total(r) for d, r in rolled.items()},
        images=[str(r.image) for r in replicas],
        admin=admin.uri,
    )
    return rolled


def _roll_back(engine: ReplicaEngine, key: Key) -> list[Region]:
    """Write into the image the blocks where it differs from its state ``key`` (the point's
    view reads them from undo data, which these writes do not touch); returns their regions."""
    view = engine.open_view(key)
    fd, size, block = engine.image_fd, engine.replica.meta.disk_size, engine.replica.meta.block_size
    written: list[Region] = []
    try:
        for offset in range(0, size, ROLLBACK_CHUNK):
            n = min(ROLLBACK_CHUNK, size - offset)
            want, have = view.read(offset, n), pread_exact(fd, n, offset)
            for i in range(0, n, block):
                piece = want[i : i + block]
                if piece != have[i : i + block]:
                    pwrite_all(fd, piece, offset + i)
                    written.append((offset + i, len(piece)))
        os.fdatasync(fd)
    finally:
        view.close()
    return union(written)


async def settle(service: Admin, replicas: list[Replica], admin: Identity, action: str) -> None:
    """Commit an uncommitted failover, or cancel it (the image then waits for the old primary to
    resync it by hashes at the new generation: ``initial_sync`` "seeded")."""
    first = replicas[0].meta
    if first.handed_over != "uncommitted":
        state = first.handed_over or "REPLICA (no failover here)"
        raise FailoverState(
            f"vm {first.vm_name} has no uncommitted failover at this site (state: {state}); "
            f"there is nothing to {action}",
            fix=f"`replikant failover planned|unplanned {first.vm_name}` starts one; "
            "`replikant status` shows the VM's roles",
            details={"state": state, "action": action},
        )
    for replica in replicas:
        if action == "commit":
            await service.fenced(replica, replica.update_meta, handed_over="committed")
        else:
            await service.fenced(replica, _reset_as_replica, replica, replica.meta.generation)
    _log.warning("failover_settled", vm=first.vm_name, action=action, admin=admin.uri)


def _reset_as_replica(replica: Replica, generation: int, **changes: Any) -> None:
    """Make the replica wait for its source's hash comparison at ``generation``."""
    replica.update_meta(
        handed_over="",
        generation=generation,
        applied_generation=generation,
        applied_seq=0,
        durable_seq=0,
        durable_cut_id=0,
        applied_cut_id=0,
        initial_sync="seeded",
        **changes,
    )


def _check_image(path: str, size: int, disk_id: str) -> None:
    """The adopted image is an absolute path to a regular file (not a link) of the disk's size."""
    image = Path(path)
    if not image.is_absolute():
        raise BadRequest(
            f"disk {disk_id}: image {path!r} is not an absolute path",
            fix="give the old primary's image as an absolute path",
            details={"field": "disks[].image"},
        )
    try:
        st = os.lstat(image)
    except OSError as exc:
        raise BadRequest(
            f"disk {disk_id}: image {path} cannot be used: {exc.strerror}",
            fix="give the path of the old primary's image on this host",
            details={"field": "disks[].image"},
        ) from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise BadRequest(
            f"disk {disk_id}: image {path} is not a regular file of {size} bytes "
            f"(a link, a device, or another disk)",
            fix="give the old primary's own image file of this disk",
            details={"field": "disks[].image", "size": st.st_size},
        )


async def adopt(service: Admin, vm_name: str, body: AdoptRequest, admin: Identity) -> list[Replica]:
    """Make the named images the VM's replicas at ``body.generation`` (see the module doc)."""
    for d in body.disks:
        _check_image(d.image, d.disk_size, d.disk_id)
    out: list[Replica] = []
    for d in body.disks:
        existing = service.store.get(body.vm_uuid, d.disk_id)
        if existing is not None:
            m = existing.meta
            if m.generation >= body.generation and not m.handed_over:
                raise StaleGeneration(
                    f"vm {vm_name} disk {d.disk_id} is already a replica at generation "
                    f"{m.generation}",
                    fix=f"adopt at a generation above {m.generation}",
                    details={"requested": body.generation, "replica_generation": m.generation},
                )
            if m.disk_size != d.disk_size or m.vm_name != vm_name:
                raise IdentityConflict(
                    f"replica {body.vm_uuid}/{d.disk_id} belongs to vm {m.vm_name} of "
                    f"{m.disk_size} bytes",
                    fix="a VM keeps its UUID, name and disk size",
                )
            engine = service.engines.pop(existing.key, None)
            if engine is not None:
                await engine.stop()
                await service.fenced(existing, engine.points.drop_all)
                engine.close()
            own = str(existing.path / "replica.img")
            await service.fenced(
                existing,
                _reset_as_replica,
                existing,
                body.generation,
                source_host=body.source_host,
                source_site=body.source_site,
                image_path="" if d.image == own else d.image,
            )
            replica = existing
        else:
            replica, _ = await asyncio.to_thread(
                service.store.create_replica,
                vm_uuid=body.vm_uuid,
                disk_id=d.disk_id,
                vm_name=vm_name,
                disk_size=d.disk_size,
                block_size=d.block_size,
                generation=body.generation,
                source_host=body.source_host,
                source_site=body.source_site,
                image_path=d.image,
                epoch=service.epoch,
            )
            await service.fenced(replica, _reset_as_replica, replica, body.generation)
        service.engine_for(replica)
        out.append(replica)
    _log.warning(
        "replica_adopted",
        vm=vm_name,
        vm_uuid=body.vm_uuid,
        generation=body.generation,
        source_host=body.source_host,
        images=[d.image for d in body.disks],
        admin=admin.uri,
    )
    return out
