"""Recovery-point data under unthrottled random writes: the journal bound on vs off.

    .venv/bin/python bench/journal_bound.py [--quick] [--size-mib 256] [--seconds 300]
                                            [--interval 1] [--bs 4k] [--hot-mib N]
                                            [--only on|off|both] [--dir DIR] [--keep]

One random 256 MiB image; a real `replikant broker run` and `replikant agent run` (policy
interval ``--interval``); after the initial sync, fio writes ``--bs`` random blocks to the
agent's NBD export as fast as it can (nbd engine, iodepth 4, fresh buffers) for ``--seconds``,
twice: with ``[retention] journal_bound = "100%"`` (the default) and with the bound off (a bound
of 100,000 %, never reached); ``--hot-mib N`` confines the writes to the first N MiB (a guest
that rewrites the same data, where merging pays). Every second the bench adds up the replica's
``points/`` folder.

Reported per phase: recovery-point bytes ÷ disk bytes (peak of the 1 s samples, and at the end),
replication lag (write-to-replica bound per loaded cycle, as bench/broker_lag.py defines it),
the age of the oldest point held at the end, the broker's CPU during the load (what the bound's
drops, merges and retention passes add shows as the difference), and the journal alerts the
broker raised (its log keeps warnings and errors). ``--quick``: 60 s per phase.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import (
    Agent,
    Broker,
    DiskSpec,
    MiB,
    Pki,
    check_free_space,
    fast_random_file,
    make_pki,
    proc_cpu,
    save_result,
    wait_until,
)
from broker_lag import Phase, lag_figures, pct
from nbd_fio import run_fio

BOUNDS = {"on": '"100%"', "off": '"100000%"'}


def points_bytes(points_dir: Path) -> int:
    """Bytes of every file in a replica's points folder (partial ones too)."""
    total = 0
    for entry in list(points_dir.iterdir()) if points_dir.exists() else []:
        try:
            total += entry.stat().st_size
        except FileNotFoundError:  # dropped between the listing and the stat
            continue
    return total


