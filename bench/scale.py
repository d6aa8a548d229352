"""One agent protecting 100 small sparse disks at 1 s cycles: idle cost, then lag under load.

    .venv/bin/python bench/scale.py [--quick] [--idle-only] [--disks 100] [--disk-mib 64]
                                     [--idle 60] [--seconds 60] [--rate 1m] [--dir DIR] [--keep]

A real `replikant broker run` and `replikant agent run` (mTLS, policy interval 1 s) protect
``--disks`` sparse images, each in a VM of its own. Once every disk has finished its initial
sync (and a few cycles passed), the bench measures:

- idle: CPU seconds of the agent and the broker together per second over ``--idle`` seconds,
  as a percentage of one core (target < 5 %), and each process's share; ``--idle-only`` stops
  here (the idle figure alone, for before/after comparisons of the idle cost);
- load: one fio process, one job per disk, 4 KiB random writes at ``--rate`` per second each
  (queue depth 1, random buffers), for ``--seconds``; then per disk the write-to-replica bound
  ``applied[k] - cut[k-1]`` over the cycles that carried load (as ``broker_lag.py`` defines it),
  its p99 per disk (target ≤ 1.5 s for every disk), fio's achieved rate and the CPU of both;
  and what the bound is made of: the median time from one cut to the next (the interval, or
  longer while a cycle's uploads outlast it) and from a cut to its batch applied.

At the end every replica's block hashes must equal its source's. Nothing else protects 100
disks on one host in a way this machine can run, so the lag has no peer. What the CPU per write
does have: before our load (``--no-floor`` skips it), the same fio job runs against one
``qemu-nbd`` per disk with no replication at all, and the bench reports the CPU per 4 KiB write
of fio, of qemu-nbd and of our agent + broker, and how many cores the asked rate needs with
each: the floor under what any replicating product could spend on this host.
Results: ``bench/results/scale-*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
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
    add_workdir_arguments,
    check_free_space,
    children_cpu,
    holds_writes_before,
    make_pki,
    proc_cpu,
    save_result,
    wait_until,
)
from broker_lag import Phase, lag_figures, pct, same_contents
from nbd_fio import mark, server
from writepath import parse_fio_jobs

TARGET_IDLE_PERCENT = 5.0
TARGET_P99 = 1.5


def fio_argv(uris: list[str], size: int, rate: str, seconds: float) -> list[str]:
    """One fio process, one job per disk (threads, so 100 jobs stay cheap to start)."""
    argv = [
        "fio", "--ioengine=nbd", "--thread", "--rw=randwrite", "--bs=4k", "--iodepth=1",
        f"--rate={rate}", f"--size={size}", f"--runtime={seconds}", "--time_based",
        "--refill_buffers", "--output-format=json",
    ]  # fmt: skip
    for i, uri in enumerate(uris):
        argv += [f"--name=d{i}", f"--uri={uri}"]
    return argv


def load(uris: list[str], size: int, args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    """Run the fio load on ``uris``; returns the wall time, the writes and MiB/s fio made, fio's
    CPU and the CPU of the processes ``pids`` (with their descendants) over it."""
    fio0, busy0 = children_cpu(), [proc_cpu(p) for p in pids]
    start_ns = time.time_ns()
    out = subprocess.run(
        fio_argv(uris, size, args.rate, args.seconds), check=False, capture_output=True, text=True
    )
    end_ns = time.time_ns()
    if out.returncode:
        raise RuntimeError(f"fio failed: {out.stderr[-500:]}")
    jobs = parse_fio_jobs(out.stdout)
    return {
        "start_ns": start_ns,
        "end_ns": end_ns,
        "fio_cpu_s": children_cpu() - fio0,
        "cpu_s_per_pid": [proc_cpu(p) - c for p, c in zip(pids, busy0, strict=True)],
        "writes": sum(j["bytes"] for j in jobs) / 4096,
        "mib_s": sum(j["mib_s"] for j in jobs),
    }


def floor(work: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same load through one qemu-nbd per disk (writeback, no replication): what the guests'
    side alone costs on this host."""
    images = work / "floor"
    images.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        uris = []
        for i in range(args.disks):
            image = images / f"vm{i:03d}.img"
            with image.open("wb") as fh:
                fh.truncate(size)
            uris.append(stack.enter_context(server("qemu-nbd", image, images / f"{i}.sock", procs)))
        result = load(uris, size, args, [p.pid for p in procs])
    shutil.rmtree(images, ignore_errors=True)
    subprocess.run(["sync"], check=True)  # its writeback is not our run's to pay
    return result


