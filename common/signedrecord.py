"""Signed MQTT records: how a daemon tells a forged retained record from a real one (sans-I/O).

The lab's embedded MQTT broker has no topic ACL, and even Mosquitto's ACL lets every broker of a
cluster write that cluster's topics. So every message a daemon publishes is an envelope signed
with its own TLS private key over ``(topic, payload, session, seq)`` and carrying its certificate
(docs/protocol/mqtt.md, "Signed envelopes"). A receiver accepts it only when

1. the certificate was issued by our CA (one of the certificates in ``[tls] ca``) and is valid now,
2. the signature over exactly this topic and payload verifies with that certificate's key,
3. the certificate's identity may publish on that topic (:func:`common.topics.may_publish`),
4. it is newer than the last record this signer put on this topic (``(session, seq)``), so a
   replayed genuine record never moves a receiver backwards (the last one itself passes again
   only as the retained record a (re)subscription gets).

Anything else raises :class:`ForgedRecord` (1-3) or :class:`StaleRecord` (4). ``session`` is when
the signer's MQTT connection began and ``seq`` counts its messages in that connection; its last
will is signed at connect with :data:`WILL_SEQ`, after everything else of that session.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from common.tls.identities import Identity, TLSIdentityError, identity_from_cert
from common.topics import may_publish

DOMAIN: Final = "replikant-mqtt-v1"
"""Signed first, so a signature made for MQTT can never pass for one made anywhere else."""
WILL_SEQ: Final = 2**53
"""The last will's ``seq``: it supersedes every record of its session, none of a later one."""

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class Envelope(BaseModel):
    """What goes on the wire: the record as JSON text, who signed it, and the signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1]
    record: str
    session: float = Field(ge=0)
    seq: int = Field(ge=0, le=WILL_SEQ)
    cert: str
    sig: str


def _signed_bytes(topic: str, record: str, session: float, seq: int) -> bytes:
    # A JSON array is unambiguous: no field can bleed into the next. float(): the envelope
    # carries the session as a JSON float, so 10 and 10.0 must sign alike.
    data = [DOMAIN, topic, record, float(session), int(seq)]
    return json.dumps(data, separators=(",", ":")).encode()


def _hash_for(key: object) -> hashes.HashAlgorithm:
    size = getattr(getattr(key, "curve", None), "key_size", 256)
    return hashes.SHA384() if size > 256 else hashes.SHA256()


class Signer:
    """Signs records with one daemon's certificate and private key."""

    def __init__(self, cert: x509.Certificate, key: SigningKey) -> None:
        self.identity = identity_from_cert(cert)
        self._cert_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._key = key

    @classmethod
    def from_files(cls, cert: Path, key: Path) -> Signer:
        """Load the daemon's ``[tls] cert`` and ``[tls] key``."""
        try:
            certificate = x509.load_pem_x509_certificate(cert.read_bytes())
            private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the signing certificate {cert} / key {key}: {exc}",
                fix="point [tls] cert and key at files written by `replikant certs issue`",
            ) from None
        if not isinstance(private, SigningKey):
            raise ConfigError(
                f"{key} holds a {type(private).__name__}, which cannot sign MQTT records",
                fix="issue an EC or RSA key with `replikant certs issue`",
            )
        return cls(certificate, private)

    def sign(self, topic: str, record: bytes, *, session: float, seq: int) -> bytes:
        """The envelope for ``record`` (JSON) on ``topic``, ready to publish."""
        text = record.decode()
        data = _signed_bytes(topic, text, session, seq)
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            sig = self._key.sign(data, ec.ECDSA(_hash_for(self._key)))
        else:
            sig = self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        envelope = Envelope(
            v=1,
            record=text,
            session=session,
            seq=seq,
            cert=self._cert_b64,
            sig=base64.b64encode(sig).decode(),
        )
        return envelope.model_dump_json().encode()


class ForgedRecord(Exception):
    """A message that is not a genuine record for its topic; ``claimed`` is the identity its
    certificate names (``None`` when it has none we can read)."""

    def __init__(self, reason: str, claimed: Identity | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.claimed = claimed


class StaleRecord(Exception):
    """A genuine record that is not newer than one already accepted from the same signer."""


@dataclass(frozen=True)
class Verified:
    """A record that passed every check: its signer, its JSON text and its order."""

    signer: Identity
    record: bytes
    order: tuple[float, int]


class Verifier:
    """Checks envelopes against our CA and the topic rules, and drops replays."""

    def __init__(
        self, cas: list[x509.Certificate], *, clock: Callable[[], float] = time.time
    ) -> None:
        if not cas:
            raise ConfigError("no CA certificate to verify MQTT records with", fix="set [tls] ca")
        self._cas = cas
        self._clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    @classmethod
    def from_file(cls, ca: Path) -> Verifier:
        """Trust the CA certificate(s) in ``[tls] ca`` (more than one while the CA rotates)."""
        try:
            return cls(x509.load_pem_x509_certificates(ca.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the CA certificates in {ca}: {exc}",
                fix="point [tls] ca at the CA's ca.crt (`replikant certs init`)",
            ) from None

    def open(self, topic: str, payload: bytes, *, retained: bool = False) -> Verified:
        """Return the verified record in ``payload``; raise :class:`ForgedRecord` or
        :class:`StaleRecord`.

        ``retained``: the MQTT server hands it over as the topic's retained record (on a
        (re)subscribe), so the very record accepted last is state, not a replay; a record merely
        equal to the last one that is pushed to a live subscription is a replay."""
        try:
            env = Envelope.model_validate_json(payload)
        except ValidationError:
            raise ForgedRecord("not a signed envelope") from None
        try:
            der = base64.b64decode(env.cert, validate=True)
            sig = base64.b64decode(env.sig, validate=True)
        except binascii.Error:
            raise ForgedRecord("certificate or signature is not base64") from None
        cert, identity = self._certificate(der)
        try:
            _verify(cert.public_key(), sig, _signed_bytes(topic, env.record, env.session, env.seq))
        except InvalidSignature:
            raise ForgedRecord("signature does not match", identity) from None
        if not may_publish(identity, topic):
            raise ForgedRecord(f"{identity} may not publish on this topic", identity)
        order = (env.session, env.seq)
        key = (topic, identity.uri)
        last = self._last.get(key)
        if last is not None and (order < last or (order == last and not retained)):
            raise StaleRecord(f"{identity} already published {last} here, this is {order}")
        self._last[key] = order
        return Verified(identity, env.record.encode(), order)

    def _certificate(self, der: bytes) -> tuple[x509.Certificate, Identity]:
        try:
            cert = _load_der(der)
        except ValueError:
            raise ForgedRecord("certificate is not DER") from None
        try:
            identity: Identity | None = identity_from_cert(cert)
        except TLSIdentityError:
            identity = None
        if not any(_issued_by(cert, ca) for ca in self._cas):
            raise ForgedRecord("certificate is not issued by our CA", identity)
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ForgedRecord("certificate is not valid now", identity)
        if identity is None:
            raise ForgedRecord("certificate carries no replikant:// identity")
        return cert, identity


@functools.lru_cache(maxsize=256)
def _load_der(der: bytes) -> x509.Certificate:
    # Every message carries its signer's certificate: parse each one once.
    return x509.load_der_x509_certificate(der)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _verify(key: object, sig: bytes, data: bytes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(sig, data, ec.ECDSA(_hash_for(key)))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature
