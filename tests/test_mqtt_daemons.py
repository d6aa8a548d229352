"""Real daemons on a real Mosquitto (mutual TLS, the rendered ACL): requests to agents, and a
Mosquitto restart under load that loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common import topics
from common.mqtt import MQTTLink
from common.mqttrpc import RPCClient, RPCError
from common.tls import client_context
from common.tls.identities import Identity
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    ReplikantProc,
    VMSpec,
    agent_process,
    broker_config,
    export_ready,
    free_port,
    make_image,
    same_file,
    wait_for,
)
from tests.support_mqtt import mosquitto_tls, read_retained, record_of, running

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

SIZE = 4 * MiB
H1 = Identity.agent("h1")


@dataclass
class Site:
    """A PKI, a Mosquitto port and the paths of one agent's VM."""

    pki: Pki
    tmp: Path
    port: int
    image: Path
    vm: VMSpec

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def mosquitto(self) -> Iterator[int]:
        """(Re)start Mosquitto on the site's port with the ACL for b1, h1 and alice."""
        server = self.pki.store.cert_path(Identity.broker("c1", "mqtt"))
        tls = self.pki.broker.tls.model_copy(
            update={"cert": server, "key": server.with_suffix(".key")}
        )
        clients = [Identity.broker("c1", "b1"), H1, Identity.admin("alice")]
        with mosquitto_tls(self.tmp, tls, clients, port=self.port) as port:
            yield port

    async def retained(self, topic: str) -> Any:
        """The verified record retained on ``topic`` (``None``: none within a few seconds)."""
        tls = client_context(self.pki.admin.tls)
        for _ in range(20):
            payload = await read_retained(self.port, topic, tls, window=0.5)
            if payload:
                return record_of(self.pki.ca, topic, payload)
        return None


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A PKI with an MQTT server certificate, a port, and a 4 MiB disk image for VM web1."""
    pki = make_pki(tmp_path / "pki")
    pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"])
    rng = random.Random(12)
    image = make_image(tmp_path / "d.img", SIZE, fill=lambda i: rng.randbytes(MiB))
    return Site(pki, tmp_path, free_port(), image, VMSpec("web1", [DiskSpec("disk0", image)]))


@contextlib.asynccontextmanager
async def admin_rpc(site: Site) -> AsyncIterator[RPCClient]:
    """An admin's signed MQTT link with an RPC client on it."""
    link = MQTTLink.for_daemon(site.url, client_id="alice", tls=site.pki.admin.tls, use_tls=True)
    client = RPCClient(link, Identity.admin("alice"))
    async with running(link):
        yield client


async def test_status_request_answers_and_a_down_host_times_out(site: Site) -> None:
    """A real agent with [mqtt] publishes its presence and answers a status request with its
    host, VMs, disks and roles; a request to a host that never ran, or to this one once
    stopped, times out naming the host, and a clean stop leaves the agent's presence offline."""
    agent = agent_process(
        site.tmp,
        pki=site.pki,
        broker_urls=[f"https://127.0.0.1:{free_port()}"],  # no broker: shipping is not the point
        vms=[site.vm],
        mqtt_url=site.url,
    )
    with site.mosquitto():
        agent.start()
        try:
            presence = await site.retained(topics.host("h1"))
            assert presence is not None, agent.log.read_text()[-2000:]
            assert presence["online"] is True
            assert presence["vms"][0]["name"] == "web1"
            async with admin_rpc(site) as rpc:
                status = await rpc.call(H1, "status", within=10)
                assert status["host"] == "h1"
                assert [d["disk"] for d in status["disks"]] == ["disk0"]
                assert status["vms"] == [
                    {"name": "web1", "uuid": str(site.vm.uuid), "role": "PRIMARY",
                     "generation": 1, "disks": ["disk0"]}
                ]  # fmt: skip
                with pytest.raises(RPCError, match=r"replikant://agent/h2 did not answer"):
                    await rpc.call(Identity.agent("h2"), "status", within=2)
                with pytest.raises(RPCError, match="unknown command 'reboot'"):
                    await rpc.call(H1, "reboot", within=10)
                assert agent.stop() == 0
                with pytest.raises(RPCError, match=r"replikant://agent/h1 did not answer"):
                    await rpc.call(H1, "status", within=2)
            presence = await site.retained(topics.host("h1"))
            assert presence is not None
            assert presence["online"] is False
        finally:
            agent.kill9()
    answered = agent.events("rpc_request_answered")
    assert [e["requester"] for e in answered] == ["replikant://admin/alice"]


def _writer(sock: Path, export: str, stop: threading.Event, seed: int) -> int:
    """Write 4 KiB blocks through the agent's NBD export until ``stop``; return how many."""
    rng = random.Random(seed)
    nbd = MiniNBD(sock, export, timeout=5)
    n = 0
    try:
        while not stop.is_set():
            nbd.write(rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096))
            n += 1
        nbd.flush()
    finally:
        nbd.close()
    return n


async def test_a_mosquitto_restart_under_load_loses_nothing(site: Site) -> None:
    """Mosquitto dies and comes back while a guest writes: the broker and the agent reconnect
    and re-publish their retained records, the agent knows the owner's URL from the signed
    records, and the writes made during the outage reach the replica byte-identical."""
    bport = free_port()
    store = site.tmp / "store"
    broker = ReplikantProc(
        [
            "broker", "run", "--config",
            str(broker_config(site.tmp / "b.toml", site.pki, store, bport, mqtt_url=site.url)),
        ],
        site.tmp / "broker.log",
    )  # fmt: skip
    agent = agent_process(
        site.tmp,
        pki=site.pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[site.vm],
        mqtt_url=site.url,
        interval=0.5,
    )
    sock = site.tmp / "sock" / "web1-disk0.sock"
    replica = store / str(site.vm.uuid) / "disk0" / "replica.img"
    member = topics.member("c1", "b1")
    try:
        with site.mosquitto():
            broker.start()
            agent.start()
            await wait_for(lambda: export_ready(sock, "web1-disk0"), "the agent's export")
            await wait_for(lambda: same_file(replica, site.image), "the initial copy")
            before = {t: await site.retained(t) for t in (member, topics.host("h1"))}
            assert all(before.values()), before
            stop = threading.Event()
            writer = asyncio.create_task(asyncio.to_thread(_writer, sock, "web1-disk0", stop, 1))
            await asyncio.sleep(0.5)
        # Mosquitto is gone (no persistence): the guest keeps writing through the outage.
        await asyncio.sleep(1.5)
        with site.mosquitto():
            await asyncio.sleep(0.5)
            stop.set()
            writes = await writer
            assert writes > 0
            after = {t: await site.retained(t) for t in (member, topics.host("h1"))}
            assert after[member]["online"] is True, after
            assert after[topics.host("h1")]["online"] is True, after
            await wait_for(lambda: same_file(replica, site.image), "the writes of the outage")
            # The agent learned the owner's URL from the broker's signed owner + member records.
            learned = {e["url"] for e in agent.events("owner_learned")}
            assert learned == {f"https://127.0.0.1:{bport}"}, learned
            for proc in (broker, agent):
                connects = proc.events("mqtt_connected")
                assert len(connects) >= 2, f"{proc.args[0]} did not reconnect: {connects}"
            assert agent.stop() == 0
            assert broker.stop() == 0
    finally:
        for proc in (agent, broker):
            proc.kill9()
