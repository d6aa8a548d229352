"""Test failover with a real guest: `replikant failover test|stop-test` against real processes.

A primary agent replicates web1 to a broker (publishing roles over a real Mosquitto); a
recovery-site agent knows web1 as a standby guest. The test copy boots from an older point while
replication goes on, reads the region and prints its hash; after stop-test nothing of it remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agents.hypervisor.base import process_alive
from common.config import AdminConfig, load_config
from ops.client import AdminClient
from tests.fixtures_pki import Pki, make_pki
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
    wait_for,
    write_agent_config,
)
from tests.support_broker import admin_cli
from tests.support_guest import GuestImage, console_value, pattern, sha256
from tests.support_mqtt import mosquitto, record_of

pytestmark = [pytest.mark.timeout(180)]

OFF = 2 * MiB
LEN = 128 * 1024
VMS_TOPIC = "replikant/v1/vms/#"


@pytest.fixture
def mqtt_port(tmp_path: Path) -> Iterator[int]:
    """A real Mosquitto on loopback."""
    with mosquitto(tmp_path) as port:
        yield port


async def retained(
    port: int, ca: Path, topic: str = VMS_TOPIC, window: float = 1.5
) -> dict[str, Any]:
    """Every retained record under ``topic`` a fresh subscriber gets, checked against ``ca``
    (daemons publish signed envelopes): {topic: record}."""
    out: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="lister") as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(window):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    if message.payload:
                        out[str(message.topic)] = record_of(ca, str(message.topic), message.payload)
    return out


def recovery_agent(
    root: Path, pki: Pki, broker_url: str, guest: GuestImage, vm: VMSpec
) -> ReplikantProc:
    """An agent at the recovery site that protects nothing and may run web1 as a test copy."""
    root.mkdir()
    cfg = write_agent_config(
        root / "agent.toml",
        pki=pki,
        broker_urls=[broker_url],
        vms=[],
        state_dir=root / "state",
        socket_dir=root / "sock",
        control_socket=root / "ctl" / "agent.sock",
    )
    text = cfg.read_text().replace('host = "h1"', 'host = "h1"\nsite = "recovery"', 1)
    text += f'\n[[standby]]\nname = "web1"\nuuid = "{vm.uuid}"\n'
    text += guest.toml("standby.hypervisor", op="read", off=OFF, len=LEN)
    cfg.write_text(text)
    return ReplikantProc(["agent", "run", "--config", str(cfg)], root / "agent.log")


async def test_failover_test_from_an_older_point_then_stop_test_leaves_nothing(
    tmp_path: Path, guest: GuestImage, mqtt_port: int
) -> None:
    """The test copy sees the older point's bytes while replication goes on; stop-test removes
    its process, overlay, sockets and TEST record; illegal commands refuse naming the role."""
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    bcfg = broker_config(tmp_path / "b.toml", pki, store, bport)
    bcfg.write_text(bcfg.read_text() + f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt_port}"\n')
    broker = ReplikantProc(["broker", "run", "--config", str(bcfg)], tmp_path / "broker.log")
    burl = f"https://127.0.0.1:{bport}"
    image = make_image(tmp_path / "d.img", 8 * MiB)
    web1 = VMSpec("web1", [DiskSpec("disk0", image)], labels={"tier": "web"})
    primary = agent_process(tmp_path, pki=pki, broker_urls=[burl], vms=[web1], interval=0.5)
    standby = recovery_agent(tmp_path / "dr", pki, burl, guest, web1)
    admin = admin_config(
        tmp_path / "admin.toml", pki, burl, [str(tmp_path / "dr" / "ctl" / "agent.sock")]
    )
    sock = tmp_path / "sock" / "web1-disk0.sock"
    replica = store / str(web1.uuid) / "disk0" / "replica.img"
    old, new, newer = (pattern(s, LEN) for s in ("point-one", "after-the-point", "during-test"))
    broker.start()
    primary.start()
    standby.start()
    try:
        await wait_for(lambda: export_ready(sock, "web1-disk0"), "the primary's export")
        await asyncio.to_thread(_write, sock, old)
        await wait_for(lambda: _region(replica) == old, "the first bytes at the replica")
        point = await _latest_point(admin, lambda p: True)
        await asyncio.to_thread(_write, sock, new)
        await wait_for(lambda: _region(replica) == new, "the newer bytes at the replica")
        await _latest_point(admin, lambda p: p != point)
        await wait_for((tmp_path / "dr" / "ctl" / "agent.sock").exists, "the standby agent")

        # No agent can run the copy: the broker's TEST role and exports are rolled back.
        lonely = admin_config(tmp_path / "lonely.toml", pki, burl, [])
        code, out, _ = await admin_cli(lonely, "failover", "test", "web1", "--json")
        assert code == 1
        assert "no agent in [admin] agents can run a guest of vm web1" in out
        assert [s["step"] for s in json.loads(out)["vms"][0]["steps"]] == ["broker", "rollback"]
        assert await _exports(admin) == []

        # Two operators at once: one test copy starts, the other is refused naming the role.
        runs = await asyncio.gather(
            *(
                admin_cli(admin, "failover", "test", "web1", "--point", point, "--json")
                for _ in "ab"
            )
        )
        assert sorted(code for code, _, _ in runs) == [0, 1], runs
        (out,) = [o for code, o, _ in runs if code == 0]
        (refused,) = [json.loads(o)["vms"][0]["error"] for code, o, _ in runs if code == 1]
        assert "vm web1 is" in refused
        assert "at site recovery" in refused
        doc = json.loads(out)
        steps = {s["step"]: s for s in doc["vms"][0]["steps"]}
        assert steps["broker"]["role"] == "TEST"
        assert steps["broker"]["point"] == point
        pid = steps["guest"]["pid"]
        run_dir = tmp_path / "dr" / "state" / "guests" / "web1" / "test"
        console = run_dir / "console.log"
        await wait_for(lambda: "RK-HASH" in _text(console), "the test copy's hash")
        text = _text(console)
        assert console_value(text, "RK-HASH") == sha256(old), "the copy must see the older point"
        nets = [ln for ln in text.splitlines() if ln.startswith("RK-NET")]
        assert nets == ["RK-NET link lo"], f"the test copy must have no NIC and no route: {nets}"

        # Replication keeps running while the copy runs; the copy's writes stay in its overlay.
        await asyncio.to_thread(_write, sock, newer)
        await wait_for(lambda: _region(replica) == newer, "replication during the test")
        await wait_for(
            lambda: _role(mqtt_port, pki.ca, web1.uuid, "recovery") == "TEST",
            "the retained TEST role",
        )
        overlays = [Path(e["overlay"]) for e in await _exports(admin)]
        assert overlays
        assert all(o.exists() for o in overlays)

        again = await admin_cli(admin, "failover", "test", "web1")
        assert again[0] == 1
        assert "vm web1 is TEST at site recovery" in again[1]
        assert "replikant failover stop-test web1" in again[1]

        code, out, err = await admin_cli(admin, "failover", "stop-test", "--selector", "tier=web")
        assert code == 0, out + err
        assert "web1: broker" in out
        assert "TEST -> REPLICA" in out

        leftovers = {
            "qemu process": process_alive(pid, "qmp.sock"),
            "run directory (QMP socket, pid file, console)": run_dir.exists(),
            "overlay files": [str(o) for o in overlays if o.exists()],
            "exports": await _exports(admin),
            "retained TEST records": [
                t for t, r in (await retained(mqtt_port, pki.ca)).items() if r["role"] == "TEST"
            ],
        }
        assert not any(leftovers.values()), leftovers
        await wait_for(
            lambda: _role(mqtt_port, pki.ca, web1.uuid, "recovery") == "REPLICA", "REPLICA again"
        )

        code, out, _ = await admin_cli(admin, "failover", "stop-test", "web1")
        assert code == 1
        assert "vm web1 is REPLICA at site recovery" in out
        assert "no test copy here" in out
        assert "replikant failover test web1" in out
    finally:
        for proc in (standby, primary, broker):
            proc.stop()


def _write(sock: Path, data: bytes) -> None:
    nbd = MiniNBD(sock, "web1-disk0")
    try:
        nbd.write(OFF, data, fua=True)
    finally:
        nbd.close()


def _region(path: Path) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(OFF)
        return f.read(LEN)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _role(port: int, ca: Path, vm_uuid: object, site: str) -> str | None:
    records = asyncio.run(retained(port, ca, f"replikant/v1/vms/{vm_uuid}/sites/{site}", 1.0))
    for record in records.values():
        role: str = record["role"]
        return role
    return None


async def _exports(admin: Path) -> list[dict[str, Any]]:
    async with AdminClient(load_config(admin, AdminConfig)) as client:
        (doc,) = await client.broker_json("/v1/exports")
    exports: list[dict[str, Any]] = doc["exports"]
    return exports


async def _latest_point(admin: Path, accept: Any) -> str:
    """The newest retained point once ``accept(point_id)`` holds for it."""
    config = load_config(admin, AdminConfig)
    for _ in range(300):
        async with AdminClient(config) as client:
            answers = await client.broker_json("/v1/vms/web1/points")
        points = answers[0]["points"]
        if points and accept(points[0]["id"]):
            return str(points[0]["id"])
        await asyncio.sleep(0.1)
    raise AssertionError("no acceptable recovery point in time")
