"""One adapter over aiomqtt: connect, keep reconnecting, publish retained state.

aiomqtt leaves reconnection to the application; doing it once here keeps every publisher from
growing its own loop. State that must survive a reconnect (retained records) is re-published on
every connect, because Mosquitto may have been restarted without persistence.

The MQTT brokers we run (Mosquitto with deploy/mosquitto.conf, the lab's embedded one) accept only
mutual TLS with our CA's certificates. aiomqtt reports a refused handshake as a bare
"Operation timed out", so after a failed connect over TLS the link opens one TLS connection
itself to learn why and logs it as ``tls_handshake_rejected`` with the fix.

A daemon's link (:meth:`MQTTLink.for_daemon`) signs every message with the daemon's key and
checks every message it receives (:mod:`common.signedrecord`), so subscribers only ever see
genuine, current records whatever the MQTT server lets through (docs/protocol/mqtt.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import aiomqtt
from pydantic import BaseModel, ValidationError

from common.config import TLSFiles
from common.errors import ConfigError
from common.logs import get_logger
from common.signedrecord import WILL_SEQ, ForgedRecord, Signer, StaleRecord, Verifier
from common.tls import Rejection, client_context, describe_tls_error
from common.tls.identities import Identity

log = get_logger("replikant.mqtt")

#: How long a publish or a subscribe waits for the MQTT broker's acknowledgement.
ACK_TIMEOUT = 5.0


class Unacknowledged(aiomqtt.MqttError):
    """The MQTT broker left a publish or a subscribe unacknowledged for :data:`ACK_TIMEOUT`."""


async def _acked(call: Awaitable[Any]) -> None:
    """Await an aiomqtt publish or subscribe made with ``timeout=math.inf`` within our own bound:
    aiomqtt's bound goes through ``asyncio.wait_for``, which on Python 3.11 can lose a cancel
    that arrives with the acknowledgement (see common/tasks.py)."""
    try:
        async with asyncio.timeout(ACK_TIMEOUT):
            await call
    except TimeoutError:
        raise Unacknowledged(
            f"the MQTT broker did not acknowledge within {ACK_TIMEOUT:.0f} s"
        ) from None


M = TypeVar("M", bound=BaseModel)


Handler = Callable[[str, M | None, Identity | None], None]
"""``handler(topic, record, signer)``: ``signer`` is who signed it (``None`` on a link without a
verifier, and for a cleared record, which MQTT carries as an empty payload nobody signs)."""


@dataclass(frozen=True)
class Subscription(Generic[M]):
    """Messages on ``topic_filter`` decoded as ``model`` and handed to the handler; an empty
    retained payload (a cleared record) arrives as ``None``."""

    topic_filter: str
    model: type[M]
    handler: Handler[M]

    def deliver(self, topic: str, payload: bytes, signer: Identity | None = None) -> bool:
        """Validate and hand over one message; an invalid one is logged and dropped (a peer from
        another release, or a forger, must never crash a daemon). Returns whether delivered."""
        if not payload:
            self.handler(topic, None, None)
            return True
        try:
            record = self.model.model_validate_json(payload)
        except ValidationError as exc:
            log.warning(
                "mqtt_message_dropped",
                topic=topic,
                model=self.model.__name__,
                error=exc.errors(include_url=False, include_input=False)[:3],
                fix="check that every daemon on this MQTT broker runs the same Replikant release",
            )
            return False
        self.handler(topic, record, signer)
        return True


@dataclass(frozen=True)
class MQTTAddress:
    """Where the MQTT broker listens, parsed from `mqtt://host:port` or `mqtts://host:port`."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> MQTTAddress:
        """Parse an MQTT URL, refusing anything we would not know how to reach."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(
                f"MQTT URL {url!r} is not of the form mqtt://HOST:PORT or mqtts://HOST:PORT",
                fix="set mqtt.url in the config, e.g. mqtt://127.0.0.1:1883",
            )
        default = 8883 if parts.scheme == "mqtts" else 1883
        return cls(parts.hostname, parts.port or default, parts.scheme == "mqtts")


async def tls_rejection(address: MQTTAddress, tls: ssl.SSLContext | None) -> Rejection | None:
    """Why the MQTT broker at ``address`` refuses a TLS connection with ``tls``, or ``None`` if
    TLS is not why (no TLS, nothing listening, or the broker waits for our CONNECT)."""
    if tls is None:
        return None
    peer = f"{address.host}:{address.port}"
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(address.host, address.port, ssl=tls)
    except (OSError, TimeoutError) as exc:
        if isinstance(exc, ConnectionRefusedError):
            return None
        return describe_tls_error(exc, side="client", peer=peer)
    try:
        # TLS 1.3: a server refuses our certificate after our side of the handshake is done, with
        # an alert that the first read raises. An MQTT broker that accepted us waits for our
        # CONNECT packet, so a read that times out means TLS is fine.
        async with asyncio.timeout(1):
            data = await reader.read(1)
        if not data:
            return describe_tls_error(EOFError(), side="client", peer=peer)
    except TimeoutError:
        return None
    except OSError as exc:
        return describe_tls_error(exc, side="client", peer=peer)
    finally:
        writer.close()
    return None


class MQTTLink:
    """A long-lived MQTT connection that publishes retained records and survives outages.

    ``retained`` is re-published on every (re)connect; ``will`` is what the broker publishes for
    us if we vanish (membership going offline). With a ``signer`` every message goes out as a
    signed envelope (:mod:`common.signedrecord`); with a ``verifier`` every message received is
    checked and a forged or replayed one never reaches a handler.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        tls_context: ssl.SSLContext | None = None,
        will: tuple[str, BaseModel] | None = None,
        reconnect_max_seconds: float = 10.0,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.address = MQTTAddress.parse(url)
        if self.address.tls and tls_context is None:
            raise ConfigError(
                f"MQTT URL {url!r} asks for TLS but this process was given no certificate",
                fix="set [mqtt] tls = true so the daemon presents its [tls] certificate",
            )
        self.client_id = client_id
        self._tls = tls_context
        self._will = will
        self._retained: dict[str, bytes] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        # Set when a publish went unacknowledged: the connection is dropped at once rather than
        # when the client's keepalive notices (up to 1.5 keepalives; 19 s seen after a write
        # callback failed inside uvloop while Mosquitto stopped).
        self._stale = asyncio.Event()
        self._reconnect_max = reconnect_max_seconds
        self.on_connect: list[Callable[[], None]] = []
        self._subscriptions: list[Subscription[Any]] = []
        self.signer = signer
        self._verifier = verifier
        self._session = 0.0
        self._seq = 0

    @classmethod
    def for_daemon(cls, url: str, *, client_id: str, tls: TLSFiles, use_tls: bool) -> MQTTLink:
        """A daemon's link: TLS with its certificate when ``use_tls``, and always signing with
        its key and verifying against its CA, so no forged record reaches it."""
        return cls(
            url,
            client_id=client_id,
            tls_context=client_context(tls) if use_tls else None,
            signer=Signer.from_files(tls.cert, tls.key),
            verifier=Verifier.from_file(tls.ca),
        )

    def _wire(self, topic: str, payload: bytes, *, will: bool = False) -> bytes:
        if self.signer is None or not payload:
            return payload
        if will:
            return self.signer.sign(topic, payload, session=self._session, seq=WILL_SEQ)
        self._seq += 1
        return self.signer.sign(topic, payload, session=self._session, seq=self._seq)

    def set_will(self, topic: str, record: BaseModel) -> None:
        """What the MQTT broker publishes (retained) for us if we vanish; takes effect on the
        next connect."""
        self._will = (topic, record)

    def subscribe(
        self, topic_filter: str, model: type[M], handler: Callable[[str, M | None], None]
    ) -> None:
        """Receive validated ``model`` records on ``topic_filter`` from the next (re)connect on;
        retained records arrive first, so a newcomer learns the current state at once."""
        self.subscribe_signed(topic_filter, model, lambda t, r, _signer: handler(t, r))

    def subscribe_signed(self, topic_filter: str, model: type[M], handler: Handler[M]) -> None:
        """As :meth:`subscribe`, and the handler also learns who signed each record."""
        self._subscriptions.append(Subscription(topic_filter, model, handler))

    def _dispatch(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        subs = [s for s in self._subscriptions if aiomqtt.Topic(topic).matches(s.topic_filter)]
        if not subs:
            return
        signer: Identity | None = None
        if self._verifier is not None and payload:
            try:
                verified = self._verifier.open(topic, payload, retained=retained)
            except ForgedRecord as exc:
                log.warning(
                    "mqtt_record_forged",
                    topic=topic,
                    claimed=exc.claimed.uri if exc.claimed else None,
                    reason=exc.reason,
                    fix="find who holds that certificate (or who publishes without one) and "
                    "revoke it; Mosquitto's ACL (replikant deploy mosquitto-config) stops "
                    "certified clients from writing other daemons' topics",
                )
                return
            except StaleRecord as exc:
                log.info("mqtt_record_replayed", topic=topic, reason=str(exc))
                return
            signer, payload = verified.signer, verified.record
        for sub in subs:
            sub.deliver(topic, payload, signer)

    @property
    def connected(self) -> bool:
        """Whether the link is up right now."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the link is connected (wrap in `asyncio.timeout`)."""
        await self._connected.wait()

    async def publish_retained(self, topic: str, record: BaseModel | None) -> bool:
        """Publish (or with ``None`` clear) a retained record; remembered across reconnects.
        True once the MQTT broker acknowledged it."""
        payload = b"" if record is None else record.model_dump_json().encode()
        if record is None:
            self._retained.pop(topic, None)
        else:
            self._retained[topic] = payload
        return await self._send(topic, payload, retain=True)

    def forget_retained(self, topic: str) -> None:
        """Stop re-publishing ``topic`` on reconnect, without clearing what the MQTT broker
        holds (a record that is no longer ours to assert, but that a newer one may replace)."""
        self._retained.pop(topic, None)

    async def publish(self, topic: str, record: BaseModel) -> None:
        """Publish a non-retained message; dropped with a log event when disconnected."""
        await self._send(topic, record.model_dump_json().encode(), retain=False)

    async def _send(self, topic: str, payload: bytes, *, retain: bool) -> bool:
        client = self._client
        if client is None or not self._connected.is_set():
            log.debug("mqtt_publish_deferred", topic=topic)
            return False
        try:
            await self._publish_on(client, topic, payload, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt_publish_failed", topic=topic, error=str(exc))
            if isinstance(exc, Unacknowledged) and client is self._client:
                self._connected.clear()  # callers see the link down from now on
                self._stale.set()
            return False
        return True

    async def _publish_on(
        self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool
    ) -> None:
        """Publish signed at QoS 1 and wait for the MQTT broker's acknowledgement (bounded)."""
        await _acked(
            client.publish(
                topic, self._wire(topic, payload), qos=1, retain=retain, timeout=math.inf
            )
        )

    async def run(self) -> None:
        """Connect and stay connected until cancelled, backing off between attempts."""
        delay = 0.2
        while True:
            # Each connection is a new signing session, later than every earlier one (also
            # within one clock tick), so its will and records supersede the last session's.
            self._session = max(time.time(), self._session + 1e-6)
            self._seq = 0
            will = None
            if self._will is not None:
                topic, record = self._will
                payload = self._wire(topic, record.model_dump_json().encode(), will=True)
                will = aiomqtt.Will(topic, payload, qos=1, retain=True)
            client = aiomqtt.Client(
                self.address.host,
                self.address.port,
                identifier=self.client_id,
                will=will,
                tls_context=self._tls,
                keepalive=10,
                timeout=5,
            )
            connected = False
            try:
                async with client:
                    connected = True
                    self._client = client
                    delay = 0.2
                    log.info("mqtt_connected", host=self.address.host, port=self.address.port)
                    for topic, payload in list(self._retained.items()):
                        await self._publish_on(client, topic, payload, retain=True)
                    for callback in self.on_connect:
                        callback()
                    for sub in self._subscriptions:
                        await _acked(client.subscribe(sub.topic_filter, qos=1, timeout=math.inf))
                    # Connected only now: a request sent from here on finds our reply topic
                    # subscribed (the MQTT broker handles one client's packets in order).
                    self._stale.clear()
                    self._connected.set()
                    await self._receive(client)
            except aiomqtt.MqttError as exc:
                why: dict[str, str] = {}
                if not connected:
                    rejection = await tls_rejection(self.address, self._tls)
                    if rejection is not None:
                        rejection.log()
                        why = {"reason": rejection.reason, "fix": rejection.fix}
                    elif self._tls is None:
                        why = {
                            "fix": "if the MQTT broker requires TLS (deploy/mosquitto.conf, the "
                            "lab), use an mqtts:// URL"
                        }
                log.warning(
                    "mqtt_disconnected",
                    host=self.address.host,
                    port=self.address.port,
                    error=str(exc),
                    retry_in=delay,
                    **why,
                )
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max)

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Dispatch messages until the connection fails (reading is also how aiomqtt notices
        a dead one) or a publish goes unacknowledged."""

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray):
                    self._dispatch(message.topic.value, bytes(payload), retained=message.retain)

        reading = asyncio.ensure_future(read())
        stale = asyncio.ensure_future(self._stale.wait())
        try:
            await asyncio.wait({reading, stale}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reading, stale):
                task.cancel()
            await asyncio.gather(reading, stale, return_exceptions=True)
        if not reading.cancelled():
            reading.result()  # the connection failed: its error, as before
            return
        raise Unacknowledged(f"a publish went unacknowledged for {ACK_TIMEOUT:.0f} s: reconnecting")

    async def close(self, *, clear: list[str] | None = None) -> None:
        """Clear the given retained topics (a clean leave) before the caller cancels ``run``."""
        for topic in clear or []:
            with contextlib.suppress(Exception):
                await self._send(topic, b"", retain=True)
