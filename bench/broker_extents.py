"""The broker's CPU per extent and per batch, and how many batches a second it turns over.

    .venv/bin/python bench/broker_extents.py [--quick] [--disks 100] [--batches 20]
                                              [--extents 1000] [--cpus 1] [--dir DIR] [--keep]

A real `replikant broker run` (mTLS, our certificates, retention on so every batch captures
undo for recovery points) receives batches that were encoded before the clock starts
(``common.hrl.BatchEncoder``, zstd level 1, 4 KiB blocks of half random, half zero bytes, so
they compress about 2:1 like a database page), uploaded over one aiohttp session per phase,
one upload at a time per disk and all disks at once. A phase ends when every disk's batches are
applied. Phases:

- ``small``: ``--disks`` disks x ``--batches`` batches of one 4 KiB extent: the cost of a batch
  (HTTP, journal, fsyncs, apply, undo, audit line, meta), and batches per second turned over
  with many disks (what ``bench/scale.py`` needs: 100 batches/s);
- ``4k``: a few disks x batches of ``--extents`` 4 KiB extents at random offsets: the cost of
  an extent;
- ``64k``: the same with 64 KiB extents;
- ``scale``: ``--disks`` disks x batches of 256 4 KiB extents, all at once: what
  ``bench/scale.py``'s load (100 disks at 1 MiB/s of 4 KiB writes, 1 s cycles) asks of the
  broker; its batches/s must stay above 100 (one batch per disk per second) for lag to hold.

Reported per phase: broker CPU seconds (``/proc/PID/stat`` user + system, the whole phase
including apply), CPU per batch (ms) and per extent (us), wall seconds and batches/s. The
per-extent figure of ``4k`` and ``64k`` subtracts the per-batch cost measured by ``small``.
Before-vs-now: run the same command on main and on a branch, alternately, on a quiet machine;
CPU figures are what to compare on a shared one. Results: ``bench/results/broker-extents-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import (
    Broker,
    MiB,
    Pki,
    add_workdir_arguments,
    cleanup,
    make_pki,
    proc_cpu,
    save_result,
)

from common.hrl import (
    BATCH_CONTENT_TYPE,
    BatchHeader,
    Compression,
    Consistency,
    encode_batch,
)
from common.tls import client_context

DISK_SIZE = 256 * MiB
BLOCK = 64 * 1024


def proc_sys(pid: int) -> float:
    """System (kernel) CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def page(rng: random.Random, size: int) -> bytes:
    """``size`` bytes, the first half random: compresses about 2:1."""
    return rng.randbytes(size // 2) + bytes(size - size // 2)


def encode(
    vm: uuid.UUID, disk: str, seq: int, extents: int, ext_size: int, rng: random.Random
) -> bytes:
    """One batch of ``extents`` DATA extents of ``ext_size`` bytes at random aligned offsets."""
    slots = rng.sample(range(DISK_SIZE // ext_size), extents)
    items = [(s * ext_size, ext_size, 0, page(rng, ext_size)) for s in sorted(slots)]
    header = BatchHeader(
        vm_uuid=vm,
        disk_id=disk,
        generation=1,
        seq=seq,
        base_seq=seq - 1,
        cut_time_ns=time.time_ns(),
        disk_size=DISK_SIZE,
        block_size=BLOCK,
        consistency=Consistency.CRASH,
        compression=Compression.ZSTD,
        full=False,
        extent_count=extents,
        data_bytes=extents * ext_size,
        cut_id=seq,
    )
    return b"".join(encode_batch(header, items, level=1))


class Phase:
    """One phase: its disks (each a VM of its own) and their pre-encoded batches."""

    def __init__(self, name: str, disks: int, batches: int, extents: int, ext_size: int) -> None:
        self.name = name
        self.extents = extents
        self.ext_size = ext_size
        rng = random.Random(name)
        self.vms = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(disks)]
        self.bodies = {
            vm: [encode(vm, "d0", s, extents, ext_size, rng) for s in range(1, batches + 1)]
            for vm in self.vms
        }

    @property
    def batches(self) -> int:
        """Batches in the phase, all disks."""
        return sum(len(b) for b in self.bodies.values())


async def run_phase(broker: Broker, phase: Phase, session: aiohttp.ClientSession) -> dict[str, Any]:
    """Announce the disks, upload every batch, wait until all are applied; the figures."""
    base = broker.url + "/v1/replicas"
    for i, vm in enumerate(phase.vms):
        body = {"vm_name": f"{phase.name}{i}", "disk_size": DISK_SIZE, "block_size": BLOCK}
        async with session.put(f"{base}/{vm}/d0", json=body) as resp:
            assert resp.status == 200, await resp.text()
    assert broker.proc is not None
    print(f"phase {phase.name} starts", flush=True)
    sys0, cpu0, t0 = proc_sys(broker.proc.pid), proc_cpu(broker.proc.pid), time.monotonic()

    async def one_disk(vm: uuid.UUID) -> None:
        for body in phase.bodies[vm]:
            async with session.post(
                f"{base}/{vm}/d0/batches",
                data=body,
                headers={"Content-Type": BATCH_CONTENT_TYPE},
            ) as resp:
                assert resp.status == 200, await resp.text()
        want = len(phase.bodies[vm])
        while True:
            async with session.get(f"{base}/{vm}/d0") as resp:
                if (await resp.json())["applied_seq"] >= want:
                    return
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one_disk(vm) for vm in phase.vms))
    cpu, wall = proc_cpu(broker.proc.pid) - cpu0, time.monotonic() - t0
    kernel = proc_sys(broker.proc.pid) - sys0
    n = phase.batches
    return {
        "disks": len(phase.vms),
        "batches": n,
        "extents_per_batch": phase.extents,
        "extent_bytes": phase.ext_size,
        "cpu_s": round(cpu, 3),
        "system_cpu_s": round(kernel, 3),
        "wall_s": round(wall, 3),
        "cpu_ms_per_batch": round(cpu / n * 1e3, 3),
        "cpu_us_per_extent_gross": round(cpu / (n * phase.extents) * 1e6, 2),
        "batches_per_s": round(n / wall, 1),
    }


