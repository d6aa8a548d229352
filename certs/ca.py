"""Building the CA certificate (pure: takes a key and dates, returns an x509 object)."""

from __future__ import annotations

import datetime as dt
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.keys import PrivateKey, signature_hash

DEFAULT_CA_NAME: Final = "Replikant CA"
DEFAULT_CA_DAYS: Final = 3650
ORGANIZATION: Final = "Replikant"

# Certificates start a little in the past so that a peer whose clock lags ours by a few
# minutes does not reject a certificate issued "in its future".
CLOCK_SKEW: Final = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def build_ca(
    key: PrivateKey,
    *,
    common_name: str = DEFAULT_CA_NAME,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """Self-sign a CA certificate for ``key`` that may sign end-entity certificates only."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs end-entity certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, signature_hash(key))
    )
