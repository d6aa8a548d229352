"""End to end with the real broker: `replikant agent run` ships to `replikant broker run`.

Both are real processes talking HTTPS with mutual TLS. A writer keeps writing through the agent's
NBD export while the agent, and once the broker too, are killed with SIGKILL; the broker's replica
must converge byte-identical each time, and the agent's log must show no FULL batch after the
initial copy.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path

import pytest

from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    NBDClientError,
    ReplikantProc,
    VMSpec,
    admin_config,
    broker_config,
    export_ready,
    free_port,
    make_image,
    replikant_exe,
    same_file,
    wait_for,
    write_agent_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 32 * MiB


async def test_agent_and_broker_processes_survive_kill9(tmp_path: Path) -> None:
    """Real agent, real broker: kills of either lose nothing and never force a full copy."""
    rng = random.Random(5)
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    broker = ReplikantProc(
        ["broker", "run", "--config", str(broker_config(tmp_path / "b.toml", pki, store, bport))],
        tmp_path / "broker.log",
    )
    image = make_image(
        tmp_path / "d.img", SIZE, fill=lambda i: rng.randbytes(MiB) if i % 4 else b""
    )
    vm = VMSpec("web1", [DiskSpec("disk0", image)])
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
    )
    agent = ReplikantProc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")
    sock = tmp_path / "s" / "web1-disk0.sock"
    replica = store / str(vm.uuid) / "disk0" / "replica.img"
    broker.start()
    agent.start()
    try:
        await wait_for(lambda: export_ready(sock, "web1-disk0"), "the agent's export")
        await wait_for(lambda: same_file(replica, image), "the initial copy")

        def burst(stop: threading.Event, seed: int) -> None:
            r = random.Random(seed)
            try:
                nbd = MiniNBD(sock, "web1-disk0", timeout=5)
            except (OSError, NBDClientError):
                return
            try:
                base = r.randrange(SIZE // (4 * MiB)) * 4 * MiB
                while not stop.is_set():
                    nbd.write(base + r.randrange(1024) * 4096, r.randbytes(4096))
            except (OSError, NBDClientError):
                pass
            finally:
                nbd.sock.close()

        for i in range(8):
            stop = threading.Event()
            writer = asyncio.create_task(asyncio.to_thread(burst, stop, i))
            await asyncio.sleep(rng.uniform(0.1, 1.2))
            victim = broker if i in (2, 5) else agent
            victim.kill9()
            stop.set()
            await writer
            victim.start()
            await wait_for(lambda: export_ready(sock, "web1-disk0"), "the agent's export")
            await wait_for(lambda: same_file(replica, image), f"convergence after kill {i}")
        assert agent.stop() == 0
        assert broker.stop() == 0
    finally:
        for p in (agent, broker):
            if p.proc is not None and p.proc.poll() is None:
                p.kill9()
    acked = agent.events("batch_acked")
    full = [e for e in acked if e["full"]]
    assert full, "the initial copy went as FULL batches"
    first_delta = min(int(e["seq"]) for e in acked if not e["full"])
    assert all(int(e["seq"]) < first_delta for e in full), "a FULL batch after a kill"
    assert max(int(e["data_bytes"]) for e in acked if not e["full"]) <= SIZE // 2


async def test_replikant_verify_against_agent_and_broker(tmp_path: Path) -> None:
    """`replikant verify VM` compares the agent's hashes of a fresh cut with the broker's."""
    pki = make_pki(tmp_path / "pki")
    bport = free_port()
    broker = ReplikantProc(
        [
            "broker",
            "run",
            "--config",
            str(broker_config(tmp_path / "b.toml", pki, tmp_path / "store", bport)),
        ],
        tmp_path / "broker.log",
    )
    image = make_image(tmp_path / "d.img", 16 * MiB, fill=lambda i: random.randbytes(MiB))
    vm = VMSpec("web1", [DiskSpec("disk0", image)])
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
    )
    agent = ReplikantProc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")
    replica = tmp_path / "store" / str(vm.uuid) / "disk0" / "replica.img"
    admin_toml = admin_config(
        tmp_path / "admin.toml",
        pki,
        f"https://127.0.0.1:{bport}",
        [str(tmp_path / "s" / "control" / "agent.sock")],
    )
    broker.start()
    agent.start()
    try:
        await wait_for(lambda: same_file(replica, image), "the initial copy")
        proc = await asyncio.create_subprocess_exec(
            replikant_exe(),
            "--config",
            str(admin_toml),
            "verify",
            "web1",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        doc = json.loads(out)
        assert doc["result"] == "match"
        assert doc["disks"][0]["matching_blocks"] == 256
    finally:
        for p in (agent, broker):
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
