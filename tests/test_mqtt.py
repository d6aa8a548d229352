"""The MQTT link publishes retained state to real brokers and re-publishes after an outage."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest
import structlog

from common import topics
from common.config import TLSFiles
from common.errors import ConfigError
from common.mqtt import MQTTAddress, MQTTLink
from common.mqttbroker import MutualTLSBroker, broker_config, serve_embedded
from common.tls import client_context
from common.tls.identities import Identity
from tests.fixtures_pki import Pki, make_pki
from tests.support_mqtt import (
    free_port,
    frozen,
    mosquitto,
    mosquitto_tls,
    read_retained,
    running,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh PKI: CA, broker c1/b1, agent h1, admin alice."""
    return make_pki(tmp_path / "pki")


async def _read_retained(port: int, topic: str, tls: ssl.SSLContext | None = None) -> bytes:
    async with asyncio.timeout(10):
        while (payload := await read_retained(port, topic, tls)) is None:
            pass
        return payload


def _record(epoch: int) -> topics.MemberRecord:
    return topics.MemberRecord(
        node="b1", cluster="dr", site="recovery", url="https://b1:8443", online=True,
        epoch=epoch, since=1.0,
    )  # fmt: skip


def test_mqtt_urls_are_parsed_or_refused() -> None:
    """mqtt:// and mqtts:// parse with default ports; anything else names the fix."""
    assert MQTTAddress.parse("mqtt://127.0.0.1") == MQTTAddress("127.0.0.1", 1883, False)
    assert MQTTAddress.parse("mqtts://h:9999") == MQTTAddress("h", 9999, True)
    with pytest.raises(ConfigError, match="mqtt://HOST:PORT"):
        MQTTAddress.parse("http://127.0.0.1:1883")


