"""MQTT: a client without a certificate of our CA can neither connect nor leave a record behind.

The attempts run against a real Mosquitto configured like deploy/mosquitto.conf and against the
lab's embedded broker. After them, a client with a certificate reads the topic every attempt
tried to forge and finds nothing; a record a legitimate broker published shows the reader works.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from certs.store import CertStore
from common.mqtt import MQTTAddress, tls_rejection
from common.mqttbroker import MOSQUITTO_TLS
from common.tls import client_context
from common.tls.identities import Identity
from ops.deploy import render
from tests.fixtures_pki import Pki, make_pki
from tests.security.rows import Door
from tests.support_mqtt import embedded, mosquitto_tls, read_retained

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GHOST = "replikant/v1/vms/6f1c2a5e-8f57-4c3e-9a43-0c8f7f8f5d21/sites/ghost"
"""The record the attack in issue 8 left behind: a site that does not exist."""
REAL = "replikant/v1/clusters/c1/members/b1"


@contextlib.asynccontextmanager
async def _server(kind: str, pki: Pki, tmp: Path) -> AsyncIterator[int]:
    cert = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    if kind == "mosquitto":
        with mosquitto_tls(tmp, cert, [Identity.broker("c1", "b1")]) as port:
            yield port
        return
    async with embedded(cert) as port:
        yield port


async def _publish(port: int, tls: ssl.SSLContext | None, topic: str, who: str) -> str:
    """Try to connect and publish a retained record; say what happened, with the TLS layer's
    reason when the MQTT client only reports a timeout."""
    try:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=who, tls_context=tls, timeout=2
        ) as client:
            await client.publish(topic, b'{"role": "PRIMARY"}', qos=1, retain=True)
    except aiomqtt.MqttError as exc:
        rejection = await tls_rejection(MQTTAddress("127.0.0.1", port, tls=True), tls)
        if rejection is not None:
            return f"connect failed: {exc} (TLS: {rejection.reason}, {rejection.ssl_reason})"
        return f"connect failed: {exc} (plain MQTT to a TLS port: {await _plain_connect(port)})"
    return "connected and published (PUBACK)"


async def _plain_connect(port: int) -> str:
    """Send an MQTT 3.1.1 CONNECT in clear text; say how the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(bytes.fromhex("101000044d5154540402003c0004676f6f64"))
        async with asyncio.timeout(5):
            answer = await reader.read(4)
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}"
    finally:
        writer.close()
    return "server closed the connection, no CONNACK" if not answer else f"answer {answer.hex()}"


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
async def test_mqtt_refuses_clients_without_our_certificate(
    kind: str, pki: Pki, tmp_path: Path, door: Door
) -> None:
    """Plain MQTT, TLS without a client certificate and a certificate of another CA are all
    refused before an MQTT packet, and none of them leaves a retained record."""
    other = make_pki(tmp_path / "other")
    no_cert = ssl.create_default_context(cafile=str(pki.ca))
    no_cert.check_hostname = False
    attempts = [
        ("anonymous client, plain MQTT", None),
        ("anonymous client, TLS without a client certificate", no_cert),
        ("client with a certificate of a foreign CA",
         client_context((pki.ca, other.broker.cert_path, other.broker.key_path))),
    ]  # fmt: skip
    surface = f"MQTT ({'Mosquitto, deploy/mosquitto.conf' if kind == 'mosquitto' else 'lab'})"
    reader = client_context(pki.agent.tls)
    async with _server(kind, pki, tmp_path) as port:
        legit = await _publish(port, client_context(pki.broker.tls), REAL, "b1")
        assert legit.startswith("connected"), legit
        assert await read_retained(port, REAL, reader) is not None, "the reader cannot see records"
        for attempt, tls in attempts:
            outcome = await _publish(port, tls, GHOST, "intruder")
            left = await read_retained(port, GHOST, reader)
            door.attempt(
                surface,
                f"{attempt} publishes a retained {GHOST.rsplit('/', 2)[-2]}/ghost record",
                expected="connection refused in the TLS handshake, no record",
                observed=f"{outcome}; retained record: {left!r}",
                refused=not outcome.startswith("connected") and left is None,
            )
        if kind == "mosquitto":
            # Mosquitto also scopes certified clients (amqtt cannot: docs/security.md).
            outcome = await _publish(port, client_context(pki.admin.tls), GHOST, "alice")
            left = await read_retained(port, GHOST, reader)
            door.attempt(
                surface,
                "admin certificate publishes a retained vms/.../ghost record",
                expected="dropped by deploy/mosquitto.acl, no record",
                observed=f"{outcome}; retained record: {left!r}",
                refused=left is None,
            )


def test_shipped_mosquitto_files_match_what_the_tests_run(tmp_path: Path) -> None:
    """deploy/mosquitto.conf and deploy/mosquitto.acl are exactly what `replikant deploy
    mosquitto-config` renders for their example PKI, carry every line that makes Mosquitto refuse
    clients without our certificate, and are written 0640."""
    store = CertStore.init(tmp_path / "pki")
    store.issue_broker("dr", "b1")
    store.issue_broker("dr", "mqtt", dns=["mqtt.example"])
    store.issue_agent("hv1")
    store.issue_admin("alice")
    written = render(tmp_path / "pki", tmp_path / "out")
    for path in written:
        assert path.read_text() == (DEPLOY / path.name).read_text(), f"re-render {path.name}"
        assert path.stat().st_mode & 0o777 == 0o640
    conf = {line.strip() for line in (DEPLOY / "mosquitto.conf").read_text().splitlines()}
    missing = [line for line in MOSQUITTO_TLS if line not in conf]
    assert not missing, f"deploy/mosquitto.conf lacks {missing}"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh PKI: CA, broker c1/b1, agent h1, admin alice."""
    return make_pki(tmp_path / "pki")
