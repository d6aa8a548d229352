"""An embedded MQTT broker (amqtt) for the one-command lab and tests without Mosquitto.

Production uses Mosquitto (see deploy/mosquitto.conf); the lab must run on a machine with nothing
installed, so it can carry its own broker in-process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from amqtt.broker import Broker

from common.logs import get_logger

log = get_logger("replikant.mqttbroker")


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt configuration: one TCP listener, anonymous clients (loopback lab only)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve_embedded(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Run an embedded broker until cancelled."""
    broker = Broker(broker_config(host, port))
    await broker.start()
    log.info("mqtt_broker_started", host=host, port=port, kind="embedded")
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await broker.shutdown()
        log.info("mqtt_broker_stopped", host=host, port=port)
