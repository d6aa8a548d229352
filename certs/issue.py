"""Building end-entity certificates for brokers, agents and admins (pure, no files).

What a role's certificate must contain lives here, in one place, so that issuing
(:func:`build_leaf`) and checking (:mod:`certs.check`) cannot disagree:

========  ==========================  ================================================
role      extended key usage          SANs
========  ==========================  ================================================
broker    serverAuth + clientAuth     DNS ``N``, ``C``, ``N.C`` + ``--dns``/``--ip``
agent     serverAuth + clientAuth     DNS ``H`` + ``--dns``/``--ip``
admin     clientAuth                  none but the identity
========  ==========================  ================================================

Every certificate also carries its identity as a URI SAN (``replikant://...``).  Brokers carry the
cluster name ``C`` because clients reach a cluster through its access point (a DNS name that
resolves to whichever nodes are up): whichever node answers, the name the client dialled must be in
that node's certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.ca import ORGANIZATION
from certs.errors import CertsError
from certs.keys import PrivateKey, PublicKey, signature_hash
from common.tls import Identity, Role

DEFAULT_LEAF_DAYS: Final = 365

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ROLE_USAGES: Final[dict[Role, frozenset[x509.ObjectIdentifier]]] = {
    "broker": frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
    # Agents serve NBD over TLS as well as calling brokers.
    "agent": frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
    "admin": frozenset({ExtendedKeyUsageOID.CLIENT_AUTH}),
}

USAGE_NAMES: Final[dict[x509.ObjectIdentifier, str]] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}

_DNS_LABEL: Final = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def usage_names(oids: Iterable[x509.ObjectIdentifier]) -> list[str]:
    """``serverAuth``-style names for extended key usages, sorted."""
    return sorted(USAGE_NAMES.get(oid, oid.dotted_string) for oid in oids)


def check_dns_name(name: str) -> str:
    """Return ``name`` lower-cased if it is a valid DNS name for a SAN, else raise."""
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertsError(
            f"{name!r} is not a valid DNS name for a certificate",
            fix="use letters, digits and '-' in dot-separated labels (no wildcards, no spaces); "
            "pass IP addresses with --ip",
        )
    return name.rstrip(".").lower()


def parse_ip(text: str) -> IPAddress:
    """Parse an IP address for an IP SAN, or raise an operator-readable error."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CertsError(
            f"{text!r} is not an IP address", fix="pass host names with --dns, addresses with --ip"
        ) from None


def default_dns_names(identity: Identity) -> list[str]:
    """The DNS SANs every certificate of ``identity`` gets without being asked."""
    if identity.role == "broker" and identity.cluster is not None:
        return [identity.name, identity.cluster, f"{identity.name}.{identity.cluster}"]
    if identity.role == "agent":
        return [identity.name]
    return []


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """Everything that defines a certificate besides its key and dates."""

    identity: Identity
    dns: tuple[str, ...] = ()
    ips: tuple[IPAddress, ...] = ()

    @classmethod
    def for_identity(
        cls, identity: Identity, *, dns: Iterable[str] = (), ips: Iterable[str | IPAddress] = ()
    ) -> LeafSpec:
        """The spec for ``identity`` with its default SANs plus ``dns`` and ``ips``, deduplicated.

        Admin certificates are client-only: they get no host names or addresses.
        """
        dns, ips = list(dns), list(ips)
        if identity.role == "admin" and (dns or ips):
            raise CertsError(
                "admin certificates identify a person, not a host: they take no --dns or --ip",
                fix="drop --dns/--ip for `issue admin`",
            )
        names = [check_dns_name(n) for n in [*default_dns_names(identity), *dns]]
        addresses = [ip if not isinstance(ip, str) else parse_ip(ip) for ip in ips]
        return cls(
            identity=identity,
            dns=tuple(dict.fromkeys(names)),
            ips=tuple(dict.fromkeys(addresses)),
        )

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, identity: Identity) -> LeafSpec:
        """The spec an existing certificate was issued with (for rotation)."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return cls.for_identity(identity)
        if identity.role == "admin":
            return cls.for_identity(identity)
        ips = [
            ip
            for ip in san.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ]
        return cls.for_identity(identity, dns=san.get_values_for_type(x509.DNSName), ips=ips)

    def subject_alt_names(self) -> list[x509.GeneralName]:
        """The SAN entries: identity URI first, then DNS names, then addresses."""
        return [
            x509.UniformResourceIdentifier(self.identity.uri),
            *(x509.DNSName(n) for n in self.dns),
            *(x509.IPAddress(ip) for ip in self.ips),
        ]


def subject_for(identity: Identity) -> x509.Name:
    """The subject name: informational only, authorisation reads the identity URI."""
    common = f"{identity.name}.{identity.cluster}" if identity.cluster else identity.name
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def build_leaf(
    spec: LeafSpec,
    public_key: PublicKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """Sign an end-entity certificate for ``spec`` and ``public_key`` with the CA."""
    if not_after <= not_before:
        raise CertsError(
            f"certificate for {spec.identity} would end ({not_after:%Y-%m-%d}) before it "
            f"starts ({not_before:%Y-%m-%d})",
            fix="pass a positive --days, and check that the CA itself has not expired",
        )
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject_for(spec.identity))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key transport is gone in TLS 1.3, but older peers (qemu's gnutls) still
                # look for it on RSA server certificates.
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                sorted(ROLE_USAGES[spec.identity.role], key=lambda o: o.dotted_string)
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(spec.subject_alt_names()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, signature_hash(ca_key))
    )
