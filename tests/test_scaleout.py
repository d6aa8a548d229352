"""Scale-out inside a cluster (decision 032): two brokers with ``placement = "spread"`` on one
store and a real Mosquitto over mutual TLS, an agent's batches over HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing

from broker.scaleout import RECHECK_SWEEPS, ScaleOut
from broker.service import BrokerService
from common.config import BrokerConfig, TLSFiles
from common.mqtt import MQTTAddress
from common.tls import Identity, client_context
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    VMSpec,
    agent_process,
    export_ready,
    make_image,
)
from tests.support_broker import AgentClient, Cut, FakeSource
from tests.support_mqtt import frozen, mosquitto_tls
from tests.test_placement_sim import until

FAST = {"lease": 2.0, "renew": 0.5, "stagger": 0.3, "settle": 0.5, "hold_down": 2.0}


def _config(tls: TLSFiles, node: str, store: Path, port: int) -> BrokerConfig:
    return BrokerConfig.model_validate(
        {
            "broker": {
                "node": node,
                "cluster": "c1",
                "listen": "127.0.0.1:0",
                "store": str(store),
                "min_free_bytes": 0,
                "placement": "spread",
            },
            "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
            "mqtt": {"url": f"mqtts://127.0.0.1:{port}"},
            "election": FAST,
            "nbd_socket_dir": str(store.parent / f"nbd-{node}"),
        }
    )


@contextlib.asynccontextmanager
async def _members(tmp_path: Path) -> AsyncIterator[tuple[Pki, dict[str, BrokerService]]]:
    pki = make_pki(tmp_path / "pki")
    ca = pki.store
    server = ca.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    certs = {"b1": pki.broker.tls, "b2": ca.issue_broker("c1", "b2", ips=["127.0.0.1"]).tls}
    store = tmp_path / "store"
    with mosquitto_tls(tmp_path, server, [Identity.broker("c1", n) for n in certs]) as port:
        services = {n: BrokerService(_config(t, n, store, port)) for n, t in certs.items()}
        try:
            for svc in services.values():
                await svc.start()
            yield pki, services
        finally:
            for svc in services.values():
                with contextlib.suppress(Exception):
                    await svc.stop()


def _applied_seq(store: Path, src: FakeSource) -> int:
    """The seq of the replica's newest committed apply (its applied.log's last line: meta.json's
    counters are saved with other changes, not per batch)."""
    try:
        lines = (store / str(src.vm_uuid) / src.disk_id / "applied.log").read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    return int(json.loads(lines[-1])["seq"]) if lines else 0


async def _two_vms_spread(
    svc: dict[str, BrokerService], pki: Pki
) -> tuple[str, str, list[FakeSource], dict[str, ScaleOut]]:
    """Wait for an owner, enable two VMs through it and wait until each member serves one;
    ``(owner, the other member, the VMs' sources, each member's scale-out)``."""
    await until("an owner", lambda: any(s.serving for s in svc.values()))
    owner = next(n for n, s in svc.items() if s.serving)
    other = next(n for n in svc if n != owner)
    sources = [FakeSource(seed=i) for i in (1, 2)]
    async with AgentClient(svc[owner].url, pki.agent.tls) as agent:
        for i, src in enumerate(sources):
            await agent.enable(src, name=f"web{i}")
    scale = {n: s.scaleout for n, s in svc.items() if s.scaleout is not None}
    assert len(scale) == len(svc)
    await until(
        "one VM served by each member",
        lambda: all(len(s.placement.serving) == 1 for s in scale.values()),
    )
    return owner, other, sources, scale


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_each_vm_is_served_by_its_member_and_moves_when_it_leaves(tmp_path: Path) -> None:
    """The owner places two VMs on two members; a VM's batch is refused by the other member with
    503 not_owner naming the right one, accepted and applied byte-identically by its member (which
    also takes the operator's rebind, and after a placement change it missed, serves the VM again
    once a sweep re-reads it); when that member leaves, its VM is re-placed on the survivor, which
    applies the next batch on top (one audit line per batch, across both)."""
    async with _members(tmp_path) as (pki, svc):
        owner, other, sources, scale = await _two_vms_spread(svc, pki)
        other_scale = scale[other]
        (vm,) = other_scale.placement.serving
        src = next(s for s in sources if str(s.vm_uuid) == vm)
        src.mutate()
        cut = src.cut()
        async with AgentClient(svc[owner].url, pki.agent.tls) as agent:
            status, body = await agent.post(src, cut.body)
        assert status == 503, body
        assert body["error"] == "not_owner"
        assert body["details"]["owner"] == other
        assert body["details"]["owner_url"] == svc[other].advertised_url
        async with AgentClient(svc[other].url, pki.agent.tls) as agent:
            assert await agent.ship(src, cut) == 1
        store = tmp_path / "store"
        await until("applied by its member", lambda: _applied_seq(store, src) == 1)
        image = store / vm / src.disk_id / "replica.img"
        assert image.read_bytes() == cut.image
        # An operator's act on the VM (a rebind) is the serving member's too.
        admin = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls))
        )
        async with (
            admin,
            admin.post(f"{svc[other].url}/v1/vms/{vm}/source", json={"host": "h1"}) as resp,
        ):
            assert resp.status == 200, await resp.text()

        # A move away and back that the member never heard of (written straight to the store):
        # its token is stale, so the fence refuses its next batch until a sweep re-reads the
        # record and serves the VM afresh.
        owner_scale = scale[owner]
        for node in (owner, other):
            owner_scale.book.assign([(vm, node)], epoch=svc[owner].epoch, owner=owner)
        src.mutate()
        cut = src.cut()
        async with AgentClient(svc[other].url, pki.agent.tls) as agent:
            status, body = await agent.post(src, cut.body)
            assert (status, body["error"], body["details"]["placed_on"]) == (
                503,
                "not_owner",
                other,
            )
            for _ in range(RECHECK_SWEEPS):
                await other_scale.sweep()
            assert other_scale.book.held(vm) == (svc[owner].epoch, 3)
            assert await agent.ship(src, cut) == 2
        await until("applied after the re-read", lambda: _applied_seq(store, src) == 2)

        await svc[other].stop()  # a clean leave: its membership goes offline at once
        await until("re-placed on the survivor", lambda: vm in owner_scale.placement.serving)
        src.mutate()
        cut = src.cut()
        async with AgentClient(svc[owner].url, pki.agent.tls) as agent:
            assert await agent.ship(src, cut) == 3
        await until("applied by the survivor", lambda: _applied_seq(store, src) == 3)
        assert image.read_bytes() == cut.image
        audit = (store / vm / src.disk_id / "applied.log").read_text().splitlines()
        assert [json.loads(line)["seq"] for line in audit] == [1, 2, 3]


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_a_member_elected_owner_keeps_serving_the_vms_placed_on_it(tmp_path: Path) -> None:
    """When the owner leaves, the member elected in its place keeps applying the VM placed on it
    (its load of the store as the new owner must not drop what it adopted as a member), and takes
    over the old owner's VM on top of what that one applied."""
    async with _members(tmp_path) as (pki, svc):
        owner, other, sources, scale = await _two_vms_spread(svc, pki)
        survivor = scale[other]
        (kept,) = survivor.placement.serving
        by_vm = {str(s.vm_uuid): s for s in sources}
        (moved,) = set(by_vm) - {kept}
        store = tmp_path / "store"
        for vm, node in ((kept, other), (moved, owner)):
            by_vm[vm].mutate()
            async with AgentClient(svc[node].url, pki.agent.tls) as agent:
                assert await agent.ship(by_vm[vm], by_vm[vm].cut()) == 1
            await until(f"{vm} applied", lambda v=vm: _applied_seq(store, by_vm[v]) == 1)

        await svc[owner].stop()
        await until("the member elected", lambda: svc[other].serving, limit=60)
        await until("the old owner's VM re-placed", lambda: moved in survivor.placement.serving)
        async with AgentClient(svc[other].url, pki.agent.tls) as agent:
            for vm in (kept, moved):
                src = by_vm[vm]
                src.mutate()
                cut = src.cut()
                assert await agent.ship(src, cut) == 2
                await until(f"{vm} applied again", lambda s=src: _applied_seq(store, s) == 2)
                assert (store / vm / src.disk_id / "replica.img").read_bytes() == cut.image


