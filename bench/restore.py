"""Reading a recovery point back: our point-in-time export against qemu-nbd, same bytes, same run.

    .venv/bin/python bench/restore.py [--quick] [--size-mib 1024] [--fill 0.5] [--changed 0.1]
                                      [--seconds 10] [--rounds 3] [--dir DIR] [--keep]

What an operator pays at the recovery site: a restore copies a point out (nbdcopy), a test
failover boots a VM from one (small reads, one after another, then many at once). Ours: a real
`replikant agent run` protects a sparse disk (``--fill`` of its 1 MiB pieces random data, the
rest holes) and ships it to `replikant broker run` over mTLS; ``--changed`` of the disk is then
rewritten (fio, 64 KiB random writes), so two recovery points exist:

- ``latest``: the newest point, read from the replica alone;
- ``older``: the point before the rewrite, where every rewritten range comes from undo data.

Each point is exported read-only on the broker's NBD socket (``POST /v1/vms/{vm}/exports``).
Peer: `qemu-nbd` (writeback, aio threads) on a unix socket serving a sparse copy of the source
image taken at that point. The broker and qemu-nbd run on core 1, the clients on core 0; the
agent keeps replicating (idle) meanwhile, as it would during a test failover. Jobs, each started
with the page cache dropped for the replica, its undo data and the peer's image:

- ``restore``: ``nbdcopy URI null:`` (block status on, so holes are skipped by both), MiB/s of
  the disk's size and seconds;
- ``randread-4k-qd1``: fio 4 KiB random reads, queue depth 1 (a booting guest's dependent
  reads): IOPS, completion latency p50/p99;
- ``randread-4k-qd32``: the same at queue depth 32: IOPS, latency p50/p99.

Before the first round both exports are compared with the source's bytes at their point
(``qemu-img compare``). Then the applies around the reads: 4 KiB random writes at 20 MiB/s for
``--seconds`` through the agent before the first read and again after the last, with the
cut-to-applied time of each batch (``applied.log``): reading a point must not slow the replica's
applies afterwards (large folios, ``docs/broker.md``). No target in the issues; ratios and
absolute figures are reported. Results: ``bench/results/restore-*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    copy_file,
    make_pki,
    save_result,
    wait_until,
)
from broker_lag import pct
from nbd_fio import mark, server
from writepath import GUEST_CPU, RECOVERY_CPU

from tests.support_pagecache import drop_from_cache

POINTS = ("latest", "older")
KINDS = ("ours", "qemu-nbd")
FIO_JOBS = {
    "randread-4k-qd1": ["--rw=randread", "--bs=4k", "--iodepth=1"],
    "randread-4k-qd32": ["--rw=randread", "--bs=4k", "--iodepth=32"],
}
JOBS = ("restore", *FIO_JOBS)
LOAD = ["--rw=randwrite", "--bs=4k", "--iodepth=4", "--rate=20m"]


def sparse_image(path: Path, size: int, fill: float, seed: int = 7) -> int:
    """``fill`` of the 1 MiB pieces random bytes, the rest holes; returns the bytes written."""
    rng = random.Random(seed)
    written = 0
    with path.open("wb") as fh:
        fh.truncate(size)
        for at in range(0, size, MiB):
            if rng.random() < fill:
                n = min(MiB, size - at)
                fh.seek(at)
                fh.write(rng.randbytes(n))
                written += n
    drop_from_cache(path)
    return written


def fio_read(uri: str, job: str, size: int, seconds: float) -> dict[str, float]:
    """One fio read job on the clients' core: IOPS and completion latency."""
    cmd = [
        "taskset", "-c", GUEST_CPU, "fio", f"--name={job}", "--ioengine=nbd", f"--uri={uri}",
        f"--size={size}", f"--runtime={seconds}", "--time_based", "--output-format=json",
        "--readonly", *FIO_JOBS[job],
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    pcts = doc.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": float(doc["iops"]),
        "mib_s": float(doc["bw"]) / 1024,
        "clat_p50_ms": float(pcts.get("50.000000", 0)) / 1e6,
        "clat_p99_ms": float(pcts.get("99.000000", 0)) / 1e6,
    }


