"""Offline seeding (`replikant seed import`) and `replikant verify` through the real CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import xxhash

from broker.seed import copy_image, read_manifest
from broker.service import BrokerService
from tests.support_agent import stand_in_agent
from tests.support_broker import PKI, AgentClient, FakeSource, MiB, admin_toml, make_pki
from tests.support_broker import admin_cli as cli
from tests.test_broker_http import broker as broker  # noqa: PLC0414 - re-exported fixture
from tests.test_broker_http import settle


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write_media(directory: Path, src: FakeSource, name: str, seq: int) -> Path:
    """What `seed export` writes for one single-disk VM at cut ``seq``."""
    (directory / name).mkdir(parents=True, exist_ok=True)
    image = src.cuts[seq].image
    (directory / name / "disk0.img").write_bytes(image)
    bs = src.block_size
    (directory / name / "disk0.xxh3").write_bytes(
        b"".join(
            struct.pack(">Q", xxhash.xxh3_64_intdigest(image[i : i + bs]))
            for i in range(0, len(image), bs)
        )
    )
    manifest = directory / "manifest.json"
    doc: dict[str, Any] = (
        json.loads(manifest.read_text())
        if manifest.exists()
        else {
            "format": "replikant-seed",
            "version": 1,
            "source": {"host": "h1", "site": "primary"},
            "vms": [],
        }
    )
    doc["vms"].append(
        {
            "name": name,
            "uuid": str(src.vm_uuid),
            "generation": 1,
            "disks": [
                {
                    "id": "disk0",
                    "disk_size": src.disk_size,
                    "block_size": bs,
                    "seq": seq,
                    "cut_time_ns": src.cuts[seq].cut_ns,
                    "image": f"{name}/disk0.img",
                    "hashes": f"{name}/disk0.xxh3",
                }
            ],
        }
    )
    manifest.write_text(json.dumps(doc))
    return directory


async def test_seed_import_then_ship_only_changes(
    broker: BrokerService, pki: PKI, tmp_path: Path
) -> None:
    """Media at cut 5 imports in one command; the agent then resumes at seq 6 and converges."""
    src = FakeSource(disk_size=4 * MiB)
    for _ in range(5):
        src.mutate(10)
        src.cut()
    media = write_media(tmp_path / "media", src, "web1", 5)
    admin = admin_toml(tmp_path / "admin.toml", pki, broker.url)
    rc, out, err = await cli(admin, "seed", "import", str(media), "--json")
    assert rc == 0, err
    (item,) = json.loads(out)["imported"]
    assert item["seq"] == 5
    assert item["copied_bytes"] > 0
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        state = await agent.enable(src)
        assert state["durable_seq"] == 5
        assert state["initial_sync"] == "complete"
        for _ in range(2):
            src.mutate(5)
            status, body = await agent.post(src, src.cut().body)
            assert status == 200
            assert body["acked_seq"] == src.seq
        await settle(broker, src)
    replica = broker.store.get(str(src.vm_uuid), "disk0")
    assert replica is not None
    assert replica.image.read_bytes() == bytes(src.image)
    assert [(r.seq, r.seeded) for r in replica.applied_records()] == [
        (5, True),
        (6, False),
        (7, False),
    ]
    # Re-importing onto a replica that holds data is refused.
    rc, _out, err = await cli(admin, "seed", "import", str(media))
    assert rc == 1
    assert "already holds data" in err
    # verify against a local copy of the source image: match, then a named difference.
    image = tmp_path / "source.img"
    image.write_bytes(bytes(src.image))
    rc, out, err = await cli(admin, "verify", "web1", "--source-image", str(image), "--json")
    assert rc == 0, err
    assert json.loads(out)["result"] == "match"
    with image.open("r+b") as fh:
        fh.seek(3 * 65536 + 100)
        fh.write(b"drift")
    rc, out, err = await cli(admin, "verify", "web1", "--source-image", str(image), "--json")
    doc = json.loads(out)
    assert rc == 3
    assert doc["result"] == "differ"
    assert doc["disks"][0]["differing_ranges"] == [[3 * 65536, 65536]]


async def test_seed_of_another_vm_refused_up_front(
    broker: BrokerService, pki: PKI, tmp_path: Path
) -> None:
    """Media holding another VM is refused before anything is written, naming both identities."""
    web = FakeSource(disk_size=2 * MiB, seed=1)
    db = FakeSource(disk_size=2 * MiB, seed=2)
    for s in (web, db):
        s.mutate()
        s.cut()
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(web, name="web1")
    admin = admin_toml(tmp_path / "admin.toml", pki, broker.url)
    # The operator means web1, the media holds db1.
    media = write_media(tmp_path / "m1", db, "db1", 1)
    rc, _out, err = await cli(admin, "seed", "import", str(media), "--vm", "web1")
    assert rc == 1
    assert "db1" in err
    assert "web1" in err
    assert broker.store.find_vm("db1") == []
    # Media claiming the name web1 but carrying another VM's UUID.
    media2 = write_media(tmp_path / "m2", db, "web1", 1)
    rc, _out, err = await cli(admin, "seed", "import", str(media2))
    assert rc == 1
    assert str(db.vm_uuid) in err
    assert str(web.vm_uuid) in err
    replica = broker.store.get(str(web.vm_uuid), "disk0")
    assert replica is not None
    assert replica.image.stat().st_blocks == 0


def test_copy_resumes_without_rewriting(tmp_path: Path) -> None:
    """An interrupted import, run again, skips the blocks already copied."""
    from broker.store import Store

    src = FakeSource(disk_size=2 * MiB)
    src.mutate(20)
    src.cut()
    media = write_media(tmp_path / "media", src, "web1", 1)
    (disk,) = read_manifest(media)
    store = Store(tmp_path / "store")
    replica, _ = store.create_replica(
        vm_uuid=str(src.vm_uuid),
        disk_id="disk0",
        vm_name="web1",
        disk_size=src.disk_size,
        block_size=src.block_size,
        generation=1,
        epoch=0,
    )
    first = copy_image(disk, replica)
    again = copy_image(disk, replica)
    assert first["copied_bytes"] > 0
    assert again["copied_bytes"] == 0
    assert again["skipped_bytes"] == first["copied_bytes"] + first["skipped_bytes"]
    assert replica.image.read_bytes() == src.cuts[1].image


async def test_existing_copy_marks_seeded(broker: BrokerService, pki: PKI, tmp_path: Path) -> None:
    """A raw copy of an enabled disk loads as "seeded" (the agent then compares hashes); a copy
    of another size is refused naming the disk."""
    src = FakeSource(disk_size=2 * MiB)
    src.mutate(10)
    src.cut()
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        admin = admin_toml(tmp_path / "admin.toml", pki, broker.url)
        wrong = tmp_path / "wrong.img"
        wrong.write_bytes(bytes(MiB))
        rc, _out, err = await cli(admin, "seed", "import", "--image", str(wrong), "--vm", "web1")
        assert rc == 1
        assert "web1" in err
        assert "not a copy of this disk" in err
        copy = tmp_path / "backup.img"
        copy.write_bytes(src.cuts[1].image)
        rc, out, err = await cli(
            admin, "seed", "import", "--image", str(copy), "--vm", "web1", "--json"
        )
        assert rc == 0, err
        assert json.loads(out)["imported"][0]["seq"] is None
        state = await agent.state(src)
        assert state["initial_sync"] == "seeded"
        assert state["durable_seq"] == 0
    replica = broker.store.get(str(src.vm_uuid), "disk0")
    assert replica is not None
    assert replica.image.read_bytes() == src.cuts[1].image


async def test_verify_via_agent_endpoint_and_repair(
    broker: BrokerService, pki: PKI, tmp_path: Path
) -> None:
    """`replikant verify VM` asks the agent to cut and hash (here a stand-in implementing the
    endpoint of http.md), compares with the broker's hashes of the same point, and --repair sends
    the differing ranges back to the agent."""
    import base64

    from aiohttp import web

    src = FakeSource(disk_size=2 * MiB)
    repaired: list[Any] = []
    drift = {"on": False}
    bs = src.block_size

    async def verify_handler(request: web.Request) -> web.Response:
        if request.match_info["vm"] != "web1":
            return web.json_response({"error": "unknown_vm"}, status=404)
        # Cut, ship, wait for the ack, hash the frozen cut: what the agent does.
        src.mutate(4)
        cut = src.cut()
        async with AgentClient(broker.url, pki.agents["h1"]) as agent:
            await agent.ship(src, cut)
        image = bytearray(cut.image)
        if drift["on"]:
            image[5 * bs] ^= 1  # the replica no longer matches the source there
        hashes = b"".join(
            struct.pack(">Q", xxhash.xxh3_64_intdigest(bytes(image[i : i + bs])))
            for i in range(0, len(image), bs)
        )
        disk = {
            "disk_id": "disk0",
            "generation": 1,
            "seq": cut.seq,
            "cut_id": cut.seq,  # FakeSource numbers its cuts by seq
            "block_size": bs,
            "disk_size": src.disk_size,
            "hashes": base64.b64encode(hashes).decode(),
        }
        return web.json_response({"vm": "web1", "vm_uuid": str(src.vm_uuid), "disks": [disk]})

    async def repair_handler(request: web.Request) -> web.Response:
        repaired.append(await request.json())
        return web.json_response({"marked_blocks": 1})

    routes = [
        web.post("/v1/vms/{vm}/verify", verify_handler),
        web.post("/v1/vms/{vm}/repair", repair_handler),
    ]
    async with stand_in_agent(tmp_path / "agent.sock", routes) as sock:
        async with AgentClient(broker.url, pki.agents["h1"]) as agent:
            await agent.enable(src)
        admin = admin_toml(tmp_path / "admin.toml", pki, broker.url)
        admin.write_text(admin.read_text().replace("[admin]\n", f'[admin]\nagents = ["{sock}"]\n'))
        rc, out, err = await cli(admin, "verify", "web1", "--json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["result"] == "match"
        assert (doc["disks"][0]["point"], doc["disks"][0]["disk_point"]) == ("1:1", "1-1")
        drift["on"] = True
        rc, out, err = await cli(admin, "verify", "web1", "--json", "--repair")
        assert rc == 3, err
        doc = json.loads(out)
        assert doc["disks"][0]["differing_ranges"] == [[5 * bs, bs]]
        assert (doc["disks"][0]["point"], doc["disks"][0]["disk_point"]) == ("1:2", "1-2")
        assert repaired == [{"disks": [{"disk_id": "disk0", "ranges": [[5 * bs, bs]]}]}]
