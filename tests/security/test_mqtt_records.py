"""MQTT records: a certified client cannot write another daemon's topics, and a forged record
that reaches a daemon anyway is ignored.

Against a real Mosquitto with the ACL `replikant deploy mosquitto-config` renders, an agent's
certificate cannot publish on another host's topic or a cluster's owner topic (a subscriber with
a broker certificate sees nothing arrive), and a client without a certificate cannot connect.
The lab's embedded broker has no ACL: there a forged owner record signed with a valid agent
certificate, a genuine record with a tampered payload or signature, an unsigned record and a
replayed old record all reach the daemons' links, and every one is dropped by the signature
check (`mqtt_record_forged` / `mqtt_record_replayed`) while the real owner stays.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from common import topics
from common.mqtt import MQTTLink
from common.tls import client_context
from common.tls.identities import Identity
from tests.fixtures_pki import Pki, make_pki
from tests.security.rows import Door
from tests.support_agent import wait_for
from tests.support_mqtt import embedded, mosquitto_tls, read_retained, running

OWNER = topics.owner("c1")
REAL = topics.OwnerRecord(node="b1", epoch=2)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh PKI: CA, broker c1/b1, agent h1, admin alice."""
    return make_pki(tmp_path / "pki")


async def _publish_raw(port: int, tls: ssl.SSLContext | None, topic: str, payload: bytes) -> str:
    """Connect as a bare MQTT client and publish one retained message; say what happened."""
    try:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier="intruder", tls_context=tls, timeout=3
        ) as client:
            await client.publish(topic, payload, qos=1, retain=True)
    except aiomqtt.MqttError as exc:
        return f"connection refused ({exc})"
    return "published (PUBACK)"


async def _arrivals(port: int, tls: ssl.SSLContext, act: Any, window: float = 1.0) -> list[str]:
    """Topics a subscriber to everything sees arrive (not retained) while ``act()`` runs."""
    seen: list[str] = []
    async with aiomqtt.Client("127.0.0.1", port, identifier="watcher", tls_context=tls) as client:
        await client.subscribe(f"{topics.ROOT}/#", qos=1)
        await act()

        async def collect() -> None:
            async for message in client.messages:
                if not message.retain:  # what is already retained is not news
                    seen.append(str(message.topic))

        try:
            async with asyncio.timeout(window):
                await collect()
        except TimeoutError:
            pass
    return seen


@pytest.mark.mosquitto
async def test_mosquitto_acl_keeps_agents_off_other_daemons_topics(
    pki: Pki, tmp_path: Path, door: Door
) -> None:
    """An agent certificate may publish its own host's record and nothing of another host or of
    a cluster; a client without a certificate cannot even connect."""
    server = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    clients = [Identity.broker("c1", "b1"), Identity.agent("h1"), Identity.admin("alice")]
    agent = client_context(pki.agent.tls)
    watcher = client_context(pki.broker.tls)
    forged = json.dumps({"node": "h1", "epoch": 99}).encode()
    surface = "MQTT (Mosquitto, replikant deploy mosquitto-config ACL)"
    with mosquitto_tls(tmp_path, server, clients) as port:
        # The control: the agent's own topic arrives, so an empty list below means refused.
        own = await _arrivals(
            port, watcher, lambda: _publish_raw(port, agent, topics.host("h1"), b"{}")
        )
        assert own == [topics.host("h1")], own
        for attempt, topic in (
            ("agent h1 certificate publishes host h2's presence record", topics.host("h2")),
            ("agent h1 certificate publishes a request to host h2", topics.requests("h2")),
            ("agent h1 certificate publishes cluster c1's owner record", OWNER),
            ("agent h1 certificate publishes a membership record", topics.member("c1", "b9")),
        ):
            outcome: list[str] = []

            async def act(topic: str = topic, outcome: list[str] = outcome) -> None:
                outcome.append(await _publish_raw(port, agent, topic, forged))

            seen = await _arrivals(port, watcher, act)
            left = await read_retained(port, topic, watcher)
            door.attempt(
                surface,
                attempt,
                expected="dropped by the ACL: nothing arrives, nothing retained",
                observed=f"{outcome[0]}; a broker-certificate subscriber saw {seen}; "
                f"retained: {left!r}",
                refused=not seen and left is None,
            )
        outcome = await _publish_raw(port, None, OWNER, forged)
        left = await read_retained(port, OWNER, watcher)
        door.attempt(
            surface,
            "client without a certificate publishes a retained owner record for c1",
            expected="connection refused, no record",
            observed=f"{outcome}; retained: {left!r}",
            refused=outcome.startswith("connection refused") and left is None,
        )


