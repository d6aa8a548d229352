"""Our NBD server against qemu-nbd, same file, same fio jobs: ``python bench/nbd_fio.py``.

Both servers export one fully written raw image over a unix socket (on /dev/shm by default, so the
numbers are the servers' and not the disk's); fio's nbd engine (libnbd) runs
4 KiB random writes at queue depth 32 and 1 MiB sequential writes at queue depth 8 against each,
alternating servers so neither always runs on a cooler page cache. Prints IOPS and MiB/s of both
and our/qemu-nbd ratios, and saves the numbers as JSON under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import check_free_space

from tests.support_pagecache import drop_from_cache

REPO = Path(__file__).resolve().parent.parent
NBD_IHAVEOPT = 0x49484156454F5054
NBD_OPT_ABORT = 2

JOBS = {
    "randwrite-4k-qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "write-1m-qd8": ["--rw=write", "--bs=1M", "--iodepth=8"],
}


def make_image(path: Path, size: int) -> None:
    """Write the whole image once, so neither server pays for first-touch block allocation,
    then drop it from the page cache, as ``broker_common.make_mixed_image`` does its image."""
    chunk = bytes(8 * 1024 * 1024)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    drop_from_cache(path)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until something accepts connections on ``path`` (the server is listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(os.fspath(path))
                # A polite probe: read the greeting, then end negotiation with NBD_OPT_ABORT, so
                # neither server logs a failed negotiation.
                s.recv(18, socket.MSG_WAITALL)
                s.sendall(struct.pack(">IQII", 3, NBD_IHAVEOPT, NBD_OPT_ABORT, 0))
                s.recv(20, socket.MSG_WAITALL)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {path} after {timeout}s")


@contextmanager
def server(
    kind: str,
    image: Path,
    sock: Path,
    procs: list[subprocess.Popen[bytes]] | None = None,
    cpus: str | None = None,
) -> Iterator[str]:
    """Run one server (``ours``, ``qemu-nbd`` or ``nbdkit``'s file plugin) on ``image``, pinned
    with ``taskset -c CPUS`` when given; yields the NBD URI of its export (and appends the
    server's process to ``procs`` when given)."""
    if sock.exists():
        sock.unlink()
    if kind == "ours":
        cmd = [
            sys.executable, "-m", "common.nbd.serve", os.fspath(image),
            "--socket", os.fspath(sock), "--name", "disk", "--log-level", "warning",
        ]  # fmt: skip
    elif kind == "nbdkit":
        cmd = ["nbdkit", "--foreground", "--unix", os.fspath(sock), "--exportname", "disk",
               "file", os.fspath(image)]  # fmt: skip
    else:
        cmd = [
            "qemu-nbd", "-f", "raw", "-t", "-x", "disk", "-k", os.fspath(sock),
            "--cache=writeback", "--aio=threads", os.fspath(image),
        ]  # fmt: skip
    proc = subprocess.Popen(["taskset", "-c", cpus, *cmd] if cpus else cmd, cwd=REPO)
    if procs is not None:
        procs.append(proc)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def add_fio_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every fio-vs-qemu-nbd bench takes (``--dir`` is each bench's own)."""
    parser.add_argument("--size", type=int, default=1024, help="image size in MiB")
    parser.add_argument("--runtime", type=float, default=10, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per server and job (median)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="256 MiB image, 5 s per fio run")


def parse_fio_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, apply ``--quick`` and check that fio and qemu-nbd are installed."""
    args = parser.parse_args()
    if args.quick:
        args.size, args.runtime = min(args.size, 256), min(args.runtime, 5)
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: fio, qemu-utils)")
    return args


def print_ratio_table(
    samples: dict[str, dict[str, list[dict[str, float]]]],
) -> dict[str, dict[str, Any]]:
    """Print medians of ours vs qemu-nbd per job with the ratio; return them for the report."""
    jobs: dict[str, dict[str, Any]] = {}
    print(f"{'job':<20} {'ours IOPS':>10} {'qemu IOPS':>10} {'ours MiB/s':>11} "
          f"{'qemu MiB/s':>11} {'ratio':>6}")  # fmt: skip
    for job, by_kind in samples.items():
        ours = {k: statistics.median(s[k] for s in by_kind["ours"]) for k in ("iops", "mib_s")}
        peer = {k: statistics.median(s[k] for s in by_kind["qemu-nbd"]) for k in ("iops", "mib_s")}
        ratio = ours["iops"] / peer["iops"] if peer["iops"] else float("inf")
        jobs[job] = {"ours": ours, "qemu-nbd": peer, "ratio": ratio}
        print(
            f"{job:<20} {ours['iops']:>10.0f} {peer['iops']:>10.0f} {ours['mib_s']:>11.1f} "
            f"{peer['mib_s']:>11.1f} {ratio:>6.2f}"
        )
    return jobs


def run_fio(
    uri: str, job: str, size: int, runtime: float, options: list[str] | None = None
) -> dict[str, float]:
    """Run one fio job (``JOBS[job]``, or ``options``); returns write IOPS, MiB/s and the
    99th percentile of write completion latency in ms."""
    cmd = [
        "fio", f"--name={job}", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
        f"--runtime={runtime}", "--time_based", "--output-format=json",
        *(JOBS[job] if options is None else options),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    # The nbd engine prints "fio: connected to NBD server" before the JSON document.
    doc = json.loads(result.stdout[result.stdout.index("{") :])
    write = doc["jobs"][0]["write"]
    p99 = write.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0)
    return {
        "iops": float(write["iops"]),
        "mib_s": float(write["bw"]) / 1024,
        "clat_p99_ms": float(p99) / 1e6,
    }


def mark(uris: list[str]) -> int:
    """One 4 KiB write to each export; returns the time once all are acknowledged. A disk with
    no change ships nothing, so after a load there may be no later cut to wait for: with this
    write there is, and a cut taken after the returned time carries every write before it, the
    marker included (so the replica then equals the source)."""
    argv = ["fio", "--ioengine=nbd", "--rw=write", "--bs=4k", "--size=4k", "--output-format=json"]
    for i, uri in enumerate(uris):
        argv += [f"--name=mark{i}", f"--uri={uri}"]
    subprocess.run(argv, check=True, capture_output=True)
    return time.time_ns()


def main() -> int:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_fio_arguments(parser)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where to put the image (default /dev/shm, which measures the servers rather than "
        "the disk's writeback; pass e.g. /var/tmp for a disk-backed file)",
    )
    args = parse_fio_arguments(parser)
    size = args.size * 1024 * 1024
    check_free_space(args.dir or Path(tempfile.gettempdir()), size + 256 * 1024 * 1024)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image = Path(tmp) / "bench.img"
        sock = Path(tmp) / "nbd.sock"
        print(f"preparing a {args.size} MiB image in {tmp} ...", flush=True)
        make_image(image, size)
        samples: dict[str, dict[str, list[dict[str, float]]]] = {
            job: {"ours": [], "qemu-nbd": []} for job in JOBS
        }
        for job in JOBS:
            for round_no in range(args.rounds):
                # Alternate which server goes first, so page-cache state favours neither.
                order = ["qemu-nbd", "ours"] if round_no % 2 == 0 else ["ours", "qemu-nbd"]
                for kind in order:
                    os.sync()  # start each run with no dirty pages from the previous one
                    with server(kind, image, sock) as uri:
                        sample = run_fio(uri, job, size, args.runtime)
                    samples[job][kind].append(sample)
                    print(
                        f"  {job:<20} {kind:<9} {sample['iops']:>10.0f} IOPS"
                        f" {sample['mib_s']:>9.1f} MiB/s",
                        flush=True,
                    )

    report: dict[str, Any] = {"size_mib": args.size, "runtime_s": args.runtime}
    print()
    report["jobs"] = print_ratio_table(samples)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"nbd_fio-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
