"""`replikant broker run` as a real process: the admin CLI against it, and kill -9 under load."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.apply import ReplicaEngine
from broker.store import Replica, ReplicaMeta, Store
from certs.store import CertStore
from common.config import TLSFiles
from tests.support_agent import run_tool
from tests.support_broker import (
    PKI,
    AgentClient,
    BrokerProcess,
    FakeSource,
    MiB,
    admin_toml,
    broker_toml,
    free_port,
    make_pki,
)

REPLIKANT = str(Path(sys.executable).parent / "replikant")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker_proc(pki: PKI, tmp_path: Path) -> Iterator[tuple[BrokerProcess, str, Path]]:
    store = tmp_path / "store"
    cfg = broker_toml(tmp_path / "broker.toml", pki, store, port=free_port())
    proc = BrokerProcess(cfg, store, tmp_path / "broker.log")
    url = proc.start()
    try:
        yield proc, url, store
    finally:
        proc.stop()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REPLIKANT, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def replica_of(store: Path, src: FakeSource) -> Replica:
    path = store / str(src.vm_uuid) / src.disk_id
    meta = ReplicaMeta.from_json(json.loads((path / "meta.json").read_text()))
    return Replica(path, meta)


async def test_cli_status_and_points_json(
    broker_proc: tuple[BrokerProcess, str, Path], pki: PKI, tmp_path: Path
) -> None:
    """`replikant status --json` and `points VM --json` through the real CLI and a real broker."""
    _proc, url, _store = broker_proc
    src = FakeSource(disk_size=2 * MiB)
    async with AgentClient(url, pki.agents["h1"]) as agent:
        await agent.enable(src, rpo_seconds=3600.0)
        for _ in range(3):
            src.mutate()
            await agent.ship(src, src.cut())
        for _ in range(100):
            if (await agent.state(src))["applied_seq"] == 3:
                break
            await asyncio.sleep(0.05)
    admin = admin_toml(tmp_path / "admin.toml", pki, url)
    res = await asyncio.to_thread(cli, admin, "status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    (vm,) = doc["vms"]
    assert {k: vm[k] for k in ("name", "uuid", "generation")} == {
        "name": "web1",
        "uuid": str(src.vm_uuid),
        "generation": 1,
    }
    assert vm["roles"] == {"primary": "PRIMARY", "recovery": "REPLICA"}
    assert vm["health"] in ("ok", "warning")
    assert isinstance(vm["lag_seconds"], float)
    assert vm["last_point"]["cut_id"] == 3
    res = await asyncio.to_thread(cli, admin, "points", "web1", "--json")
    assert res.returncode == 0, res.stderr
    pts = json.loads(res.stdout)
    assert [p["id"] for p in pts["points"]] == ["1:3", "1:2", "1:1"]
    assert all({"id", "time", "kind", "size_bytes", "tier"} <= set(p) for p in pts["points"])
    # Each disk's recovery-point data against its bound (default: 100 % of the disk).
    (journal,) = pts["journal"]
    assert journal["bound_bytes"] == journal["disk_bytes"] == 2 * MiB
    assert 0 < journal["bytes"] <= journal["bound_bytes"]
    assert journal["oldest_point"] == "1-1"
    assert vm["disks"][0]["journal"]["bound_bytes"] == 2 * MiB
    # Human output: roles are words with their own symbols, never a bare colour.
    res = await asyncio.to_thread(cli, admin, "status")
    assert res.returncode == 0, res.stderr
    assert "▲ PRIMARY" in res.stdout
    assert "▽ REPLICA" in res.stdout
    res = await asyncio.to_thread(cli, admin, "points", "nosuchvm")
    assert res.returncode == 1
    assert "nosuchvm" in res.stderr
    res = await asyncio.to_thread(cli, admin, "verify", "web1", "--json")
    assert res.returncode == 1
    assert "agents" in res.stderr
    # SIGTERM stops it gracefully.
    assert await asyncio.to_thread(_proc.stop) == 0
    assert "broker_stopped" in (tmp_path / "broker.log").read_text()


def _audit(replica: Replica) -> list[int]:
    seqs = [r.seq for r in replica.applied_records()]
    assert seqs == list(range(1, len(seqs) + 1)), f"audit not 1..N exactly once: {seqs}"
    return seqs


@pytest.mark.slow
async def test_kill9_under_stream(pki: PKI, tmp_path: Path) -> None:
    """50 SIGKILLs during a continuous stream (an initial copy, then deltas): after each restart
    the replica converges to the source byte for byte, no acked batch is lost and the audit shows
    each batch applied once; at the end every recovery point kept reads as the source at its
    cut."""
    rng = random.Random(9)
    store = tmp_path / "store"
    cfg = broker_toml(tmp_path / "broker.toml", pki, store, port=free_port())
    proc = BrokerProcess(cfg, store, tmp_path / "broker.log")
    url = await asyncio.to_thread(proc.start)
    src = FakeSource(disk_size=4 * MiB, seed=3)
    acked = 0
    stop = asyncio.Event()

    async def stream(agent: AgentClient) -> None:
        nonlocal acked
        while not stop.is_set():
            src.mutate(rng.randint(1, 12))
            # The first batches are an initial copy (FULL: applied directly while streaming).
            cut = src.cut(full=True, all_blocks=True) if src.seq < 4 else src.cut()
            acked = await agent.ship(src, cut, retries=10_000)

    try:
        async with AgentClient(url, pki.agents["h1"]) as agent:
            await agent.enable(src)
            for i in range(50):
                stop.clear()
                task = asyncio.create_task(stream(agent))
                await asyncio.sleep(rng.uniform(0.05, 0.7))
                await asyncio.to_thread(proc.kill9)
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                await asyncio.to_thread(proc.start)
                # Let the stream go on a little against the restarted broker, then pause it.
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                stop.set()
                async with asyncio.timeout(120):
                    await task
                async with asyncio.timeout(60):
                    while True:
                        state = await agent.state(src)
                        if state["applied_seq"] == state["durable_seq"]:
                            break
                        await asyncio.sleep(0.05)
                durable = state["durable_seq"]
                assert durable >= acked, f"iteration {i}: acked {acked} but durable {durable}"
                assert durable == src.seq, f"iteration {i}: source cut {src.seq}, durable {durable}"
                replica = replica_of(store, src)
                digest = hashlib.sha256(replica.image.read_bytes()).hexdigest()
                assert digest == src.cuts[durable].digest, f"iteration {i}: replica differs"
                assert _audit(replica)[-1] == durable
    finally:
        with contextlib.suppress(Exception):
            proc.stop()
    log = (tmp_path / "broker.log").read_text()
    assert "Traceback" not in log or "KeyboardInterrupt" in log, log[-3000:]
    assert '"undo_ahead": true' in log  # undo captured while batches streamed in, too
    # Every recovery point kept through the kills reads as the source did at its cut.
    st = Store(store)
    replica = st.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    engine = ReplicaEngine(st, replica, epoch=lambda: 0)
    try:
        points = engine.points.points(engine.state())
        # The journal bound (100 % of this 4 MiB disk) holds about five of these ~0.7 MiB points;
        # how many exactly depends on how the kills fell.
        assert len(points) >= 3, points
        for point in points:
            with engine.open_view(point.state.key) as view:
                image = view.read(0, src.disk_size)
            assert image == src.cuts[point.state.seq].image, f"point {point.state.key} differs"
    finally:
        engine.close()


def _refusal(pki: PKI, tmp_path: Path, tls: TLSFiles) -> str:
    """`replikant broker run` with ``tls`` as its certificate: must exit 1; returns stderr."""
    cfg = broker_toml(
        tmp_path / "broker.toml", dataclasses.replace(pki, broker=tls), tmp_path / "s", port=1
    )
    proc = run_tool(REPLIKANT, "broker", "run", "--config", str(cfg))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()  # refused before touching the store
    return proc.stderr


def test_broker_refuses_an_agent_certificate(pki: PKI, tmp_path: Path) -> None:
    """An agent's certificate on a broker: refused at startup naming the role and the fix."""
    err = _refusal(pki, tmp_path, pki.agents["h1"])
    assert "the broker did not start" in err
    assert "wrong_role" in err
    assert "replikant certs issue broker" in err


def test_broker_refuses_another_brokers_certificate(pki: PKI, tmp_path: Path) -> None:
    """The identity must be this broker's [broker] cluster and node."""
    other = CertStore(pki.root / "ca").issue_broker("c1", "b7", ips=["127.0.0.1"]).tls
    err = _refusal(pki, tmp_path, other)
    assert "wrong_identity" in err
    assert "replikant://broker/c1/b7" in err
    assert "--cluster c1 --node b1" in err
