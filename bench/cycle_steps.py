"""The steps a replication cycle adds to the agent's NBD loop, for small and big disks.

    .venv/bin/python bench/cycle_steps.py [--quick] [--sizes-gib 1,16,100] [--writes 20000]
                                          [--rounds 5] [--dir /var/tmp]

A guest request that arrives while the NBD loop runs one of these steps waits for it (issue 10,
point 2: the guest never waits for shipping), so each must stay short however big the disk is.
A real :class:`agents.disk.TrackedExport` serves a sparse image of each size in ``--dir`` with
its persisted map, on a uvloop loop in this process. Each round: ``--writes`` random 4 KiB guest
writes through the export, spread over the whole disk (a database's scattered writes: every
4 MiB region of a 100 GiB disk gets some), the cut (``begin_cut``), a tenth as many writes more
(the next cycle's), then the end of the cut after its ack (``end_cut(acked=True)``: the copies
released, the persisted regions without newer writes cleared) and the loop iterations it leaves
behind (the cut's map released, the next cut's made), each timed alone. The shipping between
the cut and its end is not here: ``writepath.py`` measures the whole product.

Reported per size and step: p50 and max over the rounds, in microseconds, wall time. No peer
runs the same steps; before-vs-now is the same command on two commits
(``PYTHONPATH=<checkout of the other commit>``), alternately. Target: every step under 1 ms.
Results: ``bench/results/cycle-steps-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Appended, not put first: PYTHONPATH=<another checkout> then times that commit's agent.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from broker_common import save_result

from agents.disk import TrackedExport

try:  # what `replikant agent run` sets at start, on commits that have it (for before-vs-now)
    from agents.disk import COW_MEMORY_LIMIT
    from common.heap import keep_freed_memory
except ImportError:
    pass
else:
    keep_freed_memory(COW_MEMORY_LIMIT)

GiB = 1 << 30
PAGE = 4096
TARGET_US = 1000.0
AFTER_STEPS = 3  # loop iterations timed after the end of the cut (what it scheduled)


def _us(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1000


async def _round(export: TrackedExport, rng: random.Random, writes: int) -> dict[str, float]:
    """One cycle's steps on ``export``: their wall times in microseconds."""
    pages = export.size // PAGE
    data = memoryview(rng.randbytes(PAGE))
    for _ in range(writes):
        export.write(rng.randrange(pages) * PAGE, data, False)
    t0 = time.perf_counter_ns()
    export.begin_cut()
    out = {"begin_cut": _us(t0)}
    for _ in range(writes // 10):
        export.write(rng.randrange(pages) * PAGE, data, False)
    t0 = time.perf_counter_ns()
    export.end_cut(acked=True)
    out["end_cut"] = _us(t0)
    for i in range(AFTER_STEPS):
        t0 = time.perf_counter_ns()
        await asyncio.sleep(0)
        out[f"after_end_{i + 1}"] = _us(t0)
    return out


async def _size(work: Path, size: int, writes: int, rounds: int) -> dict[str, dict[str, float]]:
    image = work / f"disk-{size // GiB}g.img"
    with image.open("wb") as fh:
        fh.truncate(size)
    export = TrackedExport(image, "bench", map_path=work / f"disk-{size // GiB}g.map")
    export.open()
    rng = random.Random(size)
    samples: dict[str, list[float]] = {}
    try:
        await _round(export, rng, writes)  # warm-up: the first cut has no spare map yet
        for _ in range(rounds):
            for step, us in (await _round(export, rng, writes)).items():
                samples.setdefault(step, []).append(us)
    finally:
        export.close()
        image.unlink()
    return {
        step: {"p50_us": round(statistics.median(v), 1), "max_us": round(max(v), 1)}
        for step, v in samples.items()
    }


def main() -> None:
    """Parse arguments, time the steps for each size, print and save the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds (a short run)")
    p.add_argument("--sizes-gib", default="1,16,100", help="disk sizes (comma list, GiB)")
    p.add_argument("--writes", type=int, default=20_000, help="4 KiB guest writes per cycle")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default="/var/tmp", help="where the sparse images go")
    args = p.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.writes = min(args.writes, 5_000)
    sizes = [int(s) * GiB for s in args.sizes_gib.split(",")]
    work = Path(args.dir) / f"replikant-bench-cycle-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        figures = {
            f"{size // GiB}GiB": uvloop.run(_size(work, size, args.writes, args.rounds))
            for size in sizes
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(f["max_us"] for steps in figures.values() for f in steps.values())
    doc = {"bench": "cycle_steps", "args": vars(args), "figures": figures, "worst_us": worst}
    print(f"saved {save_result('cycle-steps', doc)}")
    for size, steps in figures.items():
        print(f"{size:>7}  " + "  ".join(
            f"{step} {f['p50_us']:.0f}/{f['max_us']:.0f}" for step, f in steps.items()
        ) + "  (us, p50/max)")  # fmt: skip
    verdict = "ok" if worst < TARGET_US else "MISS"
    print(f"longest step {worst:.0f} us, target < {TARGET_US:.0f}: {verdict}")


if __name__ == "__main__":
    main()