@pytest.mark.mosquitto
async def test_retained_state_survives_a_mosquitto_restart(tmp_path: Path) -> None:
    """After Mosquitto restarts without persistence, the link reconnects and re-publishes."""
    port = free_port()
    topic = topics.member("dr", "b1")
    link = MQTTLink(f"mqtt://127.0.0.1:{port}", client_id="b1", reconnect_max_seconds=0.5)
    with mosquitto(tmp_path, port):
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                await link.wait_connected()
            await link.publish_retained(topic, _record(3))
            seen = topics.MemberRecord.model_validate_json(await _read_retained(port, topic))
            assert seen.epoch == 3
        except BaseException:
            task.cancel()
            raise
    try:
        with mosquitto(tmp_path, port):
            seen = topics.MemberRecord.model_validate_json(await _read_retained(port, topic))
            assert seen == _record(3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.mosquitto
async def test_a_publish_left_unacknowledged_drops_the_connection(tmp_path: Path) -> None:
    """A Mosquitto that stops answering with its socket open (SIGSTOP) is noticed by the first
    publish it leaves unacknowledged, not keepalives later: the link is down at once, reconnects
    once the server answers again, and re-publishes what it holds retained."""
    port = free_port()
    topic = topics.member("dr", "b1")
    link = MQTTLink(f"mqtt://127.0.0.1:{port}", client_id="b1", reconnect_max_seconds=0.5)
    with mosquitto(tmp_path, port):
        async with running(link):
            with frozen(port):
                assert await link.publish_retained(topic, _record(4)) is False
                assert not link.connected
                await asyncio.sleep(1)
                assert not link.connected  # no stale "connected" while the server is silent
            async with asyncio.timeout(15):
                await link.wait_connected()
            seen = topics.MemberRecord.model_validate_json(await _read_retained(port, topic))
            assert seen.epoch == 4


def _mqtt_server_cert(pki: Pki) -> TLSFiles:
    return pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls


async def test_embedded_broker_carries_retained_records(pki: Pki) -> None:
    """The lab's embedded broker, over mutual TLS, delivers retained records to late
    subscribers."""
    port = free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(serve_embedded("127.0.0.1", port, _mqtt_server_cert(pki), ready))
    link = MQTTLink(
        f"mqtts://127.0.0.1:{port}", client_id="b1", tls_context=client_context(pki.broker.tls)
    )
    task = None
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        task = asyncio.create_task(link.run())
        async with asyncio.timeout(10):
            await link.wait_connected()
        owner = topics.OwnerRecord(node="b1", epoch=7, url="https://127.0.0.1:8443", seq=1)
        await link.publish_retained(topics.owner("dr"), owner)
        payload = await _read_retained(port, topics.owner("dr"), client_context(pki.admin.tls))
        assert topics.OwnerRecord.model_validate_json(payload) == owner
    finally:
        for t in (task, server):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


@pytest.mark.mosquitto
async def test_a_refused_certificate_is_logged_with_its_reason(pki: Pki, tmp_path: Path) -> None:
    """aiomqtt only times out when Mosquitto refuses our certificate; the link logs why (an
    unknown CA) and the fix instead."""
    other = make_pki(tmp_path / "other")
    foreign = client_context((pki.ca, other.broker.cert_path, other.broker.key_path))
    with mosquitto_tls(tmp_path, _mqtt_server_cert(pki), [Identity.broker("c1", "b1")]) as port:
        link = MQTTLink(
            f"mqtts://127.0.0.1:{port}",
            client_id="b1",
            tls_context=foreign,
            reconnect_max_seconds=1,
        )
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(link.run())
            try:
                for _ in range(300):
                    if any(e["event"] == "mqtt_disconnected" for e in logs):
                        break
                    await asyncio.sleep(0.1)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    rejected = next(e for e in logs if e["event"] == "tls_handshake_rejected")
    assert rejected["side"] == "client"
    assert rejected["rejected_by"] == "peer"
    assert "UNKNOWN_CA" in rejected.get("ssl_reason", ""), rejected
    disconnected = next(e for e in logs if e["event"] == "mqtt_disconnected")
    assert disconnected["reason"] == rejected["reason"]
    assert "replikant certs" in disconnected["fix"]


def test_an_mqtts_url_without_a_certificate_is_refused() -> None:
    """An mqtts:// URL with no certificate to present names the missing setting."""
    with pytest.raises(ConfigError, match=r"\[mqtt\] tls = true"):
        MQTTLink("mqtts://127.0.0.1:8883", client_id="b1")


async def test_subscriptions_get_retained_records_and_drop_invalid_ones(pki: Pki) -> None:
    """A subscriber receives the retained record at once, validated; an invalid payload on the
    same topic is logged as dropped and never reaches the handler or crashes the link."""
    port = free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(serve_embedded("127.0.0.1", port, _mqtt_server_cert(pki), ready))
    tls = client_context(pki.broker.tls)
    url = f"mqtts://127.0.0.1:{port}"
    publisher = MQTTLink(url, client_id="b1", tls_context=tls)
    subscriber = MQTTLink(url, client_id="b2", tls_context=tls)
    got: list[topics.OwnerRecord | None] = []
    arrived = asyncio.Event()

    def receive(_topic: str, record: topics.OwnerRecord | None) -> None:
        got.append(record)
        arrived.set()

    subscriber.subscribe(topics.owner("dr"), topics.OwnerRecord, receive)
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        tasks.append(asyncio.create_task(publisher.run()))
        async with asyncio.timeout(10):
            await publisher.wait_connected()
        owner = topics.OwnerRecord(node="b1", epoch=4, url="https://127.0.0.1:8443", seq=1)
        await publisher.publish_retained(topics.owner("dr"), owner)
        tasks.append(asyncio.create_task(subscriber.run()))
        async with asyncio.timeout(10):
            await arrived.wait()
        assert got == [owner]
        with structlog.testing.capture_logs() as logs:
            await publisher._send(topics.owner("dr"), b'{"node": "b9", "epoch": -1}', retain=False)
            for _ in range(200):
                if any(e["event"] == "mqtt_message_dropped" for e in logs):
                    break
                await asyncio.sleep(0.05)
            assert any(e["event"] == "mqtt_message_dropped" for e in logs)
        assert got == [owner]
        assert subscriber.connected
    finally:
        for t in (*tasks, server):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


@pytest.mark.mosquitto
async def test_a_publish_cancelled_as_its_ack_lands_ends_cancelled(tmp_path: Path) -> None:
    """A publish whose task is cancelled in the very loop step its PUBACK arrives ends
    cancelled. Through aiomqtt's own timeout (``asyncio.wait_for`` on Python 3.11) the cancel
    was lost, the task ran on, and a broker's stop awaited it forever (common/tasks.py).

    The cancel is aimed at that step from paho's PUBACK callback, wrapped here: no timing from
    outside can hit one loop step reliably. Mosquitto and the acknowledgement are real."""
    port = free_port()
    link = MQTTLink(f"mqtt://127.0.0.1:{port}", client_id="b1")
    with mosquitto(tmp_path, port):
        runner = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                await link.wait_connected()
            assert link._client is not None
            paho = link._client._client
            acked = paho.on_publish
            publisher: asyncio.Task[None] | None = None

            def on_publish(*args: object) -> None:
                acked(*args)  # sets the publish's confirmation: its result is in
                assert publisher is not None
                publisher.cancel()  # and the cancel arrives in the same step

            paho.on_publish = on_publish
            for epoch in range(1, 21):
                publisher = asyncio.create_task(
                    link.publish(topics.member("dr", "b1"), _record(epoch))
                )
                done, _ = await asyncio.wait([publisher], timeout=10)
                assert done, "the publish did not end"
                assert publisher.cancelled(), f"publish {epoch} lost its cancel and ran on"
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_embedded_subscription_table_survives_a_subscription_made_while_walked() -> None:
    """amqtt walks its subscription table with an await per topic filter when a client connects
    (to send it retained messages); a SUBSCRIBE from another client meanwhile must not end the
    walk: it ended the connecting client's session in CI, and a daemon missed a record."""
    broker = MutualTLSBroker(broker_config("127.0.0.1", 0), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    table = broker.subscriptions  # amqtt's own accessor: the table it walks
    table.update({"a/#": [], "b/#": []})
    walked = []
    for topic in table:
        walked.append(topic)
        table.setdefault(f"new/{topic}", [])  # what another client's SUBSCRIBE does meanwhile
    assert walked == ["a/#", "b/#"]
    assert sorted(table) == ["a/#", "b/#", "new/a/#", "new/b/#"]
    # A broadcast walks the filters with their subscribers (an await per subscriber).
    pairs = []
    for topic, subscribers in table.items():
        pairs.append((topic, subscribers))
        table.pop("new/b/#", None)  # a client's UNSUBSCRIBE or disconnect meanwhile
    assert [t for t, _ in pairs] == ["a/#", "b/#", "new/a/#", "new/b/#"]
    assert sorted(table) == ["a/#", "b/#", "new/a/#"]