def restore(uri: str, size: int) -> dict[str, float]:
    """``nbdcopy URI null:`` on the clients' core: seconds and MiB/s of the disk's size."""
    start = time.perf_counter()
    subprocess.run(["taskset", "-c", GUEST_CPU, "nbdcopy", uri, "null:"], check=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mib_s": size / MiB / seconds}


class Site:
    """The agent and broker with two recovery points, and the source's bytes at each."""

    def __init__(self, work: Path, size: int) -> None:
        self.work, self.size = work, size
        self.image = work / "source.img"
        pki = make_pki(work / "pki")
        self.broker = Broker(work, pki, work / "store", cpus=RECOVERY_CPU)
        self.disk = DiskSpec("bench", self.image)
        self.agent = Agent(
            work, pki, f"https://127.0.0.1:{self.broker.port}", [self.disk], cpus=GUEST_CPU
        )
        self.copies = {p: work / f"{p}.img" for p in POINTS}  # the peer's images
        self.ids: dict[str, str] = {}

    @property
    def uri(self) -> str:
        """The agent's export (the guest's disk)."""
        return self.agent.nbd_uri(self.disk)

    def current(self) -> int:
        """One marker write; returns once a cut after it is applied (a recovery point)."""
        marked = mark([self.uri])
        wait_until(
            "the replica to catch up",
            lambda: self.broker.current_after(self.disk.vm_uuid, self.disk.disk_id, marked),
            300,
            every=0.05,
        )
        return marked

    def start(self, changed: float) -> None:
        """Replicate, make the older point, rewrite ``changed`` of the disk, make the latest."""
        self.broker.start()
        self.agent.start()
        wait_until("the initial sync", lambda: self.broker.synced(self.disk.vm_uuid, "disk0"), 900)
        self.current()
        copy_file(self.image, self.copies["older"])
        before = time.time()
        subprocess.run(
            [
                "taskset",
                "-c",
                GUEST_CPU,
                "fio",
                "--name=rewrite",
                "--ioengine=nbd",
                f"--uri={self.uri}",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
                f"--size={self.size}",
                f"--io_size={int(self.size * changed) // 65536 * 65536}",
                "--refill_buffers",
                "--output-format=json",
            ],
            check=True,
            capture_output=True,
        )
        self.current()
        copy_file(self.image, self.copies["latest"])
        points = json.loads(self.broker.get(f"/v1/vms/{self.disk.vm}/points"))["points"]
        self.ids["latest"] = points[0]["id"]
        self.ids["older"] = next(p["id"] for p in points if p["time"] < before)

    @contextmanager
    def export(self, point: str) -> Iterator[str]:
        """A read-only export of ``point``; yields its NBD URI, removes it after."""
        made = json.loads(
            self.broker.call(
                "POST",
                f"/v1/vms/{self.disk.vm}/exports",
                {"point": self.ids[point], "read_only": True},
            )
        )
        (exp,) = made["exports"]
        try:
            yield str(exp["nbd_uri"])
        finally:
            self.broker.call("DELETE", f"/v1/exports/{exp['name']}")

    def drop_caches(self) -> None:
        """Everything either server reads, out of the page cache."""
        os.sync()
        for path in [
            *self.copies.values(),
            *(self.broker.store / str(self.disk.vm_uuid)).rglob("*"),
        ]:
            if path.is_file() and not path.is_symlink():
                drop_from_cache(path)

    def applies(self, seconds: float) -> dict[str, float]:
        """4 KiB random writes at 20 MiB/s through the agent; cut-to-applied of their batches."""
        start = time.time_ns()
        subprocess.run(
            [
                "taskset",
                "-c",
                GUEST_CPU,
                "fio",
                "--name=load",
                "--ioengine=nbd",
                f"--uri={self.uri}",
                f"--size={self.size}",
                f"--runtime={seconds}",
                "--time_based",
                "--refill_buffers",
                "--output-format=json",
                *LOAD,
            ],
            check=True,
            capture_output=True,
        )
        end = self.current()
        delays = [
            (r["applied_ns"] - r["cut_ns"]) / 1e9
            for r in self.broker.applied_log(self.disk.vm_uuid, "disk0")
            if start <= r["cut_ns"] <= end and not r["full"]
        ]
        return {"batches": len(delays), "p50_s": pct(delays, 50), "p99_s": pct(delays, 99)}

    def stop(self) -> None:
        """Stop both daemons."""
        self.agent.stop()
        self.broker.stop()


def verify(site: Site) -> None:
    """Each export equals the source's bytes at its point (qemu-img reads both)."""
    for point in POINTS:
        with site.export(point) as uri:
            got = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(site.copies[point]), uri],
                capture_output=True,
                text=True,
                check=False,
            )
            if got.returncode != 0:
                raise SystemExit(f"point {point} differs from the source: {got.stdout}{got.stderr}")