class Sampler(threading.Thread):
    """Samples the points folder every ``every`` seconds."""

    def __init__(self, points_dir: Path, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.points_dir, self.every = points_dir, every
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append(points_bytes(self.points_dir))


def events(log: Path, name: str) -> int:
    """How many JSON log events called ``name`` the broker logged."""
    n = 0
    for line in log.read_text().splitlines():
        try:
            n += json.loads(line).get("event") == name
        except ValueError:
            continue
    return n


def phase(
    work: Path, pki: Pki, source: Path, bound: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One run: sync, load, measure; the store is fresh for each phase."""
    side = work / f"bound-{bound}"
    side.mkdir()
    image = side / "source.img"
    shutil.copyfile(source, image)
    broker = Broker(side, pki, side / "store")
    # [retention] is the last section Broker writes: the bound joins it.
    broker.config.write_text(broker.config.read_text() + f"journal_bound = {BOUNDS[bound]}\n")
    disk = DiskSpec("journal", image)
    agent = Agent(side, pki, f"https://127.0.0.1:{broker.port}", [disk], interval=args.interval)
    points_dir = broker.store / str(disk.vm_uuid) / disk.disk_id / "points"
    sampler = Sampler(points_dir)
    try:
        broker.start()
        agent.start()
        wait_until("the initial sync", lambda: broker.synced(disk.vm_uuid, disk.disk_id), 600)
        time.sleep(2 * args.interval)
        assert broker.proc is not None
        sampler.start()
        cpu0 = proc_cpu(broker.proc.pid)
        start_ns = time.time_ns()
        options = ["--rw=randwrite", f"--bs={args.bs}", "--iodepth=4", "--refill_buffers"]
        region = args.hot_mib * MiB if args.hot_mib else args.size
        fio = run_fio(agent.nbd_uri(disk), "journal", region, args.seconds, options)
        end_ns = time.time_ns()
        cpu = proc_cpu(broker.proc.pid) - cpu0

        def last_writes_applied() -> bool:
            return any(r["cut_ns"] > end_ns for r in broker.applied_log(disk.vm_uuid, disk.disk_id))

        wait_until("the cut after the load", last_writes_applied, 300)
        final = points_bytes(points_dir)
        doc = json.loads(broker.get(f"/v1/vms/{disk.vm_uuid}/points"))
        records = broker.applied_log(disk.vm_uuid, disk.disk_id)
    finally:
        sampler.done.set()
        if sampler.is_alive():
            sampler.join()
        agent.stop()
        broker.stop()
    cycles = [(r["cut_ns"], r["applied_ns"]) for r in records if not r["full"]]
    lag = lag_figures(Phase(cycles, start_ns, end_ns, [], fio, cpu, True))["write_to_replica"]
    older = [p for p in doc["points"] if not p["latest"]]
    oldest_age = (time.time_ns() / 1e9 - older[-1]["time"]) if older else 0.0
    load_s = (end_ns - start_ns) / 1e9
    out = {
        "bound": bound,
        "disk_bytes": args.size,
        "peak_ratio": max(sampler.samples, default=0) / args.size,
        "end_ratio": final / args.size,
        "samples": len(sampler.samples),
        "lag_p50_s": pct(lag, 50),
        "lag_p99_s": pct(lag, 99),
        "lag_max_s": max(lag, default=float("nan")),
        "cycles": len(lag),
        "points_at_end": len(doc["points"]),
        "oldest_point_age_s": oldest_age,
        "broker_cpu_pct": 100 * cpu / load_s,
        "fio_iops": fio["iops"],
        "alerts": events(broker.log, "replica_alert"),
    }
    shutil.rmtree(broker.store, ignore_errors=True)  # the unbounded store can be large
    return out


def run(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # the unbounded phase's undo: fio's rate is unknown; leave room for 40 disks of it
    check_free_space(work.parent, 40 * args.size)
    try:
        source = work / "source.img"
        fast_random_file(source, args.size)
        pki = make_pki(work / "pki")
        results = []
        for bound in ("on", "off") if args.only == "both" else (args.only,):
            r = phase(work, pki, source, bound, args)
            results.append(r)
            print(
                f"bound {bound:>3}: points/disk peak {r['peak_ratio']:.2f} end "
                f"{r['end_ratio']:.2f} ({r['samples']} samples); lag p50 {r['lag_p50_s']:.2f} "
                f"p99 {r['lag_p99_s']:.2f} max {r['lag_max_s']:.2f} s over {r['cycles']} cycles; "
                f"oldest point {r['oldest_point_age_s']:.0f} s old, {r['points_at_end']} points; "
                f"broker CPU {r['broker_cpu_pct']:.0f} %; fio {r['fio_iops']:.0f} IOPS; "
                f"journal alerts {r['alerts']}",
                flush=True,
            )
        saved = save_result(
            "journal_bound",
            {"size_bytes": args.size, "seconds": args.seconds, "bs": args.bs,
             "hot_mib": args.hot_mib, "interval": args.interval, "phases": results},
        )  # fmt: skip
        print(f"results: {saved}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=300.0, help="load per phase")
    parser.add_argument("--interval", type=float, default=1.0, help="the policy's cycle")
    parser.add_argument("--bs", default="4k", help="fio block size")
    parser.add_argument("--quick", action="store_true", help="60 s per phase")
    parser.add_argument(
        "--hot-mib", type=int, default=0, help="write only the first N MiB (default: all)"
    )
    parser.add_argument("--only", choices=("on", "off", "both"), default="both")
    parser.add_argument("--dir", default="/var/tmp/replikant-bench-journal")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 60.0)
    args.size = args.size_mib * MiB
    if shutil.which("fio") is None:
        parser.error("fio is not installed (Debian: fio)")
    run(args)


if __name__ == "__main__":
    main()
