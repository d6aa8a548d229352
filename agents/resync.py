"""Hash-compare resync of one disk, over the whole disk or only over the regions change maps name.

Moved out of :mod:`agents.replicate` with the change maps reverse replication uses (decision
042): the old primary's agent reports, when it releases its images, the regions its change map
holds (:func:`old_primary_regions`); the reverse command hands them to the new primary's agent,
which keeps them beside the disk's state (:func:`save_hint`) until the comparison is done, so an
agent restart in between still compares only those regions.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from uuid import UUID

from structlog.stdlib import BoundLogger

from agents.dirtymap import DATA, REGION_SIZE, Recovery
from agents.disk import TrackedExport
from agents.errors import ShipError
from agents.ship import BrokerClient
from agents.state import DiskState
from common.blockhash import block_hash
from common.fsio import atomic_write_json, read_json
from common.regions import Region, chunks, coalesce, from_flags, to_blocks, total, union

VERIFY_CHUNK = 64 * 1024 * 1024
HINT_SUFFIX = ".reverse.json"
# Mapped regions closer than this are hashed as one: a fragmented map costs a few more bytes
# read instead of one hash request per fragment.
GAP = 1024 * 1024


def old_primary_regions(
    export: TrackedExport, recovery: Recovery, state: DiskState | None
) -> dict[str, Any]:
    """What this site wrote that the replica may lack: ``{"regions": [...] | None, "why"}``.

    Called while the export is still open: the active map (every write not durably acked,
    in-flight batches merged back) united with the persisted 4 MiB regions (cleared only after
    a durable ack, so they also cover what a kill -9 left in flight).
    """
    if recovery.tracking_lost:
        return {"regions": None, "why": f"its change map is unusable: {recovery.tracking_lost}"}
    if state is None or not state.initial_done:
        return {"regions": None, "why": "its initial copy to the replica never completed"}
    if state.verify_pending:
        return {"regions": None, "why": "a hash comparison with the replica was interrupted"}
    if recovery.fresh and state.acked_seq:
        return {"regions": None, "why": "its change map is missing (the disk replicated before)"}
    dm = export.map
    fine = [(b0 << dm.shift, (b1 - b0) << dm.shift) for b0, b1, _ in dm.active.runs()]
    coarse = from_flags(dm.persisted_region_flags(), REGION_SIZE, dm.size)
    return {"regions": [list(r) for r in union(fine, coarse)], "why": "change map"}


def mark_rolled_back(export: TrackedExport, disk_id: str, rolled_back: Any) -> int:
    """Mark in the promoted disk's fresh map the regions the broker rolled back; the bytes."""
    raw = rolled_back.get(disk_id, []) if isinstance(rolled_back, dict) else []
    marked = to_blocks(_regions(raw), export.block_size, export.size)
    for o, n in marked:
        export.map.mark(o, n, DATA)
    return total(marked)


def _regions(raw: Any) -> list[Region]:
    """``[[offset, length], ...]`` from a request, validated (ValueError names what is wrong)."""
    regions = [(int(o), int(n)) for o, n in raw]
    if any(o < 0 or n < 0 for o, n in regions):
        raise ValueError("regions must be [offset, length] pairs of non-negative integers")
    return regions


def hint_path(state_path: Path) -> Path:
    """Where the reverse command's regions for the disk whose state is ``state_path`` live."""
    return state_path.with_name(state_path.stem + HINT_SUFFIX)


def save_hint(path: Path, doc: Any) -> None:
    """Keep the old primary's regions (validated) until the comparison is done (0600)."""
    regions = doc.get("regions") if isinstance(doc, dict) else None
    if regions is not None:
        regions = [list(r) for r in _regions(regions)]
    why = str(doc.get("why", "")) if isinstance(doc, dict) else "no regions sent"
    atomic_write_json(path, {"regions": regions, "why": why[:500]})


def load_hint(path: Path) -> tuple[list[Region] | None, str]:
    """The kept regions, or None and why there are none."""
    try:
        doc = read_json(path)
        regions = doc["regions"]
        why = str(doc.get("why", ""))
        if regions is None:
            return None, f"the old primary's change map is not usable ({why})"
        return [(int(o), int(n)) for o, n in regions], why
    except FileNotFoundError:
        return None, "no change map from the old primary was handed over"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"the old primary's regions in {path} are unreadable ({exc})"


