"""A broker re-publishes a VM's retained record when something but its lag changes: an idle VM,
whose lag alone moves with every cut, costs the control plane nothing in a steady state."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path

from broker.membership import Membership
from common import topics
from common.mqtt import MQTTLink
from common.tls import client_context
from common.topics import Health
from tests.fixtures_pki import make_pki
from tests.support_mqtt import embedded, read_retained, running


@dataclass
class _VM:
    health: Health = "ok"
    lag: float = 0.4
    point: str = "1:7"


async def test_a_record_whose_lag_alone_moved_is_not_published_again(tmp_path: Path) -> None:
    """Through the lab's embedded MQTT server over mutual TLS: the first pass publishes every
    VM's record; a pass where only lag_seconds moved publishes none; a health change and a new
    point each publish that VM's record again, carrying the lag of that moment."""
    pki = make_pki(tmp_path / "pki")
    cert = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    vms = [uuid.uuid4(), uuid.uuid4()]
    state = {vm: _VM() for vm in vms}

    def snapshot() -> list[tuple[uuid.UUID, str, topics.VMSiteRecord]]:
        return [
            (
                vm,
                "recovery",
                topics.VMSiteRecord(
                    name=f"vm{i}",
                    role="REPLICA",
                    generation=1,
                    health=s.health,
                    lag_seconds=s.lag,
                    last_point=s.point,
                ),
            )
            for i, (vm, s) in enumerate(state.items())
        ]

    async with embedded(cert) as port:
        link = MQTTLink(
            f"mqtts://127.0.0.1:{port}", client_id="b1", tls_context=client_context(pki.broker.tls)
        )
        membership = Membership(
            link, node="b1", cluster="c1", site="recovery", url="https://b1:8443",
            epoch=lambda: 1, snapshot=snapshot,
        )  # fmt: skip
        async with running(link):
            assert await membership.publish_once() == 2
            for s in state.values():
                s.lag = 0.9
            assert await membership.publish_once() == 0
            state[vms[0]].health, state[vms[0]].lag = "warning", 75.0
            state[vms[1]].point = "1:8"
            assert await membership.publish_once() == 2
            assert await membership.publish_once() == 0
            admin = client_context(pki.admin.tls)
            for vm, lag in ((vms[0], 75.0), (vms[1], 0.9)):
                topic = topics.vm_site(vm, "recovery")
                async with asyncio.timeout(10):
                    while (raw := await read_retained(port, topic, admin)) is None:
                        pass
                assert topics.VMSiteRecord.model_validate_json(raw).lag_seconds == lag
