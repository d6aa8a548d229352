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
import contextlib
import json
import ssl
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from common import topics
from common.mqtt import MQTTLink
from common.signedrecord import ForgedRecord
from common.tls import client_context
from common.tls.identities import Identity
from tests.fixtures_pki import Pki, make_pki
from tests.security.rows import Door
from tests.support_agent import (
    DiskSpec,
    ReplikantProc,
    VMSpec,
    agent_process,
    broker_config,
    free_port,
    make_image,
    wait_for,
)
from tests.support_mqtt import embedded, mosquitto_tls, read_retained, record_of, running

OWNER = topics.owner("c1")
REAL = topics.OwnerRecord(node="b1", epoch=2, url="https://127.0.0.1:8443", seq=2)


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
    attempts = {
        "agent h1 certificate publishes host h2's presence record": topics.host("h2"),
        "agent h1 certificate publishes a request to host h2": topics.requests("h2"),
        "agent h1 certificate publishes cluster c1's owner record": OWNER,
        "agent h1 certificate publishes a membership record": topics.member("c1", "b9"),
    }
    with mosquitto_tls(tmp_path, server, clients) as port:
        outcomes: dict[str, str] = {}

        async def act() -> None:
            for attempt, topic in attempts.items():
                outcomes[attempt] = await _publish_raw(port, agent, topic, forged)
            # The control, last: the agent's own topic arrives, so what did not was refused.
            outcomes["control"] = await _publish_raw(port, agent, topics.host("h1"), b"{}")

        seen = await _arrivals(port, watcher, act)
        assert topics.host("h1") in seen, (seen, outcomes)
        for attempt, topic in attempts.items():
            left = await read_retained(port, topic, watcher, window=0.3)
            door.attempt(
                surface,
                attempt,
                expected="dropped by the ACL: nothing arrives, nothing retained",
                observed=f"{outcomes[attempt]}; a broker-certificate subscriber saw "
                f"{[t for t in seen if t == topic]} on it; retained: {left!r}",
                refused=topic not in seen and left is None,
            )
        outcome = await _publish_raw(port, None, OWNER, forged)
        left = await read_retained(port, OWNER, watcher, window=0.3)
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
            old = topics.OwnerRecord(node="b1", epoch=1, url="https://127.0.0.1:8443", seq=1)
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
            evil = topics.OwnerRecord(
                node="evil", epoch=99, url="https://evil.example:8443", seq=1
            ).model_dump_json()
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


def _member_toml(site: Path, pki: Pki, node: str, store: Path, port: int, mqtt: str) -> Path:
    """broker.toml for member ``node`` of c1 on the shared ``store``, on the control plane."""
    cert = pki.store.cert_path(Identity.broker("c1", node))
    if not cert.exists():
        pki.store.issue_broker("c1", node, dns=["localhost"], ips=["127.0.0.1"])
    path = broker_config(site / f"{node}.toml", pki, store, port, mqtt_url=mqtt)
    text = path.read_text().replace('node = "b1"', f'node = "{node}"')
    text = text.replace(str(pki.broker.cert_path), str(cert))
    path.write_text(text.replace(str(pki.broker.key_path), str(cert.with_suffix(".key"))))
    return path


