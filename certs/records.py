"""What the CA directory reports: a certificate just issued, one listed, one rotated.

Plain records over the certificate files that :class:`certs.store.CertStore` writes and reads,
with their JSON forms (``replikant certs list --json``, ``rotate --json``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from certs.check import days_left, sans_of
from certs.keys import describe_key
from common.config import TLSFiles
from common.tls.identities import Identity, identity_from_cert


def serial_of(cert: x509.Certificate) -> str:
    """A certificate's serial number in hex, as the index and ``certs list`` show it."""
    return format(cert.serial_number, "x")


def iso_time(moment: dt.datetime) -> str:
    """A UTC time as ISO 8601 with a ``Z``, as the index and ``--json`` outputs write it."""
    return moment.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A certificate and key just written by :class:`CertStore`."""

    identity: Identity
    cert_path: Path
    key_path: Path
    ca_path: Path
    certificate: x509.Certificate

    @property
    def tls(self) -> TLSFiles:
        """The files as a config ``[tls]`` section, for ``server_context``/``client_context``."""
        return TLSFiles(ca=self.ca_path, cert=self.cert_path, key=self.key_path)

    @property
    def serial(self) -> str:
        """The serial number in hex."""
        return serial_of(self.certificate)

    @property
    def not_after(self) -> dt.datetime:
        """When the certificate expires (UTC)."""
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What ``replikant certs list`` shows for one certificate file."""

    identity: Identity
    cert_path: Path
    key_path: Path
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    key: str

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, path: Path) -> CertInfo:
        """Describe ``cert``, read from ``path``; raises :class:`TLSIdentityError` if it has
        no identity."""
        dns, ips, _ = sans_of(cert)
        return cls(
            identity=identity_from_cert(cert),
            cert_path=path,
            key_path=path.with_suffix(".key"),
            serial=serial_of(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            dns=tuple(dns),
            ips=tuple(ips),
            key=describe_key(cert.public_key()),
        )

    @property
    def sans(self) -> list[str]:
        """All SANs in ``TYPE:value`` form, identity first."""
        return [
            f"URI:{self.identity.uri}",
            *(f"DNS:{d}" for d in self.dns),
            *(f"IP:{i}" for i in self.ips),
        ]

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        """A JSON-ready dict (``replikant certs list --json``)."""
        return {
            "role": self.identity.role,
            "name": self.identity.name,
            "cluster": self.identity.cluster,
            "identity": self.identity.uri,
            "file": str(self.cert_path),
            "key_file": str(self.key_path),
            "sans": self.sans,
            "dns": list(self.dns),
            "ips": list(self.ips),
            "not_before": iso_time(self.not_before),
            "not_after": iso_time(self.not_after),
            "days_left": days_left(self.not_after, now),
            "serial": self.serial,
            "key": self.key,
        }


@dataclass(frozen=True, slots=True)
class Rotation:
    """One certificate renewed by :meth:`CertStore.rotate`."""

    identity: Identity
    cert_path: Path
    old_serial: str
    new_serial: str
    old_not_after: dt.datetime
    new_not_after: dt.datetime
    backup_dir: Path
    key: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "identity": self.identity.uri,
            "file": str(self.cert_path),
            "old_serial": self.old_serial,
            "new_serial": self.new_serial,
            "old_not_after": iso_time(self.old_not_after),
            "new_not_after": iso_time(self.new_not_after),
            "backup_dir": str(self.backup_dir),
            "key": self.key,
        }
