"""Seeding a replica from offline media (`replikant seed import DIR`), broker side.

The media directory is written at the source by `replikant seed export` (the agent; format in
docs/protocol/http.md, "Offline seed media")::

    DIR/manifest.json
    DIR/<vm-name>/<disk-id>.img      raw image of the disk at cut ``seq`` (sparse where zero)
    DIR/<vm-name>/<disk-id>.xxh3     optional: its hash list (:mod:`common.blockhash`)

Every disk's identity is checked against this broker *before* a byte is written: a replica that
exists for another VM name or size, a replica that already holds data, or media of another VM
than the operator named (``--vm``) is refused up front, naming both identities. Then each image
is copied sparsely into the replica (blocks already equal, e.g. from an interrupted import, are
not rewritten), checked against the block hashes, and the replica is marked applied and durable
at the export's ``seq``: the agent ships only the changes since the export.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import names
from broker.applied import AppliedRecord
from broker.errors import BadRequest, IdentityConflict, IdentityMismatch, StoreCorrupt
from broker.store import Replica
from common.blockhash import block_hash, hash_at
from common.fsio import data_segments, pread_exact, punch_hole, pwrite_all
from common.logs import get_logger

if TYPE_CHECKING:
    from broker.api import Replicas

_log = get_logger("broker.seed")

MANIFEST = "manifest.json"
SEED_FORMAT = "replikant-seed"
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class SeedDisk:
    """One disk on the media."""

    vm_name: str
    vm_uuid: str
    generation: int
    labels: dict[str, str]
    source_host: str
    source_site: str
    disk_id: str
    disk_size: int
    block_size: int
    seq: int | None  # None: a copy of unknown age (the agent then compares hashes)
    cut_ns: int
    consistency: int
    image: Path
    hashes: Path | None
    cut_id: int = 0  # the VM cut the media holds (0: media written before cut ids)

    @property
    def identity(self) -> str:
        """How messages name it."""
        return f"vm {self.vm_name} ({self.vm_uuid}) disk {self.disk_id}"


def read_manifest(directory: Path) -> list[SeedDisk]:
    """Parse and validate ``DIR/manifest.json``."""
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadRequest(
            f"{path} does not exist: {directory} is not seed media",
            fix="point at the directory `replikant seed export` wrote (on the broker host)",
        ) from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{path} is not readable JSON: {exc}") from None
    if doc.get("format") != SEED_FORMAT or doc.get("version") != 1:
        raise BadRequest(f"{path} is not a version 1 {SEED_FORMAT} manifest")
    source = doc.get("source", {})
    disks: list[SeedDisk] = []
    # The media comes from outside: every name in it is checked before it becomes a path.
    try:
        host = str(source.get("host", ""))
        site = str(source.get("site", ""))
        for vm in doc["vms"]:
            for d in vm["disks"]:
                disks.append(
                    SeedDisk(
                        vm_name=names.name(vm["name"], "manifest vms[].name"),
                        vm_uuid=names.vm_uuid(vm["uuid"], "manifest vms[].uuid"),
                        generation=int(vm.get("generation", 1)),
                        labels=names.labels(vm.get("labels", {}), "manifest vms[].labels"),
                        source_host=names.name(host, "manifest source.host") if host else "",
                        source_site=names.name(site, "manifest source.site") if site else "",
                        disk_id=names.disk_id(d["id"], "manifest disks[].id"),
                        disk_size=int(d["disk_size"]),
                        block_size=int(d["block_size"]),
                        seq=int(d["seq"]) if d.get("seq") is not None else None,
                        cut_ns=int(d.get("cut_time_ns", 0)),
                        consistency=int(d.get("consistency", 0)),
                        image=_media_file(directory, d["image"], "manifest disks[].image"),
                        hashes=_media_file(directory, d["hashes"], "manifest disks[].hashes")
                        if d.get("hashes")
                        else None,
                        cut_id=int(d.get("cut_id", 0)),
                    )
                )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"{path} is malformed: {exc!r}") from None
    for d in disks:
        if not d.image.is_file():
            raise BadRequest(f"seed media lacks the image {d.image} of {d.identity}")
        if d.image.stat().st_size != d.disk_size:
            raise BadRequest(
                f"seed image {d.image} is {d.image.stat().st_size} bytes; the manifest says "
                f"{d.identity} is {d.disk_size}"
            )
    return disks


def _media_file(directory: Path, value: object, field: str) -> Path:
    """A file named by the manifest: a relative path of checked names inside the media."""
    text = str(value)
    parts = text.split("/")
    if text.startswith("/") or not all(_valid_part(p) for p in parts):
        raise names.refuse(field, value, "a relative path of [A-Za-z0-9][A-Za-z0-9._-]* names")
    return names.inside(directory, *parts)


def _valid_part(part: str) -> bool:
    try:
        names.disk_id(part)
    except BadRequest:
        return False
    return True


def check_seed(service: Replicas, disks: list[SeedDisk], expect_vm: str | None) -> None:
    """Every refusal, before anything is written."""
    if expect_vm is not None:
        wanted = {d.vm_uuid for d in disks if expect_vm in (d.vm_name, d.vm_uuid)}
        if not wanted:
            found = sorted({f"{d.vm_name} ({d.vm_uuid})" for d in disks})
            raise IdentityMismatch(
                f"the seed media holds {', '.join(found)}, not vm {expect_vm}",
                fix="use the media exported for this VM",
                details={"media": found, "expected": expect_vm},
            )
    for d in disks:
        # The same VM name here under another UUID means: a different VM with a reused name.
        for r in service.store.replicas():
            if r.meta.vm_name == d.vm_name and r.meta.vm_uuid != d.vm_uuid:
                raise IdentityMismatch(
                    f"the seed media holds {d.identity}, but vm {d.vm_name} here is "
                    f"{r.meta.vm_uuid}: the copy belongs to a different VM",
                    fix="use the media exported for this VM; VMs are identified by UUID",
                    details={
                        "media": {"vm_name": d.vm_name, "vm_uuid": d.vm_uuid},
                        "replica": {"vm_name": r.meta.vm_name, "vm_uuid": r.meta.vm_uuid},
                    },
                )
        replica = service.store.get(d.vm_uuid, d.disk_id)
        if replica is None:
            continue
        m = replica.meta
        if m.vm_name != d.vm_name or m.disk_size != d.disk_size:
            raise IdentityMismatch(
                f"the seed media holds {d.identity} ({d.disk_size} bytes) but the replica here "
                f"is vm {m.vm_name} ({m.vm_uuid}) disk {m.disk_id} ({m.disk_size} bytes)",
                fix="use the media exported for this VM",
                details={
                    "media": {"vm_name": d.vm_name, "disk_size": d.disk_size},
                    "replica": {"vm_name": m.vm_name, "disk_size": m.disk_size},
                },
            )
        if m.applied_seq or m.durable_seq or m.initial_sync not in ("pending", "seeded"):
            raise IdentityConflict(
                f"the replica of {d.identity} already holds data (durable seq "
                f"{m.durable_seq}); seeding would overwrite it",
                fix="seed only new replicas; disable and re-enable this one to start over",
                details={"durable_seq": m.durable_seq, "applied_seq": m.applied_seq},
            )


def copy_image(d: SeedDisk, replica: Replica) -> dict[str, int]:
    """Copy the media image into the replica sparsely, checking block hashes (blocking)."""
    hashes = d.hashes.read_bytes() if d.hashes is not None else None
    bs = d.block_size
    if hashes is not None and len(hashes) != 8 * (-(-d.disk_size // bs)):
        raise BadRequest(f"hash file {d.hashes} does not cover {d.identity}")
    copied = skipped = 0
    started = time.monotonic()
    src = os.open(d.image, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(replica.image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for start, run, allocated in data_segments(src, 0, d.disk_size):
            if not allocated:
                punch_hole(dst, start, run)
                continue
            # Align to blocks so that each block is hashed whole.
            pos = start // bs * bs
            end = min(d.disk_size, -(-(start + run) // bs) * bs)
            while pos < end:
                n = min(_COPY_CHUNK, end - pos)
                data = pread_exact(src, n, pos)
                for off in range(0, n, bs):
                    block = data[off : off + bs]
                    b = (pos + off) // bs
                    h = block_hash(block)
                    if hashes is not None and hash_at(hashes, b) != h:
                        raise StoreCorrupt(
                            f"seed image {d.image} block {b} (offset {pos + off}) does not match "
                            "its hash: the media is corrupt",
                            fix="export the VM again",
                        )
                    if block_hash(pread_exact(dst, len(block), pos + off)) == h:
                        skipped += len(block)  # already there (an interrupted import, resumed)
                        continue
                    pwrite_all(dst, block, pos + off)
                    copied += len(block)
                pos += n
        os.fdatasync(dst)
    finally:
        os.close(src)
        os.close(dst)
    secs = time.monotonic() - started
    _log.info(
        "seed_copied", vm=d.vm_name, disk=d.disk_id, copied=copied, skipped=skipped, seconds=secs
    )
    return {"copied_bytes": copied, "skipped_bytes": skipped}


def disk_for_image(service: Replicas, image: Path, vm: str, disk_id: str) -> SeedDisk:
    """A raw copy or backup of an enabled disk (no manifest): the replica names the identity."""
    replicas = [r for r in service.store.find_vm(vm) if r.meta.disk_id == disk_id]
    if not replicas:
        raise BadRequest(
            f"vm {vm} disk {disk_id} is not enabled here: a raw image carries no identity, so "
            "its replica must exist first",
            fix="let the agent enable replication (it creates the empty replica), then import",
        )
    m = replicas[0].meta
    if not image.is_file() or image.stat().st_size != m.disk_size:
        size = image.stat().st_size if image.is_file() else None
        raise IdentityMismatch(
            f"image {image} is {size} bytes but vm {m.vm_name} ({m.vm_uuid}) disk {m.disk_id} "
            f"is {m.disk_size} bytes: it is not a copy of this disk",
            fix="use a copy or backup of this very disk",
            details={"image_size": size, "disk_size": m.disk_size},
        )
    return SeedDisk(
        vm_name=m.vm_name,
        vm_uuid=m.vm_uuid,
        generation=m.generation,
        labels=m.labels,
        source_host=m.source_host,
        source_site=m.source_site,
        disk_id=m.disk_id,
        disk_size=m.disk_size,
        block_size=m.block_size,
        seq=None,
        cut_ns=0,
        consistency=0,
        image=image,
        hashes=None,
    )


async def import_seed(
    service: Replicas,
    directory: Path,
    *,
    expect_vm: str | None,
    image: tuple[Path, str, str] | None = None,
) -> dict[str, Any]:
    """Check everything, then import every disk on the media (or one raw ``image`` for
    ``(vm, disk)``); returns a summary."""
    if image is not None:
        disks = [disk_for_image(service, image[0], image[1], image[2])]
    else:
        disks = await asyncio.to_thread(read_manifest, directory)
    check_seed(service, disks, expect_vm)
    service.check_space(needed=0)
    results = []
    for d in disks:
        replica, _ = await asyncio.to_thread(
            service.store.create_replica,
            vm_uuid=d.vm_uuid,
            disk_id=d.disk_id,
            vm_name=d.vm_name,
            disk_size=d.disk_size,
            block_size=d.block_size,
            generation=d.generation,
            source_host=d.source_host,
            source_site=d.source_site,
            labels=d.labels,
            epoch=service.epoch,
        )
        engine = service.engines.pop(replica.key, None)
        if engine is not None:
            await engine.stop()
            engine.close()
        stats = await service.fenced(replica, copy_image, d, replica)
        if d.seq is None:
            # An existing copy of unknown age: the agent compares block hashes and ships only
            # the differing blocks (initial_sync "seeded" with durable_seq 0 tells it to).
            await service.fenced(
                replica,
                replica.update_meta,
                initial_sync="seeded",
                seed={"dir": str(directory), "seq": None, "imported_ns": time.time_ns()},
            )
            service.engine_for(replica)
            _log.info("seed_imported", vm=d.vm_name, disk=d.disk_id, seq=None, **stats)
            results.append(
                {"vm": d.vm_name, "uuid": d.vm_uuid, "disk": d.disk_id, "seq": None, **stats}
            )
            continue
        record = AppliedRecord(
            generation=d.generation,
            seq=d.seq,
            cut_ns=d.cut_ns,
            consistency=d.consistency,
            full=False,
            epoch=service.epoch,
            applied_ns=time.time_ns(),
            seeded=True,
            cut_id=d.cut_id,
        )
        await service.fenced(replica, replica.append_applied, record)
        await service.fenced(
            replica,
            replica.update_meta,
            generation=d.generation,
            applied_generation=d.generation,
            applied_seq=d.seq,
            durable_seq=d.seq,
            applied_cut_ns=d.cut_ns,
            durable_cut_ns=d.cut_ns,
            applied_cut_id=d.cut_id,
            applied_first_change_cut=0,
            durable_cut_id=d.cut_id,
            applied_consistency=d.consistency,
            applied_full=False,
            initial_sync="complete",
            seed={"dir": str(directory), "seq": d.seq, "imported_ns": time.time_ns()},
        )
        service.engine_for(replica)
        _log.info("seed_imported", vm=d.vm_name, disk=d.disk_id, seq=d.seq, **stats)
        results.append(
            {"vm": d.vm_name, "uuid": d.vm_uuid, "disk": d.disk_id, "seq": d.seq, **stats}
        )
    return {"imported": results}
