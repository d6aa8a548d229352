"""Byte-range arithmetic, sans I/O.

A region is ``(offset, length)`` in bytes. Reverse replication takes the union of the change
maps of both sites, rounds it out to whole blocks of the disk, and compares or ships only that
(decision 042); a point-in-time export's block status takes the replica's holes less what undo
data or the reader's own writes cover (``broker/zeros.py``, ``broker/pitexport.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Region = tuple[int, int]


def union(*groups: Iterable[Region]) -> list[Region]:
    """The sorted union of every group: touching or overlapping regions merged, empty ones gone."""
    spans = sorted((o, o + n) for g in groups for o, n in g if n > 0)
    out: list[list[int]] = []
    for lo, hi in spans:
        if lo < 0:
            raise ValueError(f"region at negative offset {lo}")
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in out]


def subtract(regions: Iterable[Region], minus: Iterable[Region]) -> list[Region]:
    """The parts of ``regions`` that no region of ``minus`` covers, sorted and merged."""
    cut = union(minus)
    out: list[Region] = []
    j = 0  # both lists are sorted: one pass
    for lo, n in union(regions):
        pos, hi = lo, lo + n
        while j < len(cut) and cut[j][0] + cut[j][1] <= pos:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < hi:
            if cut[k][0] > pos:
                out.append((pos, cut[k][0] - pos))
            pos = max(pos, cut[k][0] + cut[k][1])
            k += 1
        if pos < hi:
            out.append((pos, hi - pos))
    return out


def to_blocks(regions: Iterable[Region], block_size: int, size: int) -> list[Region]:
    """``regions`` rounded out to whole blocks of ``block_size``, clipped to a disk of ``size``."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two")
    rounded = []
    for o, n in regions:
        lo = o - o % block_size
        hi = min(-(-(o + n) // block_size) * block_size, size)
        if hi > lo:
            rounded.append((lo, hi - lo))
    return union(rounded)


def coalesce(regions: Iterable[Region], gap: int) -> list[Region]:
    """``regions`` with gaps shorter than ``gap`` filled: fewer, larger requests for a
    fragmented map, at the cost of at most ``gap`` extra bytes per merge."""
    out: list[list[int]] = []
    for o, n in union(regions):
        if out and o - (out[-1][0] + out[-1][1]) < gap:
            out[-1][1] = o + n - out[-1][0]
        else:
            out.append([o, n])
    return [(o, n) for o, n in out]


def total(regions: Iterable[Region]) -> int:
    """Bytes covered by ``regions`` (which must not overlap: pass them through :func:`union`)."""
    return sum(n for _, n in regions)


def chunks(regions: Iterable[Region], limit: int) -> list[Region]:
    """``regions`` split into pieces of at most ``limit`` bytes (one hash request each)."""
    return [(o + i, min(limit, n - i)) for o, n in regions for i in range(0, n, limit)]


def from_flags(flags: bytes, region_size: int, size: int) -> list[Region]:
    """The regions of a persisted region map (one byte per ``region_size``, non-zero = dirty)."""
    return union(
        (r * region_size, min(region_size, size - r * region_size))
        for r, marked in enumerate(flags)
        if marked
    )


def change_map_summary(maps: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What the old primary's change maps (``{"disk_id", "regions", "why"}`` each) let reverse
    skip: the bytes they name, and each disk that is compared in full instead, with why."""
    mapped, full = 0, {}
    for m in maps:
        if m.get("regions") is None:
            full[str(m["disk_id"])] = f"compared by hashes in full: {m.get('why', '')}"
        else:
            mapped += total(union((int(o), int(n)) for o, n in m["regions"]))
    return {"mapped_bytes": mapped, "full_compare": full}