def _pinned(path: Path) -> bool:
    try:
        return bool(read_json(path).get("pinned"))
    except (OSError, ValueError, AttributeError):
        return False


def drop_hint(path: Path) -> None:
    """The comparison is done: the regions are spent."""
    path.unlink(missing_ok=True)


def save_hints(base: Path, disk_ids: list[str], sent: Any) -> None:
    """Keep the regions the reverse command sent (``[{"disk_id", "regions", "why"}]``) for each
    configured disk; a disk it did not name gets none (compared in full, saying so)."""
    if not isinstance(sent, list):
        raise ValueError("disks must be a list of {disk_id, regions, why}")
    by_id = {str(d.get("disk_id")): d for d in sent if isinstance(d, dict)}
    for disk_id in disk_ids:  # configured ids only: nothing from outside becomes a path
        path = hint_path(base / f"{disk_id}.json")
        if _pinned(path):
            continue
        if disk_id in by_id:
            save_hint(path, by_id[disk_id])
        else:
            drop_hint(path)


def promoted(base: Path, disk_id: str, point: str, rolled_back: Any) -> None:
    """A promotion at ``point``: tracking starts over at the handover (the map is dropped). The
    regions a point older than the latest rolled back go into the new map once the export
    opens (:func:`mark_rolled_back`); without them no change map names those blocks, so the
    reverse that follows compares this disk in full (a hint the reverse command cannot replace).
    """
    for name in (f"{disk_id}.map", f"{disk_id}.map.fine"):
        (base / name).unlink(missing_ok=True)
    path = hint_path(base / f"{disk_id}.json")
    if isinstance(rolled_back, dict) and disk_id in rolled_back:
        _regions(rolled_back[disk_id])  # refused before the role changes, not after
    if point == "latest" or (isinstance(rolled_back, dict) and disk_id in rolled_back):
        drop_hint(path)
    else:
        why = (
            f"the VM was promoted from the older point {point}: "
            "the blocks rolled back are in no change map"
        )
        atomic_write_json(path, {"regions": None, "why": why, "pinned": True})


async def compare(
    client: BrokerClient,
    export: TrackedExport,
    vm_uuid: UUID,
    disk_id: str,
    log: BoundLogger,
    regions: list[Region] | None,
) -> int:
    """Mark every block (of ``regions``, or the whole disk) that differs from the replica's.

    Returns the bytes hashed locally.
    """
    for _ in range(120):  # the hashes must reflect everything durable
        rs = await client.state(vm_uuid, disk_id)
        if rs.applied_seq >= rs.durable_seq:
            break
        await asyncio.sleep(0.5)
    bs = export.block_size
    size = export.size
    whole = [(0, size)] if regions is None else coalesce(to_blocks(regions, bs, size), GAP)
    marked = 0
    for offset, length in chunks(whole, VERIFY_CHUNK):
        try:
            remote, _seq = await client.hashes(vm_uuid, disk_id, bs, offset, length)
        except ShipError as exc:
            if exc.status in (404, 405, 501) and exc.code != "unknown_vm":
                log.warning("hashes_unsupported_marking_all", error=str(exc))
                for o, n in whole:
                    export.map.mark(o, n, DATA)
                return 0
            raise
        local = await asyncio.to_thread(_local_hashes, export, offset, length)
        for i in range(0, len(local), 8):
            if remote[i : i + 8] != local[i : i + 8]:
                start = offset + (i // 8) * bs
                export.map.mark(start, min(bs, size - start), DATA)
                marked += 1
    hashed = total(whole)
    log.info("resync_compared", differing_blocks=marked, block_size=bs, hashed_bytes=hashed)
    return hashed


def _local_hashes(export: TrackedExport, offset: int, length: int) -> bytes:
    bs = export.block_size
    out = bytearray()
    end = offset + length
    for pos in range(offset, end, bs):
        out += block_hash(os.pread(export.bulk_fd, min(bs, end - pos), pos))
    return bytes(out)