async def _ship_and_export(
    tmp_path: Path, member: BrokerService, pki: Pki, src: FakeSource
) -> tuple[Cut, dict[str, Any]]:
    """Ship a first batch of ``src`` to ``member``, wait for its apply and export the VM's
    latest point there; ``(the cut, the export's description)``."""
    src.mutate()
    cut = src.cut()
    async with AgentClient(member.url, pki.agent.tls) as agent:
        assert await agent.ship(src, cut) == 1
    await until("applied", lambda: _applied_seq(tmp_path / "store", src) == 1)
    admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls)))
    url = f"{member.url}/v1/vms/{src.vm_uuid}/exports"
    async with admin, admin.post(url, json={"point": "latest"}) as resp:
        assert resp.status == 201, await resp.text()
        (export,) = (await resp.json())["exports"]
    return cut, export


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_a_vm_moved_away_ends_its_exports_with_the_reason(tmp_path: Path) -> None:
    """When the store places a VM elsewhere, the member that served it ends the VM's
    point-in-time exports, which read through its applier, with an event naming the member to
    export it from (left alone, every read of them failed with EIO)."""
    async with _members(tmp_path) as (pki, svc):
        owner, other, sources, scale = await _two_vms_spread(svc, pki)
        (vm,) = scale[owner].placement.serving
        src = next(s for s in sources if str(s.vm_uuid) == vm)
        _cut, export = await _ship_and_export(tmp_path, svc[owner], pki, src)
        with structlog.testing.capture_logs() as logs:
            scale[owner].book.assign([(vm, other)], epoch=svc[owner].epoch, owner=owner)
            for _ in range(RECHECK_SWEEPS):
                await scale[owner].sweep()
        assert (vm, src.disk_id) not in svc[owner].engines
        assert svc[owner].list_exports() == []
        (event,) = [e for e in logs if e["event"] == "pit_export_ended"]
        assert (event["export"], event["placed_on"]) == (export["name"], other)
        assert f"on broker {other}" in event["fix"]


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_an_owner_that_steps_down_keeps_the_vm_placed_on_it(tmp_path: Path) -> None:
    """An owner cut off from MQTT (Mosquitto frozen) steps down, but the VM placed on it is
    still its to serve (decision 032): its applier and its point-in-time export stay, and the
    export still reads the point byte for byte."""
    async with _members(tmp_path) as (pki, svc):
        owner, _other, sources, scale = await _two_vms_spread(svc, pki)
        (vm,) = scale[owner].placement.serving
        src = next(s for s in sources if str(s.vm_uuid) == vm)
        cut, export = await _ship_and_export(tmp_path, svc[owner], pki, src)
        engine = svc[owner].engines[(vm, src.disk_id)]
        with frozen(MQTTAddress.parse(svc[owner].config.mqtt.url).port):
            await until("the owner stepped down", lambda: not svc[owner].serving)
            assert svc[owner].engines.get((vm, src.disk_id)) is engine
            assert [e["name"] for e in svc[owner].list_exports()] == [export["name"]]
            nbd = await asyncio.to_thread(MiniNBD, Path(export["socket"]), export["name"])
            try:
                assert await asyncio.to_thread(nbd.read, 0, len(cut.image)) == cut.image
            finally:
                nbd.close()


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_balance_leaves_an_exported_vm_on_its_member(tmp_path: Path) -> None:
    """A member that returns to the cluster would take a VM from the owner by balance, but
    every VM there has a point-in-time export (a test copy's disks): the VMs stay, the exports
    read the point byte for byte rounds later, and the owner says once why the cluster stays
    unbalanced. Once the exports are deleted, balance moves a VM to the returned member."""
    async with _members(tmp_path) as (pki, svc):
        await until("an owner", lambda: any(s.serving for s in svc.values()))
        owner = next(n for n, s in svc.items() if s.serving)
        other = next(n for n in svc if n != owner)
        config = svc[other].config
        await svc[other].stop()
        placement = svc[owner].scaleout.placement if svc[owner].scaleout else None
        assert placement is not None
        await until("the other member gone", lambda: not placement.members[other].online)
        sources = [FakeSource(seed=i) for i in (1, 2, 3)]
        async with AgentClient(svc[owner].url, pki.agent.tls) as agent:
            for i, src in enumerate(sources):
                await agent.enable(src, name=f"web{i}")
        await until("every VM placed on the owner", lambda: len(placement.serving) == 3)
        exported = [await _ship_and_export(tmp_path, svc[owner], pki, src) for src in sources]

        with structlog.testing.capture_logs() as logs:
            svc[other] = BrokerService(config)
            await svc[other].start()
            await until("the member back", lambda: placement.members[other].online)
            rounds = placement.rounds
            await until("three rounds with it", lambda: placement.rounds >= rounds + 3)
            assert len(placement.serving) == 3
            assert {e["name"] for e in svc[owner].list_exports()} == {
                export["name"] for _cut, export in exported
            }
            cut, export = exported[0]
            nbd = await asyncio.to_thread(MiniNBD, Path(export["socket"]), export["name"])
            try:
                assert await asyncio.to_thread(nbd.read, 0, len(cut.image)) == cut.image
            finally:
                nbd.close()
            held = [e for e in logs if e["event"] == "placement_balance_held"]
            assert len(held) == 1
            assert set(held[0]["vms"]) == {str(s.vm_uuid) for s in sources}

            admin = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls))
            )
            async with admin:
                for _cut, export in exported:
                    url = f"{svc[owner].url}/v1/exports/{export['name']}"
                    async with admin.delete(url) as resp:
                        assert resp.status == 200, await resp.text()
            returned = svc[other].scaleout
            assert returned is not None
            await until("a VM moved to the member", lambda: len(returned.placement.serving) == 1)
            assert len(placement.serving) == 2
        assert "placement_balance_released" in [e["event"] for e in logs]


