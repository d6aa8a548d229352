"""The MQTT link publishes retained state to real brokers and re-publishes after an outage."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import pytest

from common import topics
from common.errors import ConfigError
from common.mqtt import MQTTAddress, MQTTLink
from common.mqttbroker import serve_embedded
from tests.support_mqtt import free_port, mosquitto


async def _read_retained(port: int, topic: str) -> bytes:
    async with asyncio.timeout(10):
        while True:
            async with aiomqtt.Client("127.0.0.1", port, identifier="reader") as client:
                await client.subscribe(topic, qos=1)
                try:
                    async with asyncio.timeout(1.0):
                        async for message in client.messages:
                            assert isinstance(message.payload, bytes)
                            return message.payload
                except TimeoutError:
                    continue


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


async def test_embedded_broker_carries_retained_records() -> None:
    """The lab's embedded broker delivers retained records to late subscribers."""
    port = free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(serve_embedded("127.0.0.1", port, ready))
    link = MQTTLink(f"mqtt://127.0.0.1:{port}", client_id="b1")
    task = None
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        task = asyncio.create_task(link.run())
        async with asyncio.timeout(10):
            await link.wait_connected()
        owner = topics.OwnerRecord(node="b1", epoch=7)
        await link.publish_retained(topics.owner("dr"), owner)
        payload = await _read_retained(port, topics.owner("dr"))
        assert topics.OwnerRecord.model_validate_json(payload) == owner
    finally:
        for t in (task, server):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