def per_write(run: dict[str, Any]) -> dict[str, Any]:
    """CPU microseconds per 4 KiB write of fio, of the servers (with replication, if any) and
    of each server process (ours: the agent with its shipping process, then the broker)."""
    n = max(run["writes"], 1.0)
    each = [c / n * 1e6 for c in run["cpu_s_per_pid"]]
    return {"fio_us": run["fio_cpu_s"] / n * 1e6, "servers_us": sum(each), "each_us": each}


def per_disk_lag(
    cycles: dict[str, list[tuple[int, int]]], start_ns: int, end_ns: int
) -> dict[str, float]:
    """Each disk's p99 of the write-to-replica bound over its loaded cycles."""
    out = {}
    for name, cyc in cycles.items():
        bound = lag_figures(Phase(cyc, start_ns, end_ns, [], {}, 0.0, True))["write_to_replica"]
        out[name] = pct(bound, 99)
    return out


def per_disk_parts(
    cycles: dict[str, list[tuple[int, int]]], start_ns: int, end_ns: int
) -> dict[str, dict[str, float]]:
    """What each disk's bound ``applied[k] - cut[k-1]`` is made of, medians over its loaded
    cycles: the time from one cut to the next (the policy's interval, or longer when a cycle's
    upload outlasts it) and from a cut to its batch applied (read, ship, journal, apply)."""
    out = {}
    for name, cyc in cycles.items():
        gaps, pipeline = [], []
        for (prev_cut, _), (cut, applied) in itertools.pairwise(cyc):
            if cut > start_ns and prev_cut < end_ns:
                gaps.append((cut - max(prev_cut, start_ns)) / 1e9)
                pipeline.append((applied - cut) / 1e9)
        out[name] = {"cut_gap": pct(gaps, 50), "cut_to_applied": pct(pipeline, 50)}
    return out


def summary(p99s: dict[str, float]) -> dict[str, Any]:
    """Worst, median and count of disks within the target."""
    values = sorted(p99s.values())
    return {
        "worst_p99": values[-1],
        "median_p99": pct(values, 50),
        "disks_within_target": sum(v <= TARGET_P99 for v in values),
        "disks": len(values),
    }


