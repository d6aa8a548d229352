"""Offline-media initial replication end to end: `replikant seed export`, then `seed import`.

Real processes (`replikant broker run`, `replikant agent run`, the admin CLI), real mTLS
certificates, real NBD writers (the test's client and qemu-io). Two VMs selected by a label wait
for media instead of a network copy; the export runs while the guests keep writing; the agent is
killed with SIGKILL between export and import; after the import only the changed blocks cross
the wire and the replicas converge byte-identical.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agents.control import read_status
from broker.seed import read_manifest
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    ReplikantProc,
    VMSpec,
    admin_config,
    broker_config,
    export_ready,
    file_digest,
    free_port,
    make_image,
    wait_for,
    write_agent_config,
)
from tests.support_broker import admin_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io (qemu-utils)"),
]

SIZE = 32 * MiB
REGION = 4 * MiB  # the persisted dirty map's granularity (after a kill -9)
HOT = (4 * MiB, 6 * MiB)  # where the guests write during the export
MEDIA_POLICY = """
[policies.offline]
interval_seconds = 1
initial_copy = "media"
selector = { tier = "seeded" }
"""


def _seed_states(sock: Path, vms: set[str]) -> dict[str, Any]:
    try:
        doc = read_status(sock)
    except OSError:
        return {}
    return {f"{d['vm']}/{d['disk']}": d["seed"] for d in doc["disks"] if d["vm"] in vms}


def _meta(store: Path, vm: VMSpec, disk: str) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((store / str(vm.uuid) / disk / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc


def _converged(replica_dir: Path, image: Path) -> Callable[[], bool]:
    return lambda: file_digest(replica_dir / "replica.img") == file_digest(image)


def _guest(sock: Path, export: str, stop: threading.Event, seed: int, count: list[int]) -> None:
    """Keep writing 4 KiB blocks into the hot area until told to stop."""
    rng = random.Random(seed)
    nbd = MiniNBD(sock, export, timeout=10)
    try:
        while not stop.is_set():
            nbd.write(rng.randrange(HOT[0], HOT[1], 4096), rng.randbytes(4096))
            count[0] += 1
        nbd.flush()
    finally:
        nbd.close()


async def test_seed_export_import_ships_only_changes(tmp_path: Path) -> None:
    """Export two labelled VMs while they are written to, kill the agent, import, converge."""
    rng = random.Random(7)
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    control = tmp_path / "s" / "control" / "agent.sock"

    def image(name: str, size: int = SIZE) -> Path:
        return make_image(
            tmp_path / f"{name}.img", size, fill=lambda i: rng.randbytes(MiB) if i % 3 else b""
        )

    web = VMSpec(
        "web1",
        [DiskSpec("disk0", image("web1-0")), DiskSpec("disk1", image("web1-1", 16 * MiB))],
        labels={"tier": "seeded"},
    )
    db = VMSpec("db1", [DiskSpec("disk0", image("db1-0"))], labels={"tier": "seeded"})
    app = VMSpec("app1", [DiskSpec("disk0", image("app1-0", 4 * MiB))])
    seeded = [(vm, d) for vm in (web, db) for d in vm.disks]
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[web, db, app],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
        extra_policies=MEDIA_POLICY,
    )
    admin = admin_config(tmp_path / "admin.toml", pki, f"https://127.0.0.1:{bport}", [str(control)])
    broker = ReplikantProc(
        ["broker", "run", "--config", str(broker_config(tmp_path / "b.toml", pki, store, bport))],
        tmp_path / "broker.log",
    )
    agent = ReplikantProc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")
    media = tmp_path / "media"
    sock = {vm.name: tmp_path / "s" / f"{vm.name}-disk0.sock" for vm in (web, db)}
    broker.start()
    agent.start()
    try:
        # The labelled VMs wait for media; app1 replicates over the network as usual.
        await wait_for(
            lambda: (
                all(
                    s == {"state": "awaiting_export"}
                    for s in _seed_states(control, {"web1", "db1"}).values()
                )
                and len(_seed_states(control, {"web1", "db1"})) == 3
            ),
            "the labelled disks to await their media",
        )
        await wait_for(
            lambda: _meta(store, app, "disk0").get("initial_sync") == "complete",
            "app1's network initial copy",
        )

        # Clear refusals, before anything is written.
        rc, _out, err = await admin_cli(
            admin, "seed", "export", "--dir", str(media), "--vm", "app1"
        )
        assert rc == 1
        assert "app1" in err
        assert "already holds data" in err
        assert "--force" in err
        rc, _out, err = await admin_cli(
            admin, "seed", "export", "--dir", str(media), "--vm", "nosuch"
        )
        assert rc == 1
        assert "no agent protects vm nosuch" in err
        assert not media.exists()

        # Export while both guests keep writing.
        stop = threading.Event()
        counts = {name: [0] for name in sock}
        guests = [
            asyncio.create_task(
                asyncio.to_thread(_guest, sock[n], f"{n}-disk0", stop, i, counts[n])
            )
            for i, n in enumerate(sock)
        ]
        await wait_for(lambda: all(c[0] > 50 for c in counts.values()), "the guests to write")
        before = {n: c[0] for n, c in counts.items()}
        rc, out, err = await admin_cli(
            admin, "seed", "export", "--dir", str(media), "--selector", "tier=seeded", "--json"
        )
        assert rc == 0, err
        assert all(counts[n][0] > before[n] for n in counts), "the guests wrote during the export"
        doc = json.loads(out)
        assert sorted(vm["name"] for vm in doc["vms"]) == ["db1", "web1"]
        seqs = {(vm["name"], d["id"]): d["seq"] for vm in doc["vms"] for d in vm["disks"]}
        assert set(seqs.values()) == {1}
        web_doc = next(vm for vm in doc["vms"] if vm["name"] == "web1")
        assert len({d["cut_time_ns"] for d in web_doc["disks"]}) == 1  # one instant per VM
        cut_ids = {vm["name"]: {d["cut_id"] for d in vm["disks"]} for vm in doc["vms"]}
        assert all(len(ids) == 1 and min(ids) > 0 for ids in cut_ids.values())  # one VM cut
        written = sum(d["written_bytes"] for vm in doc["vms"] for d in vm["disks"])
        assert 0 < written < (2 * SIZE + 16 * MiB) * 3 // 4  # holes left sparse
        # The media is what the broker reads: its manifest, sizes and hash files.
        assert {(d.vm_name, d.disk_id, d.seq) for d in read_manifest(media)} == {
            ("web1", "disk0", 1),
            ("web1", "disk1", 1),
            ("db1", "disk0", 1),
        }
        rc, _out, err = await admin_cli(
            admin, "seed", "export", "--dir", str(media), "--vm", "web1"
        )
        assert rc == 1
        assert "already holds complete seed media" in err

        # The disks wait for the import; a kill -9 of the agent keeps them waiting at seq 1.
        states = _seed_states(control, {"web1", "db1"})
        assert {s["state"] for s in states.values()} == {"awaiting_import"}
        stop.set()
        await asyncio.gather(*guests)
        agent.kill9()
        agent.start()
        await wait_for(lambda: export_ready(sock["web1"], "web1-disk0"), "the agent's export")
        await wait_for(
            lambda: (
                {s and s.get("seq") for s in _seed_states(control, {"web1", "db1"}).values()} == {1}
            ),
            "the restarted agent to wait for seq 1 again",
        )
        for vm, d in seeded:
            assert _meta(store, vm, d.id).get("durable_seq") == 0  # nothing shipped meanwhile

        rc, out, err = await admin_cli(admin, "seed", "import", str(media), "--json")
        assert rc == 0, err
        assert sorted((i["vm"], i["disk"], i["seq"]) for i in json.loads(out)["imported"]) == [
            ("db1", "disk0", 1),
            ("web1", "disk0", 1),
            ("web1", "disk1", 1),
        ]
        # Further guest writes with qemu-io, then everything converges byte for byte.
        for vm in (web, db):
            uri = f"nbd+unix:///{vm.name}-disk0?socket={sock[vm.name]}"
            proc = await asyncio.create_subprocess_exec(
                "qemu-io", "-f", "raw", "-c", "write -P 0x5a 10M 192k", uri
            )
            assert await proc.wait() == 0
        for vm, d in seeded:
            await wait_for(_converged(store / str(vm.uuid) / d.id, d.image), f"{vm.name}/{d.id}")
        assert agent.stop() == 0
        assert broker.stop() == 0
    finally:
        agent.kill9()
        broker.kill9()

    # Nothing went in full: the broker applied the seed, then only non-FULL batches.
    for vm, d in seeded:
        log = store / str(vm.uuid) / d.id / "applied.log"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert records[0]["seq"] == 1
        assert records[0]["seeded"]
        # The seeded state is the media's VM cut, and every later batch a later cut.
        assert {records[0]["cut_id"]} == cut_ids[vm.name]
        assert [r["cut_id"] for r in records] == sorted({r["cut_id"] for r in records})
        assert not any(r["full"] for r in records)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    # Only changed blocks crossed the wire: at most the dirty regions the guests touched after
    # the cut (region-granular because of the kill -9: the hot area and the qemu-io write).
    acked = [e for e in agent.events("batch_acked") if e["vm"] in ("web1", "db1")]
    assert acked
    assert not any(e["full"] for e in acked)
    for vm, d in seeded:
        mine = [e for e in acked if e["vm"] == vm.name and e["disk"] == d.id]
        touched = 2 * REGION if d.id == "disk0" else 0
        assert sum(e["data_bytes"] for e in mine) <= touched
        assert sum(e["wire_bytes"] for e in mine) <= touched + 64 * 1024
    assert agent.events("seed_import_detected")
