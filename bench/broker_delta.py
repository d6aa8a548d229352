"""Delta resync benchmark: Replikant vs `rsync --inplace --no-whole-file`, same files, one run.

    .venv/bin/python bench/broker_delta.py [--size-gib 4] [--changed 0.01] [--dir DIR]

A source image and an identical replica (held by a real `replikant broker run` over mTLS) and an
identical rsync target; then 1 % of the 64 KiB blocks change at random in the source, twice:

- tracking intact: the agent knows the changed blocks; it reads only those, ships one batch,
  and the time runs until the broker has *applied* it (durable, verified, in the image);
- tracking lost: both sides hash every block in parallel (the broker through GET hashes, the
  source locally in threads), compare, ship the differing blocks, wait until applied;

each against rsync between the same two files after the same change. Targets: ≤ 0.25× rsync
with tracking intact, ≤ 0.5× with tracking lost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import struct
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import (
    Broker,
    GiB,
    Pki,
    Shipper,
    add_workdir_arguments,
    check_free_space,
    copy_file,
    fast_random_file,
    human,
    make_pki,
    save_result,
)

from broker.applied import AppliedRecord
from broker.store import Store
from common.blockhash import file_block_hashes

BLOCK = 64 * 1024
_Q = struct.Struct(">Q")
T = TypeVar("T")


def change_blocks(path: Path, size: int, fraction: float, rng: random.Random) -> list[int]:
    """Overwrite ``fraction`` of the blocks with new random data; returns their offsets."""
    n_blocks = size // BLOCK
    chosen = sorted(rng.sample(range(n_blocks), max(1, int(n_blocks * fraction))))
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in chosen:
            os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return [b * BLOCK for b in chosen]


async def stopwatch(aw: Awaitable[T]) -> tuple[T, float]:
    """Await ``aw``; returns its result and how long it took."""
    start = time.perf_counter()
    result = await aw
    return result, time.perf_counter() - start


def rsync(src: Path, dst: Path) -> float:
    """Time rsync's delta transfer between the two files."""
    import subprocess

    start = time.perf_counter()
    subprocess.run(
        ["rsync", "--inplace", "--no-whole-file", "--ignore-times", str(src), str(dst)], check=True
    )
    return time.perf_counter() - start


def local_hashes(path: Path) -> bytes:
    """Block hashes of the source, hashed from an mmap (no copies), as the agent should."""
    return file_block_hashes(str(path), block_size=BLOCK)


def seed_store(store_root: Path, base: Path, vm_uuid: uuid.UUID, size: int) -> None:
    """Place an identical replica in the store (setup, not measured)."""
    store = Store(store_root)
    replica, _ = store.create_replica(
        vm_uuid=str(vm_uuid),
        disk_id="disk0",
        vm_name="bench",
        disk_size=size,
        block_size=BLOCK,
        generation=1,
        source_host="h1",
        source_site="primary",
        epoch=0,
    )
    copy_file(base, replica.image)
    replica.append_applied(AppliedRecord(1, 1, time.time_ns(), 0, False, 0, time.time_ns(), True))
    replica.update_meta(
        applied_seq=1, durable_seq=1, applied_cut_ns=time.time_ns(), initial_sync="complete"
    )


def prepare(args: argparse.Namespace) -> tuple[Path, int, Pki, Path, Path, uuid.UUID, Path]:
    """Images, PKI and an identical replica in a fresh store (not measured)."""
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    pki = make_pki(work / "pki")
    base = work / "base.img"
    print(f"preparing {human(size)} images in {work} ...", flush=True)
    fast_random_file(base, size)
    src = work / "source.img"
    dst = work / "rsync-target.img"
    copy_file(base, src)
    copy_file(base, dst)
    vm = uuid.uuid4()
    store = work / "store"
    seed_store(store, base, vm, size)
    base.unlink()
    return work, size, pki, src, dst, vm, store