async def test_daemons_ignore_forged_records_in_the_embedded_broker(pki: Pki, door: Door) -> None:
    """Without an ACL a valid agent certificate can put anything on the owner topic, but a
    daemon's link drops every forged, tampered, unsigned or replayed record and keeps the real
    owner."""
    surface = "MQTT records (lab's embedded broker, no ACL)"
    server = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    b2 = pki.store.issue_broker("c1", "b2", dns=["localhost"], ips=["127.0.0.1"]).tls
    agent_link_files = pki.agent.tls
    async with embedded(server) as port:
        url = f"mqtts://127.0.0.1:{port}"
        owner_link = MQTTLink.for_daemon(url, client_id="b1", tls=pki.broker.tls, use_tls=True)
        seen: dict[str, list[topics.OwnerRecord | None]] = {"b2": [], "h1": []}
        receivers = {
            "b2": MQTTLink.for_daemon(url, client_id="b2", tls=b2, use_tls=True),
            "h1": MQTTLink.for_daemon(url, client_id="h1", tls=agent_link_files, use_tls=True),
        }
        for name, link in receivers.items():
            link.subscribe(OWNER, topics.OwnerRecord, lambda _t, r, n=name: seen[n].append(r))
        async with running(owner_link), running(receivers["b2"]), running(receivers["h1"]):
            old = topics.OwnerRecord(node="b1", epoch=1)
            await owner_link.publish_retained(OWNER, old)
            await wait_for(lambda: all(s == [old] for s in seen.values()), "the first owner record")
            # A replay needs the old genuine envelope: read it as any client could.
            old_wire = await read_retained(port, OWNER, client_context(pki.admin.tls))
            assert old_wire is not None
            await owner_link.publish_retained(OWNER, REAL)
            await wait_for(lambda: all(s[-1] == REAL for s in seen.values()), "the real owner")
            genuine = await read_retained(port, OWNER, client_context(pki.admin.tls))
            assert genuine is not None
            env = json.loads(genuine)
            evil = topics.OwnerRecord(node="evil", epoch=99).model_dump_json()
            agent_signed = MQTTLink.for_daemon(url, client_id="x", tls=pki.agent.tls, use_tls=True)
            assert agent_signed.signer is not None
            attempts = {
                "forged owner record signed with a valid agent certificate": (
                    agent_signed.signer.sign(OWNER, evil.encode(), session=9e9, seq=1)
                ),
                "genuine envelope with the record replaced (tampered payload)": json.dumps(
                    {**env, "record": evil, "seq": env["seq"] + 1}
                ).encode(),
                "genuine envelope with a tampered signature": json.dumps(
                    {**env, "sig": env["sig"][:-8] + "AAAAAAA=", "seq": env["seq"] + 1}
                ).encode(),
                "unsigned owner record": evil.encode(),
                "replay of the broker's own older genuine record (epoch 1)": old_wire,
            }
            for attempt, payload in attempts.items():
                before = {n: len(s) for n, s in seen.items()}
                with structlog.testing.capture_logs() as logs:
                    outcome = await _publish_raw(
                        port, client_context(pki.agent.tls), OWNER, payload
                    )
                    await wait_for(
                        lambda: (
                            sum(e["event"].startswith("mqtt_record_") for e in logs)
                            >= len(receivers)
                        ),
                        "every daemon's verdict",
                    )
                events = [
                    (e["event"], e.get("claimed"), e.get("reason"))
                    for e in logs
                    if e["event"].startswith("mqtt_record_")
                ]
                got = {n: s[before[n] :] for n, s in seen.items()}
                door.attempt(
                    surface,
                    attempt,
                    expected="every daemon drops it (mqtt_record_forged/replayed), owner stays b1",
                    observed=f"{outcome}; delivered to handlers: {got}; events: {events}",
                    refused=not any(got.values())
                    and all(s[-1] == REAL for s in seen.values())
                    and len(events) == len(receivers),
                )
