"""Per-extent cost of the agent's batch body: ``python bench/agent_extents.py [--guest]``.

Writes ``--writes`` random 4 KiB pages into a tracked export on a tmpfs image (64 KiB tracking
blocks, the default), cuts it, and streams the cut through :func:`agents.body.batch_body` (read,
hash, compress, frame) into nothing, ``--rounds`` times per compression. Reports extents per
second of the body alone and the CPU share one disk at 5,000 extents per second would take (the
issue 10 target: a small part of one core), plus bytes shipped per byte written.

``--guest``: what shipping costs the guest. The export is served by the agent's NBD server on
this process's (uvloop) event loop, fio's nbd engine writes 4 KiB random pages at 20 MiB/s
(queue depth 4, as ``writepath.py``'s latency job) for ``--seconds``, and every second a cut is
encoded on the shipping loop (:mod:`agents.shiploop`, reads hopped to the NBD loop) into
nothing, or not (``off``), alternating ``--rounds`` times; fio and this process share core 0.
Reports fio's completion latency p50/p99 per mode, and the process's CPU microseconds per
shipped extent beyond the ``off`` runs (serving, tracking and cuts are in both). No TLS, HTTP or
broker: ``writepath.py`` measures those with the rest of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.body import BatchStats, batch_body, make_header
from agents.cut import Cut
from agents.disk import TrackedExport
from agents.shiploop import LoopCut, ShipLoop
from common.config import AgentSection
from common.hrl import BatchHeader, Compression, Consistency
from common.nbd.server import NBDServer

PAGE = 4096


def _header(cut: Cut, compression: Compression) -> BatchHeader:
    return make_header(
        vm_uuid=uuid.UUID(int=1),
        disk_id="d",
        generation=1,
        seq=1,
        cut=cut,
        consistency=Consistency.CRASH,
        compression=compression,
        full=False,
    )


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
    stats = BatchStats()
    async for _chunk in batch_body(
        cut, _header(cut, compression), level=1, bucket=None, stats=stats
    ):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    export.end_cut(acked=True)
    return wall, cpu, stats.extents, stats.payload_bytes


async def _drain(cut: Cut, stats: BatchStats) -> None:
    """On the shipping loop: encode ``cut`` into nothing."""
    async for _chunk in batch_body(
        cut, _header(cut, Compression.ZSTD), level=1, bucket=None, stats=stats
    ):
        pass


async def _ship_every_second(export: TrackedExport, ship: ShipLoop, stats: BatchStats) -> None:
    """The agent's cycle, minus the broker: cut, encode on the shipping loop, settle."""
    home = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1.0)
        cut = export.begin_cut()
        try:
            await ship.run(_drain(LoopCut(cut, home), stats))
        finally:
            export.end_cut(acked=True)


async def _fio(uri: str, size: int, seconds: float) -> dict[str, float]:
    """fio's 4 KiB random writes at 20 MiB/s, queue depth 4, on core 0: clat p50/p99 (ms)."""
    proc = await asyncio.create_subprocess_exec(
        "taskset", "-c", "0", "fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}",
        f"--size={size}", f"--runtime={seconds}", "--time_based", "--output-format=json",
        "--refill_buffers", "--rw=randwrite", "--bs=4k", "--iodepth=4", "--rate=20m",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"fio failed with status {proc.returncode}")
    text = out.decode()
    pcts = json.loads(text[text.index("{") :])["jobs"][0]["write"]["clat_ns"]["percentile"]
    return {"p50": pcts["50.000000"] / 1e6, "p99": pcts["99.000000"] / 1e6}


async def guest(args: argparse.Namespace, export: TrackedExport, tmp: Path) -> None:
    """fio's latency with and without shipping, alternating; CPU per shipped extent."""
    os.sched_setaffinity(0, {0})  # with fio, as writepath.py pins the agent
    server = NBDServer([export], default_export="d")
    sock = tmp / "d.sock"
    await server.serve_unix(sock)
    ship = ShipLoop(nice=args.nice)
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        for rnd in range(args.rounds):
            for mode in ("off", "on") if rnd % 2 == 0 else ("on", "off"):
                stats = BatchStats()
                task = asyncio.create_task(_ship_every_second(export, ship, stats))
                if mode == "off":
                    task.cancel()
                cpu = time.process_time()
                fig = await _fio(f"nbd+unix:///d?socket={sock}", export.size, args.seconds)
                fig["cpu"] = time.process_time() - cpu
                fig["extents"] = stats.extents
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if export.cut is not None:
                    export.end_cut(acked=True)
                runs[mode].append(fig)
                print(f"  round {rnd + 1} shipping {mode:3}: clat p50 {fig['p50']:.3f} ms, "
                      f"p99 {fig['p99']:.3f} ms, {stats.extents} extents", flush=True)  # fmt: skip
    finally:
        await ship.close()
        await server.close()
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    extra = sum(r["cpu"] for r in runs["on"]) - sum(r["cpu"] for r in runs["off"])
    extents = sum(r["extents"] for r in runs["on"])
    print(
        f"median clat p99: shipping on {med['on']['p99']:.3f} ms, off {med['off']['p99']:.3f} ms "
        f"(x{med['on']['p99'] / med['off']['p99']:.2f}); p50 on {med['on']['p50']:.3f} ms, "
        f"off {med['off']['p50']:.3f} ms; shipping CPU {extra / max(extents, 1) * 1e6:.1f} "
        f"us/extent ({extents} extents)"
    )


async def main() -> None:
    """Run the rounds and print one line per compression (or the ``--guest`` figures)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--writes", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--guest", action="store_true", help="fio's latency with shipping on/off")
    ap.add_argument("--seconds", type=float, default=10.0, help="per fio run (--guest)")
    ap.add_argument(
        "--nice",
        type=int,
        default=AgentSection.model_fields["shipping_nice"].default,
        help="the shipping threads' nice steps (--guest; default: the agent's)",
    )
    args = ap.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image = Path(tmp) / "d.img"
        with image.open("wb") as fh:
            fh.truncate(args.size_gib << 30)
        export = TrackedExport(image, "d", map_path=Path(tmp) / "d.map")
        export.open()
        try:
            if args.guest:
                await guest(args, export, Path(tmp))
                return
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
    uvloop.run(main())