def run(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    size = args.disk_mib * MiB
    # written data lands twice (source and replica); the images are sparse
    check_free_space(work.parent, 2 * args.disks * size + 1024 * MiB)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    disks = []
    for i in range(args.disks):
        image = work / "images" / f"vm{i:03d}.img"
        image.parent.mkdir(exist_ok=True)
        with image.open("wb") as fh:
            fh.truncate(size)
        disks.append(DiskSpec(f"vm{i:03d}", image))
    peer = None if args.no_floor or args.idle_only else floor(work, size, args)
    pki = make_pki(work / "pki")
    broker = Broker(work, pki, work / "store")
    url = f"https://127.0.0.1:{broker.port}"
    agent = Agent(work, pki, url, disks, interval=1.0, rpo=TARGET_P99)

    def cycles() -> dict[str, list[tuple[int, int]]]:
        return {
            d.vm: [
                (r["cut_ns"], r["applied_ns"])
                for r in broker.applied_log(d.vm_uuid, d.disk_id)
                if not r["full"]
            ]
            for d in disks
        }

    try:
        broker.start()
        agent.start()
        t0 = time.monotonic()
        wait_until(
            f"the initial sync of {args.disks} disks",
            lambda: sum(d["initial_sync"] == "complete" for d in all_disks(broker)) == len(disks),
            900,
            every=1.0,
        )
        print(f"  {args.disks} disks synced in {time.monotonic() - t0:.1f} s", flush=True)
        time.sleep(5)  # past the syncs' last batches
        assert broker.proc is not None
        pids = (agent.pid, broker.proc.pid)
        print(f"  idle phase: agent pid {pids[0]}, broker pid {pids[1]}", flush=True)
        cpu0, t0 = [proc_cpu(p) for p in pids], time.monotonic()
        time.sleep(args.idle)
        shares = [
            (proc_cpu(p) - c) / (time.monotonic() - t0) * 100
            for p, c in zip(pids, cpu0, strict=True)
        ]
        idle = sum(shares)
        print(
            f"  idle: agent + broker {idle:.2f} % of one core "
            f"(agent {shares[0]:.2f} %, broker {shares[1]:.2f} %)",
            flush=True,
        )
        if args.idle_only:
            return
        uris = [agent.nbd_uri(d) for d in disks]
        ours = load(uris, size, args, list(pids))
        start_ns, end_ns = ours["start_ns"], ours["end_ns"]
        load_cpu = sum(ours["cpu_s_per_pid"]) / ((end_ns - start_ns) / 1e9) * 100
        marked = mark(uris)
        wait_until(
            "every replica to catch up",
            lambda: all(holds_writes_before(d, marked) for d in all_disks(broker)),
            600,
            every=0.5,
        )
        caught_up_s = (time.time_ns() - end_ns) / 1e9  # the marker write included
        loaded = cycles()
        p99s = per_disk_lag(loaded, start_ns, end_ns)
        parts = per_disk_parts(loaded, start_ns, end_ns)
        same = all(
            same_contents(d.image, broker.store / str(d.vm_uuid) / d.disk_id / "replica.img")
            for d in disks
        )
    finally:
        agent.stop()
        broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    s = summary(p99s)
    mib_s = ours["mib_s"]
    print(
        f"\n{args.disks} disks of {args.disk_mib} MiB, 1 s cycles\n"
        f"idle: agent + broker {idle:.2f} % of one core (target < {TARGET_IDLE_PERCENT:g} %): "
        f"{'ok' if idle < TARGET_IDLE_PERCENT else 'MISS'}\n"
        f"load: fio {mib_s:.1f} MiB/s in total ({args.rate}/s asked per disk), agent + broker "
        f"{load_cpu:.0f} % of one core; all replicas caught up {caught_up_s:.1f} s after\n"
        f"lag p99 per disk: worst {s['worst_p99']:.2f} s, median {s['median_p99']:.2f} s; "
        f"{s['disks_within_target']}/{s['disks']} disks ≤ {TARGET_P99} s: "
        f"{'ok' if s['disks_within_target'] == s['disks'] else 'MISS'}\n"
        f"  made of (medians over disks of each disk's median): cut to next cut "
        f"{pct([p['cut_gap'] for p in parts.values()], 50):.2f} s, cut to applied "
        f"{pct([p['cut_to_applied'] for p in parts.values()], 50):.2f} s\n"
        f"every replica == its source: {same}\n" + cpu_report(ours, peer, args.rate, args.disks)
    )
    saved = save_result(
        "scale",
        {
            "disks": args.disks,
            "disk_bytes": size,
            "idle_seconds": args.idle,
            "load_seconds": args.seconds,
            "rate_per_disk": args.rate,
            "load_average": os.getloadavg(),
            "idle_percent_of_core": idle,
            "load_percent_of_core": load_cpu,
            "fio_mib_s_total": mib_s,
            "caught_up_s": caught_up_s,
            "lag_p99_per_disk": p99s,
            "lag_parts_per_disk": parts,
            "summary": s,
            "replicas_match": same,
            "cpu_per_write_us": per_write(ours),
            "floor": None
            if peer is None
            else {
                "fio_mib_s_total": peer["mib_s"],
                "cpu_per_write_us": per_write(peer),
            },
        },
    )
    print(f"results: {saved}")


def cpu_report(ours: dict[str, Any], peer: dict[str, Any] | None, rate: str, disks: int) -> str:
    """CPU per 4 KiB write, ours against the floor, and the cores the asked rate needs."""
    if peer is None:
        return ""
    asked = disks * parse_size(rate) / 4096  # writes per second asked of the whole host
    o, f = per_write(ours), per_write(peer)
    cores = [asked * (w["fio_us"] + w["servers_us"]) / 1e6 for w in (o, f)]
    return (
        f"CPU per 4 KiB write: fio {o['fio_us']:.0f} us, agent {o['each_us'][0]:.0f} us (with "
        f"its shipping process), broker {o['each_us'][1]:.0f} us;"
        f" floor (qemu-nbd per disk, no replication, {peer['mib_s']:.1f} MiB/s): fio "
        f"{f['fio_us']:.0f} us, qemu-nbd {f['servers_us']:.0f} us\n"
        f"  the {asked:,.0f} writes/s asked need {cores[0]:.2f} cores with us, {cores[1]:.2f} "
        f"at the floor, on a host of {os.cpu_count()}\n"
    )


def parse_size(text: str) -> int:
    """fio's rate syntax as this bench uses it: a number with an optional k/m/g suffix."""
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB}
    suffix = text[-1].lower()
    return int(float(text[:-1]) * units[suffix]) if suffix in units else int(text)


def all_disks(broker: Broker) -> list[dict[str, Any]]:
    """Every disk record of the broker's status (only those the agent announced so far)."""
    return [disk for vm in broker.status()["vms"] for disk in vm["disks"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disks", type=int, default=100)
    parser.add_argument("--disk-mib", type=int, default=64, help="size of each sparse disk")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rate", default="1m", help="fio --rate per disk")
    parser.add_argument("--quick", action="store_true", help="20 s idle, 20 s load")
    parser.add_argument(
        "--idle-only", action="store_true", help="measure the idle phase only, then stop"
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the load through qemu-nbd, no replication"
    )
    add_workdir_arguments(parser, "scale")
    args = parser.parse_args()
    if args.quick:
        args.idle, args.seconds = min(args.idle, 20.0), min(args.seconds, 20.0)
    if shutil.which("fio") is None:
        parser.error("fio is not installed (Debian: fio)")
    run(args)


if __name__ == "__main__":
    main()
