"""Per-extent cost of the agent's batch body: ``python bench/agent_extents.py``.

Writes ``--writes`` random 4 KiB pages into a tracked export on a tmpfs image (64 KiB tracking
blocks, the default), cuts it, and streams the cut through :func:`agents.ship.batch_body` (read,
hash, compress, frame) into nothing, ``--rounds`` times per compression. Reports extents per
second of the body alone and the CPU share one disk at 5,000 extents per second would take (the
issue 10 target: a small part of one core), plus bytes shipped per byte written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.body import BatchStats, batch_body, make_header
from agents.disk import TrackedExport
from common.hrl import Compression, Consistency

PAGE = 4096


async def _one_round(
    export: TrackedExport, rng: random.Random, writes: int, compression: Compression
) -> tuple[float, float, int, int]:
    """(wall seconds, cpu seconds, extents, payload bytes) of one batch of ``writes`` pages."""
    pages = export.size // PAGE
    payload = rng.randbytes(PAGE * 64)  # compressible like real data would not be: use random
    for _ in range(writes):
        off = rng.randrange(64) * PAGE
        export.write(rng.randrange(pages) * PAGE, memoryview(payload)[off : off + PAGE], False)
    cut = export.begin_cut()
    wall, cpu = time.perf_counter(), time.process_time()  # planning the header counts too
    header = make_header(
        vm_uuid=uuid.UUID(int=1),
        disk_id="d",
        generation=1,
        seq=1,
        cut=cut,
        consistency=Consistency.CRASH,
        compression=compression,
        full=False,
    )
    stats = BatchStats()
    async for _chunk in batch_body(cut, header, level=1, bucket=None, stats=stats):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    export.end_cut(acked=True)
    return wall, cpu, stats.extents, stats.payload_bytes


async def main() -> None:
    """Run the rounds and print one line per compression."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--writes", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image = Path(tmp) / "d.img"
        with image.open("wb") as fh:
            fh.truncate(args.size_gib << 30)
        export = TrackedExport(image, "d", map_path=Path(tmp) / "d.map")
        export.open()
        try:
            print(f"{args.writes} random 4 KiB writes per batch, {args.size_gib} GiB tmpfs image")
            for compression in (Compression.NONE, Compression.ZSTD):
                rows = [
                    await _one_round(export, rng, args.writes, compression)
                    for _ in range(args.rounds)
                ]
                wall = sum(r[0] for r in rows)
                cpu = sum(r[1] for r in rows)
                extents = sum(r[2] for r in rows)
                ratio = sum(r[3] for r in rows) / (args.writes * args.rounds * PAGE)
                print(
                    f"{compression.name:5} {extents / wall:9.0f} extents/s, "
                    f"{cpu / extents * 1e6:6.1f} us cpu/extent, 5k extents/s = "
                    f"{cpu / extents * 5000 * 100:5.1f} % of a core, shipped/written {ratio:.3f}"
                )
        finally:
            export.close(clean=False)
            os.sync()


if __name__ == "__main__":
    asyncio.run(main())
