"""An embedded MQTT broker (amqtt) for the one-command lab and tests without Mosquitto.

Production uses Mosquitto (see deploy/mosquitto.conf); the lab must run on a machine with nothing
installed, so it can carry its own broker in-process. Like the production Mosquitto it speaks only
mutual TLS 1.3 with certificates of the deployment's CA: a client without one, or with one from
another CA, never gets to send an MQTT packet, so it can neither read nor forge retained records.

amqtt's own TLS listener asks for a client certificate but does not require one
(``CERT_OPTIONAL``) and, like every asyncio ``ssl=`` server, drops failed handshakes silently;
so the listener here is our :func:`common.tls.start_tls_server`, which requires the certificate
and logs every refused client as ``tls_handshake_rejected``. amqtt has no per-identity topic
ACL (Mosquitto's ACL file scopes each role there): every certificate of our CA may publish, so
daemons never trust a retained record that the store or a signed payload does not confirm.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import ItemsView, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from amqtt.broker import Broker
from amqtt.contexts import ListenerType

from common import topics
from common.config import TLSFiles
from common.logs import get_logger
from common.tls import (
    Identity,
    TLSMaterial,
    TLSServer,
    server_context,
    start_tls_server,
)

log = get_logger("replikant.mqttbroker")

MOSQUITTO_TLS: Final = (
    "require_certificate true",
    # The whole subject ("CN=b1.dr,OU=broker,O=Replikant") is the MQTT user: it carries the role,
    # so an agent whose host is called "b1.dr" is not mistaken for broker b1 of cluster dr.
    "use_subject_as_username true",
    "tls_version tlsv1.3",
    "allow_anonymous false",
)
"""The lines that make Mosquitto refuse every client without a certificate of our CA; the lab's
Mosquitto and deploy/mosquitto.conf both carry them (tests/security checks both)."""


def mosquitto_config(
    host: str,
    port: int,
    tls: TLSFiles,
    *,
    acl_file: Path | None = None,
    user: str | None = None,
    persistence: Path | None = None,
) -> str:
    """A Mosquitto configuration for one TLS listener on ``host:port`` (an empty ``host``: every
    address), with ``acl_file`` when given; retained records are kept in ``persistence`` when
    given (production), else only in memory (lab and tests).

    ``user``: who Mosquitto runs as when started by root (by default it switches to the user
    ``mosquitto``, which cannot read a lab's private key); the lab passes the user that owns it.
    """
    lines = [
        *([f"user {user}"] if user else []),
        "per_listener_settings false",
        *(
            ["persistence true", f"persistence_location {persistence}/"]
            if persistence
            else ["persistence false"]
        ),
        f"listener {port} {host}".rstrip(),
        f"cafile {tls.ca}",
        f"certfile {tls.cert}",
        f"keyfile {tls.key}",
        *MOSQUITTO_TLS,
    ]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    return "\n".join(lines) + "\n"


LISTENER = "default"  # amqtt requires a listener of this name


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt configuration: one TCP listener (TLS is added by :class:`MutualTLSBroker`).

    Whoever completes the mutual-TLS handshake is authenticated already, so amqtt's own
    user-name check lets them in.
    """
    return {
        "listeners": {LISTENER: {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


class Subscriptions(dict[str, list[Any]]):
    """amqtt's subscription table, iterated over a snapshot of its topic filters.

    amqtt (0.12.1, the newest) awaits inside ``for topic in self._subscriptions`` when a client
    connects, to send it the retained messages; a subscription another client made meanwhile
    ended the connecting client's session with "dictionary changed size during iteration"
    (seen in CI: a broker daemon lost its session and missed an owner record). Its broadcast
    walks ``items()`` with awaits inside too (topic filtering, which our configuration leaves
    off, so that walk cannot be interleaved today): it gets a snapshot as well. amqtt's other
    walks of its tables (sessions, retained messages) have no await inside.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))

    def items(self) -> ItemsView[str, list[Any]]:  # type: ignore[override]
        return dict(self).items()


class MutualTLSBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt with its TCP listener replaced by a mutual-TLS server that logs rejections."""

    def __init__(self, config: dict[str, Any], tls: ssl.SSLContext) -> None:
        super().__init__(config)
        self._tls = tls
        self._subscriptions = Subscriptions()

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> TLSServer:
        if listener_type != ListenerType.TCP:
            raise ValueError(
                f"the embedded MQTT broker serves TLS over TCP only, not {listener_type}"
            )

        async def connected(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity
        ) -> None:
            log.debug("mqtt_client_accepted", identity=identity.uri)
            await self.stream_connected(reader, writer, listener_name)

        return await start_tls_server(connected, address, port, self._tls)


def mosquitto_user(identity: Identity) -> str:
    """The MQTT user name Mosquitto derives from ``identity``'s certificate
    (``use_subject_as_username``: the subject `replikant certs` writes, as RFC 2253 prints it)."""
    common = f"{identity.name}.{identity.cluster}" if identity.cluster else identity.name
    return f"CN={common},OU={identity.role},O=Replikant"


def mosquitto_acl(identities: Iterable[Identity]) -> str:
    """The ACL for Mosquitto: everyone authenticated reads, and each identity writes only the
    topics :data:`common.topics.PUBLISHERS` gives its role (the receivers' signature check
    applies the same table). Identities not listed read and never write."""
    lines = [
        # Mosquitto warns that this pattern names neither %u nor %c: it is meant for everyone.
        f"pattern read {topics.ROOT}/#",
    ]
    for identity in sorted(set(identities), key=lambda i: i.uri):
        lines += ["", f"# {identity.uri}", f"user {mosquitto_user(identity)}"]
        lines += [f"topic write {f}" for f in topics.publish_filters(identity)]
    return "\n".join(lines) + "\n"


async def serve_embedded(
    host: str, port: int, tls: TLSMaterial, ready: asyncio.Event | None = None
) -> None:
    """Run an embedded broker on ``host:port`` with ``tls`` (CA, certificate, key) until
    cancelled."""
    broker = MutualTLSBroker(broker_config(host, port), server_context(tls))
    await broker.start()
    log.info("mqtt_broker_started", host=host, port=port, kind="embedded", tls="mutual")
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await broker.shutdown()
        log.info("mqtt_broker_stopped", host=host, port=port)
