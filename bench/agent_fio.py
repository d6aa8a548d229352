"""The agent's tracked export vs qemu-nbd, same file, same fio jobs: ``python bench/agent_fio.py``.

Like ``bench/nbd_fio.py`` (whose helpers it reuses), but our side is the agent's
:class:`agents.disk.TrackedExport` with change tracking on: every write marks the dirty map and
persists newly dirtied 4 MiB regions, and every ``--cycle`` seconds the export is cut and the cut
settled as if its batch had been acked (which clears the persisted regions, so they are dirtied
and persisted again in the next cycle: the worst case for tracking's extra writes). Prints IOPS,
MiB/s and our/qemu-nbd ratios, plus the extra-writes ratio (persisted-map writes per guest write).

``python bench/agent_fio.py serve IMAGE --socket S`` runs just our server (used by the bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
from nbd_fio import (
    JOBS,
    add_fio_arguments,
    make_image,
    parse_fio_arguments,
    print_ratio_table,
    run_fio,
    wait_for_socket,
)

REPO = Path(__file__).resolve().parent.parent


async def _serve(args: argparse.Namespace) -> dict[str, int]:
    from agents.disk import TrackedExport
    from common.nbd.server import NBDServer

    state = Path(args.state_dir)
    export = TrackedExport(
        Path(args.image), args.name, block_size=args.block_size, map_path=state / "disk.map"
    )
    export.open()
    server = NBDServer([export], default_export=args.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cuts = 0
    await server.serve_unix(args.socket)
    try:
        while not stop.is_set():
            try:
                async with asyncio.timeout(args.cycle):
                    await stop.wait()
            except TimeoutError:
                export.begin_cut()
                export.end_cut(acked=True)  # as if the batch was acked: regions clear
                cuts += 1
    finally:
        await server.close()
        stats = {
            "guest_ops": export.map.guest_ops,
            "map_writes": export.map.map_writes,
            "map_syncs": export.map.map_syncs,
            "cuts": cuts,
        }
        export.close()
    return stats


def serve_main(argv: list[str]) -> int:
    """The ``serve`` sub-command: one tracked export on a unix socket until SIGTERM."""
    parser = argparse.ArgumentParser(prog="agent_fio.py serve")
    parser.add_argument("image")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--name", default="disk")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--block-size", type=int, default=65536)
    parser.add_argument("--cycle", type=float, default=1.0)
    parser.add_argument("--stats")
    args = parser.parse_args(argv)
    import uvloop

    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stats = runner.run(_serve(args))
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats))
    return 0


@contextmanager
def tracked_server(
    image: Path, sock: Path, state: Path, stats: Path, cycle: float
) -> Iterator[str]:
    """Run our tracked server on ``image``; yields the NBD URI of its export."""
    if sock.exists():
        sock.unlink()
    cmd = [
        sys.executable, __file__, "serve", os.fspath(image), "--socket", os.fspath(sock),
        "--state-dir", os.fspath(state), "--stats", os.fspath(stats), "--cycle", str(cycle),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def qemu_server(image: Path, sock: Path) -> Iterator[str]:
    """qemu-nbd on ``image`` with the settings bench/nbd_fio.py uses."""
    if sock.exists():
        sock.unlink()
    cmd = [
        "qemu-nbd", "-f", "raw", "-t", "-x", "disk", "-k", os.fspath(sock),
        "--cache=writeback", "--aio=threads", os.fspath(image),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    """Run the comparison and print the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        return serve_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__)
    add_fio_arguments(parser)
    parser.add_argument("--cycle", type=float, default=1.0, help="seconds between cuts")
    parser.add_argument("--dir", type=Path, help="where to put the image (default: a temp dir)")
    args = parse_fio_arguments(parser)
    size = args.size * 1024 * 1024
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        job: {"ours": [], "qemu-nbd": []} for job in JOBS
    }
    tracking: dict[str, dict[str, int]] = {}
    check_free_space(args.dir or Path(tempfile.gettempdir()), size + 256 * 1024 * 1024)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image = Path(tmp) / "bench.img"
        sock = Path(tmp) / "nbd.sock"
        print(f"preparing a {args.size} MiB image in {tmp} ...", flush=True)
        make_image(image, size)
        for job in JOBS:
            for round_no in range(args.rounds):
                order = ["qemu-nbd", "ours"] if round_no % 2 == 0 else ["ours", "qemu-nbd"]
                for kind in order:
                    os.sync()
                    stats = Path(tmp) / "stats.json"
                    state = Path(tmp) / f"state-{job}-{round_no}"
                    if kind == "ours":
                        with tracked_server(image, sock, state, stats, args.cycle) as uri:
                            sample = run_fio(uri, job, size, args.runtime)
                        tracking[f"{job}#{round_no}"] = json.loads(stats.read_text())
                    else:
                        with qemu_server(image, sock) as uri:
                            sample = run_fio(uri, job, size, args.runtime)
                    samples[job][kind].append(sample)
                    print(
                        f"  {job:<20} {kind:<9} {sample['iops']:>10.0f} IOPS"
                        f" {sample['mib_s']:>9.1f} MiB/s",
                        flush=True,
                    )
    report: dict[str, Any] = {
        "size_mib": args.size,
        "runtime_s": args.runtime,
        "cycle_s": args.cycle,
        "tracking": tracking,
    }
    print()
    print("fio nbd engine, tracked export (ours) vs qemu-nbd, same preallocated raw image")
    report["jobs"] = print_ratio_table(samples)
    print()
    print(
        f"tracking extra writes (cut + settle every {args.cycle} s, regions re-dirtied each cycle)"
    )
    print(f"{'run':<24} {'guest writes':>12} {'map writes':>11} {'ratio':>8} {'cuts':>5}")
    for run, st in tracking.items():
        ratio = st["map_writes"] / max(st["guest_ops"], 1)
        print(
            f"{run:<24} {st['guest_ops']:>12} {st['map_writes']:>11} {ratio:>8.4f} {st['cuts']:>5}"
        )
    print(
        "(reference: Hyper-V Replica quotes 1.5x IOPS for its log; bound here: 1 per 4 MiB region"
        " newly dirtied per cycle)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"agent_fio-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
