"""The journal bound end to end: a real agent ships unthrottled random writes to a real broker
(both ``replikant ... run`` processes, HTTPS with mutual TLS), and the broker's recovery-point
data on disk never crosses the disk's default bound (100 % of its size), sampled every 0.2 s."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    ReplikantProc,
    VMSpec,
    admin_config,
    agent_process,
    broker_config,
    export_ready,
    free_port,
    make_image,
    replikant_exe,
    same_file,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 16 * MiB
HOT = SIZE // 4
CHURN_SECONDS = 20.0


def points_on_disk(points_dir: Path) -> int:
    """Bytes of every file in the replica's points folder (partial ones too); 0 before it exists."""
    total = 0
    try:
        entries = list(points_dir.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            total += entry.stat().st_size
        except FileNotFoundError:  # dropped between the listing and the stat
            continue
    return total


def churn(sock: Path, export: str, stop: threading.Event, rng: random.Random) -> int:
    """Unthrottled 4 KiB random writes over the first quarter of the disk until ``stop``;
    returns how many. (All over the disk, every 1 s batch would cover all of it: its undo alone
    exceeds a 100 % bound, and no point could be kept at all; docs/broker.md.)"""
    nbd = MiniNBD(sock, export, timeout=10)
    n = 0
    try:
        while not stop.is_set():
            nbd.write(rng.randrange(HOT // 4096) * 4096, rng.randbytes(4096))
            n += 1
    finally:
        nbd.close()
    return n


async def test_recovery_points_never_cross_the_bound_under_churn(tmp_path: Path) -> None:
    """20 s of unthrottled 4 KiB random writes at 1 s cycles: the points folder, sampled every
    0.2 s, stays within 100 % of the disk while the churn fills it; points remain; the replica
    converges to the source."""
    rng = random.Random(11)
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    port = free_port()
    broker = ReplikantProc(
        ["broker", "run", "--config", str(broker_config(tmp_path / "b.toml", pki, store, port))],
        tmp_path / "broker.log",
    )
    image = make_image(tmp_path / "disk0.img", SIZE, fill=lambda i: rng.randbytes(MiB))
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    url = f"https://127.0.0.1:{port}"
    agent = agent_process(
        tmp_path,
        pki=pki,
        broker_urls=[url],
        vms=[vm],
        interval=1.0,
    )
    sock, export = tmp_path / "sock" / "vm1-disk0.sock", "vm1-disk0"
    replica_dir = store / str(vm.uuid) / "disk0"
    broker.start()
    agent.start()
    try:
        await wait_for(lambda: export_ready(sock, export), "the agent's export")
        await wait_for(
            lambda: same_file(replica_dir / "replica.img", image), "the initial copy", 60
        )
        stop = threading.Event()
        writer = asyncio.create_task(asyncio.to_thread(churn, sock, export, stop, rng))
        samples: list[int] = []
        deadline = time.monotonic() + CHURN_SECONDS
        while time.monotonic() < deadline:
            samples.append(points_on_disk(replica_dir / "points"))
            assert samples[-1] <= SIZE, f"points folder {samples[-1]} B > bound {SIZE} B"
            for p in (agent, broker):
                assert p.proc is not None
                assert p.proc.poll() is None, f"{p.args[0]} exited; see {p.log}"
            await asyncio.sleep(0.2)
        stop.set()
        writes = await writer
        assert writes > 1000, "the churn did not run"
        assert max(samples) > SIZE // 2, f"the churn never filled the bound: {max(samples)}"
        await wait_for(lambda: same_file(replica_dir / "replica.img", image), "convergence", 60)
        admin = admin_config(tmp_path / "admin.toml", pki, url, [])
        proc = await asyncio.create_subprocess_exec(
            replikant_exe(),
            "--config",
            str(admin),
            "points",
            "vm1",
            "--json",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        doc = json.loads(out)
        (journal,) = doc["journal"]
        assert journal["bound_bytes"] == SIZE
        assert journal["bytes"] <= SIZE
        assert len(doc["points"]) >= 2, "the bound left no older point at all"
        assert broker.events("undo_dropped"), "the bound never had to act"
        human = await asyncio.create_subprocess_exec(
            replikant_exe(), "--config", str(admin), "points", "vm1",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        text = (await human.communicate())[0].decode()
        assert "TIER" in text
        assert "disk0: journal" in text
        assert "16.0 MiB bound" in text
    finally:
        agent.stop()
        broker.stop()