def sample(site: Site, kind: str, point: str, job: str, seconds: float) -> dict[str, float]:
    """One job against one server, from a cold page cache."""
    site.drop_caches()
    if kind == "ours":
        with site.export(point) as uri:
            return (
                restore(uri, site.size)
                if job == "restore"
                else fio_read(uri, job, site.size, seconds)
            )
    sock = site.work / "peer.sock"
    with server("qemu-nbd", site.copies[point], sock, cpus=RECOVERY_CPU) as uri:
        return (
            restore(uri, site.size) if job == "restore" else fio_read(uri, job, site.size, seconds)
        )


def report(med: dict[str, Any], applies: dict[str, dict[str, float]]) -> None:
    """Absolute figures and ratios."""
    print(f"\n{'point':<8}{'job':<18}{'figure':<13}{'ours':>10}{'qemu-nbd':>10}{'÷qemu':>8}")
    for point, jobs in med.items():
        for job, kinds in jobs.items():
            for fig in kinds["ours"]:
                o, q = kinds["ours"][fig], kinds["qemu-nbd"][fig]
                ratio = o / q if q else float("nan")
                print(f"{point:<8}{job:<18}{fig:<13}{o:>10.2f}{q:>10.2f}{ratio:>8.2f}")
    print("\napplies (4 KiB random writes at 20 MiB/s): cut-to-applied")
    for when, a in applies.items():
        print(
            f"  {when:<14}{a['batches']:>4} batches  p50 {a['p50_s']:.3f} s  p99 {a['p99_s']:.3f} s"
        )


def run(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    size = args.size_mib * MiB
    check_free_space(work.parent, 4 * size + 512 * MiB)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        p: {j: {k: [] for k in KINDS} for j in JOBS} for p in POINTS
    }
    applies: dict[str, dict[str, float]] = {}
    site = Site(work, size)
    try:
        data = sparse_image(site.image, size, args.fill)
        print(f"source: {size // MiB} MiB, {data // MiB} MiB of it data", flush=True)
        site.start(args.changed)
        verify(site)
        applies["before reads"] = site.applies(args.seconds)
        for rnd in range(args.rounds):
            order = KINDS if rnd % 2 == 0 else KINDS[::-1]
            for point in POINTS:
                for job in JOBS:
                    for kind in order:
                        s = sample(site, kind, point, job, args.seconds)
                        samples[point][job][kind].append(s)
                        figures = " ".join(f"{k} {v:.2f}" for k, v in s.items())
                        print(
                            f"  round {rnd + 1} {point:<7}{job:<18}{kind:<9}{figures}", flush=True
                        )
        applies["after reads"] = site.applies(args.seconds)
    finally:
        site.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    med = {
        p: {
            j: {
                k: {f: statistics.median(r[f] for r in runs) for f in runs[0]}
                for k, runs in kinds.items()
            }
            for j, kinds in jobs.items()
        }
        for p, jobs in samples.items()
    }
    report(med, applies)
    saved = save_result(
        "restore",
        {
            "size_bytes": size,
            "data_bytes": data,
            "changed": args.changed,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "load_average": os.getloadavg(),
            "median": med,
            "samples": samples,
            "applies": applies,
        },
    )
    print(f"results: {saved}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--fill", type=float, default=0.5, help="share of 1 MiB pieces with data")
    parser.add_argument("--changed", type=float, default=0.1, help="share rewritten after 'older'")
    parser.add_argument("--seconds", type=float, default=10.0, help="per fio job")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median)")
    parser.add_argument("--quick", action="store_true", help="256 MiB, 5 s jobs, one round")
    add_workdir_arguments(parser, "restore")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.seconds, args.rounds = min(args.size_mib, 256), 5.0, 1
    for tool in ("fio", "qemu-nbd", "qemu-img", "nbdcopy", "taskset"):
        if shutil.which(tool) is None:
            parser.error(
                f"{tool} is not installed (Debian: fio, qemu-utils, libnbd-bin, util-linux)"
            )
    if (os.cpu_count() or 1) < 2:
        parser.error("needs two cores: the servers on core 1, the clients on core 0")
    run(args)


if __name__ == "__main__":
    main()