async def test_broker_and_agent_processes_keep_the_real_owner(
    pki: Pki, tmp_path: Path, door: Door
) -> None:
    """Two real broker processes and a real agent on the lab's embedded broker: forged, tampered,
    unsigned and replayed owner records published with a valid agent certificate are dropped by
    every process, nobody steps down or follows the forger, and the real owner stays."""
    surface = "MQTT owner record (lab's embedded broker, real daemons)"
    server = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    admin = client_context(pki.admin.tls)
    store = tmp_path / "store"
    async with embedded(server) as port:
        url = f"mqtts://127.0.0.1:{port}"
        ports = {node: free_port() for node in ("b1", "b2")}
        brokers = {
            node: ReplikantProc(
                ["broker", "run", "--config",
                 str(_member_toml(tmp_path, pki, node, store, bport, url))],
                tmp_path / f"{node}.log",
            )
            for node, bport in ports.items()
        }  # fmt: skip
        (tmp_path / "agent").mkdir()
        image = make_image(tmp_path / "d.img", 1 << 20)
        agent = agent_process(
            tmp_path / "agent",
            pki=pki,
            broker_urls=[f"https://127.0.0.1:{p}" for p in ports.values()],
            vms=[VMSpec("web1", [DiskSpec("disk0", image)])],
            mqtt_url=url,
        )
        procs = [*brokers.values(), agent]
        try:
            for proc in procs:
                proc.start()
            await wait_for(lambda: bool(agent.events("owner_learned")), "the agent to learn")
            first = await read_retained(port, OWNER, admin)
            assert first is not None
            await asyncio.sleep(1.5)  # the owner renews its record: `first` is now old
            genuine = await read_retained(port, OWNER, admin)
            assert genuine is not None
            assert genuine != first
            real = topics.OwnerRecord.model_validate_json(json.loads(genuine)["record"])
            env = json.loads(genuine)
            other = next(n for n in ports if n != real.node)
            evil = topics.OwnerRecord(
                node=other, epoch=real.epoch + 50, url=f"https://127.0.0.1:{ports[other]}",
                seq=1,
            ).model_dump_json()  # fmt: skip
            forger = MQTTLink.for_daemon(url, client_id="x", tls=pki.agent.tls, use_tls=True)
            assert forger.signer is not None
            attempts = {
                f"owner record naming {other} at epoch {real.epoch + 50}, signed with a valid "
                "agent certificate": forger.signer.sign(OWNER, evil.encode(), session=9e9, seq=1),
                "the owner's genuine envelope with its record replaced": json.dumps(
                    {**env, "record": evil}
                ).encode(),
                "the owner's genuine envelope with a tampered signature": json.dumps(
                    {**env, "sig": env["sig"][:-8] + "AAAAAAA="}
                ).encode(),
                "an unsigned owner record": evil.encode(),
                "a replay of the owner's older genuine record": first,
            }
            for attempt, payload in attempts.items():
                before = {p.log.name: _verdicts(p) for p in procs}
                outcome = await _publish_raw(port, client_context(pki.agent.tls), OWNER, payload)
                await wait_for(
                    lambda b=before: all(_verdicts(p) > b[p.log.name] for p in procs),
                    "every process's verdict",
                    within=15,
                )
                # The retained topic holds the forgery until the owner's next renewal.
                owner = await _real_owner(port, admin, pki.ca)
                changes = [
                    (p.log.name, e["event"], e.get("url"))
                    for p in procs
                    for e in p.events("owner_stepped_down") + p.events("broker_followed")
                    if e.get("url") != real.url
                ]
                elected = [p.log.name for p in brokers.values() if p.events("owner_elected")]
                door.attempt(
                    surface,
                    attempt,
                    expected="b1, b2 and the agent each drop it (mqtt_record_forged/replayed); "
                    "the owner stays",
                    observed=f"{outcome}; verdicts per process "
                    f"{ {p.log.name: _verdicts(p) for p in procs} }; owner now "
                    f"{owner.get('node')}@{owner.get('epoch')}; elected {elected}; "
                    f"step-downs/follows {changes}",
                    refused=(owner.get("node"), owner.get("epoch")) == (real.node, real.epoch)
                    and elected == [f"{real.node}.log"]
                    and not changes,
                )
            learned = {e["url"] for e in agent.events("owner_learned")}
            assert learned == {real.url}, learned
        finally:
            for proc in procs:
                proc.kill9()


async def _real_owner(port: int, tls: ssl.SSLContext, ca: Path) -> dict[str, Any]:
    """The retained owner record once it verifies again (empty: not within 10 s)."""
    for _ in range(20):
        payload = await read_retained(port, OWNER, tls, window=0.5)
        with contextlib.suppress(ForgedRecord):
            if payload:
                return dict(record_of(ca, OWNER, payload))
        await asyncio.sleep(0.2)
    return {}


def _verdicts(proc: ReplikantProc) -> int:
    """How many records ``proc`` dropped as forged or replayed so far."""
    return len(proc.events("mqtt_record_forged")) + len(proc.events("mqtt_record_replayed"))