def _images_match(store: Path, vms: list[VMSpec]) -> bool:
    for vm in vms:
        replica = store / str(vm.uuid) / "d0" / "replica.img"
        if not replica.exists() or replica.read_bytes() != vm.disks[0].image.read_bytes():
            return False
    return True


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_a_real_agent_talks_to_the_member_each_vm_is_placed_on(tmp_path: Path) -> None:
    """A real agent that knows only the owner's URL protects two VMs the owner places on
    different members: each VM's writes reach its own member (which applies them), the replicas
    match byte for byte, the agent settles on one member per VM instead of bouncing, and no
    member raises an alert on the way."""
    async with _members(tmp_path) as (pki, svc):
        alerts: list[tuple[str, dict[str, object]]] = []
        for service in svc.values():
            service.add_alert_hook(lambda event, fields: alerts.append((event, fields)))
        await until("an owner", lambda: any(s.serving for s in svc.values()))
        owner = next(n for n, s in svc.items() if s.serving)
        vms = [
            VMSpec(
                name,
                [DiskSpec("d0", make_image(tmp_path / f"{name}.img", 2 * MiB))],
                uuid=uuid.UUID(u),
            )
            for name, u in (
                ("va", "00000000-0000-4000-8000-000000000001"),  # placed first: on b1
                ("vb", "ffffffff-ffff-4fff-bfff-ffffffffffff"),  # then on b2
            )
        ]
        (tmp_path / "agent").mkdir()
        agent = agent_process(
            tmp_path / "agent", pki=pki, broker_urls=[svc[owner].url], vms=vms, interval=0.5
        )
        agent.start()
        try:
            scale = {n: s.scaleout for n, s in svc.items()}

            def spread() -> bool:
                return all(
                    s is not None and str(vm.uuid) in s.placement.serving
                    for s, vm in zip((scale["b1"], scale["b2"]), vms, strict=True)
                )

            await until("each VM served by its member", spread)
            store = tmp_path / "store"
            followed = len(agent.events("broker_followed"))
            for round_ in range(6):
                for vm in vms:
                    sock = tmp_path / "agent" / "sock" / f"{vm.name}-d0.sock"
                    await until("export", lambda s=sock, v=vm: export_ready(s, f"{v.name}-d0"))
                    nbd = await asyncio.to_thread(MiniNBD, sock, f"{vm.name}-d0")
                    try:
                        data = f"{vm.name} round {round_} ".encode() * 100
                        await asyncio.to_thread(nbd.write, round_ * 65536, data, fua=True)
                    finally:
                        nbd.close()
                await asyncio.sleep(0.6)
            await until("replicas equal to their images", lambda: _images_match(store, vms))
            for node, vm in (("b1", vms[0]), ("b2", vms[1])):
                mine = {k[0] for k in svc[node].engines}
                assert str(vm.uuid) in mine, (node, mine)
                assert len(mine) == 1, (node, mine)
            assert len(agent.events("broker_followed")) - followed <= 2
            assert [a for a in alerts if a[0] == "alert_raised"] == []  # no member was refused
            # Off the loop: the agent's last cycle may await one of these in-process brokers.
            assert await asyncio.to_thread(agent.stop) == 0
        finally:
            agent.kill9()