async def run(args: argparse.Namespace, broker: Broker, pki: Pki) -> dict[str, Any]:
    """Encode every phase first, then run them one after the other."""
    phases = [
        Phase("small", args.disks, args.batches, 1, 4096),
        Phase("4k", 4, args.batches, args.extents, 4096),
        Phase("64k", 4, args.batches, max(1, args.extents // 8), 65536),
        Phase("scale", args.disks, max(1, args.batches // 2), 256, 4096),
    ]
    phases = [p for p in phases if p.name in args.phases.split(",")]
    ctx = client_context(pki.agent)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=0),
        timeout=aiohttp.ClientTimeout(total=600),
    ) as session:
        for phase in phases:
            out[phase.name] = await run_phase(broker, phase, session)
            print(phase.name, out[phase.name], flush=True)
    if "small" not in out:
        return out
    per_batch = out["small"]["cpu_ms_per_batch"] / 1e3
    for name in ("4k", "64k", "scale") & out.keys():
        f = out[name]
        f["cpu_us_per_extent"] = round(
            (f["cpu_s"] / f["batches"] - per_batch) / f["extents_per_batch"] * 1e6, 2
        )
    return out


def main() -> None:
    """Parse arguments, start the broker, run the phases, print and save the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer batches (a short run)")
    p.add_argument("--disks", type=int, default=100)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--extents", type=int, default=1000)
    p.add_argument(
        "--phases", default="small,4k,64k,scale", help="which phases to run (comma list)"
    )
    p.add_argument("--cpus", default=None, help="pin the broker with taskset -c CPUS")
    add_workdir_arguments(p, "extents")
    args = p.parse_args()
    if args.quick:
        args.batches = min(args.batches, 10)
    work = Path(args.dir)
    cleanup(work)
    work.mkdir(parents=True)
    os.environ.setdefault("BENCH_LOG", "warning")
    pki = make_pki(work / "pki")
    broker = Broker(work, pki, work / "store", cpus=args.cpus)
    try:
        broker.start()
        figures = asyncio.run(run(args, broker, pki))
    finally:
        broker.stop()
        if not args.keep:
            cleanup(work)
    doc = {"bench": "broker_extents", "args": vars(args), "figures": figures}
    print(f"saved {save_result('broker-extents', doc)}")
    for name, f in figures.items():
        print(
            f"{name:6} {f['batches']:5} batches x {f['extents_per_batch']:5} x "
            f"{f['extent_bytes'] // 1024:3} KiB: {f['cpu_ms_per_batch']:8.3f} ms CPU/batch  "
            f"{f.get('cpu_us_per_extent', f['cpu_us_per_extent_gross']):8.2f} us CPU/extent  "
            f"{f['batches_per_s']:7.1f} batches/s  wall {f['wall_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