async def run(args: argparse.Namespace) -> None:
    work, size, pki, src, dst, vm, store = await asyncio.to_thread(prepare, args)
    rng = random.Random(42)
    broker = Broker(work, pki, store)
    url = await asyncio.to_thread(broker.start)
    results = []
    try:
        async with Shipper(
            url, pki.agent, vm_uuid=vm, disk_id="disk0", disk_size=size, block_size=BLOCK
        ) as ship:
            await ship.enable()
            seq = 1
            fd = os.open(src, os.O_RDONLY)
            try:
                # Round 1: tracking intact.
                changed = await asyncio.to_thread(change_blocks, src, size, args.changed, rng)
                t_rsync = await asyncio.to_thread(rsync, src, dst)
                start = time.perf_counter()
                seq += 1
                await ship.ship(fd, ship.plan(fd, [(o, BLOCK) for o in changed]), seq, full=False)
                await ship.wait_applied(seq)
                t_ours = time.perf_counter() - start
                results.append(("tracking intact", t_ours, t_rsync, 0.25, len(changed)))
                # Round 2: tracking lost (hash both sides in parallel, ship the differences).
                changed2 = await asyncio.to_thread(change_blocks, src, size, args.changed, rng)
                t_rsync2 = await asyncio.to_thread(rsync, src, dst)
                start = time.perf_counter()
                (remote, t_remote), (local, t_local) = await asyncio.gather(
                    stopwatch(ship.hashes(BLOCK)), stopwatch(asyncio.to_thread(local_hashes, src))
                )
                differing = [
                    (i // 8) * BLOCK
                    for i in range(0, len(local), 8)
                    if local[i : i + 8] != remote[i : i + 8]
                ]
                seq += 1
                await ship.ship(fd, ship.plan(fd, [(o, BLOCK) for o in differing]), seq, full=False)
                await ship.wait_applied(seq)
                t_ours2 = time.perf_counter() - start
                print(
                    f"tracking lost: broker hashes {t_remote:.2f} s, source hashes {t_local:.2f} s"
                    f" (in parallel), then compare + ship + apply "
                    f"{t_ours2 - max(t_remote, t_local):.2f} s",
                    flush=True,
                )
                assert sorted(differing) == changed2, "hash compare missed or invented blocks"
                results.append(("tracking lost", t_ours2, t_rsync2, 0.5, len(differing)))
            finally:
                os.close(fd)
    finally:
        await asyncio.to_thread(broker.stop)
    print(f"\ndelta resync of {human(size)}, {args.changed:.1%} of 64 KiB blocks changed")
    print(f"{'case':<18}{'ours s':>9}{'rsync s':>9}{'ratio':>8}{'target':>8}  blocks")
    for name, ours, peer, target, blocks in results:
        ratio = ours / peer
        flag = "ok" if ratio <= target else "MISS"
        print(f"{name:<18}{ours:>9.3f}{peer:>9.3f}{ratio:>8.2f}{target:>8.2f}  {blocks} {flag}")
    saved = save_result(
        "broker_delta",
        {
            "size_bytes": size,
            "changed_fraction": args.changed,
            "cases": {
                name: {
                    "ours_s": ours,
                    "rsync_s": peer,
                    "ratio": ours / peer,
                    "target": target,
                    "blocks": blocks,
                }
                for name, ours, peer, target, blocks in results
            },
        },
    )
    print(f"results: {saved}")
    if args.verify:
        import filecmp

        same = filecmp.cmp(src, store / str(vm) / "disk0" / "replica.img", shallow=False)
        print(f"replica == source: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--verify", action="store_true", help="compare replica and source at the end"
    )
    add_workdir_arguments(parser, "delta")
    parser.add_argument("--quick", action="store_true", help="a 1 GiB disk")
    args = parser.parse_args()
    if args.quick:
        args.size_gib = min(args.size_gib, 1.0)
    work = Path(args.dir)
    check_free_space(work.parent, int(4 * args.size_gib * GiB) + GiB)  # base, src, dst, replica
    try:
        asyncio.run(run(args))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
