"""Is a certificate fit for a role? Pure checks that return one :class:`Problem` per fault.

Errors make a certificate unfit (``replikant certs check`` exits 1); warnings do not (exit 0):
a certificate that expires within the warning window still works today, and rotation is the
remedy, not an outage. Problem codes, for scripts reading ``--json``:

==================  ========  =================================================================
code                severity  meaning
==================  ========  =================================================================
unreadable          error     the certificate file is missing or not a PEM certificate
expired             error     past its not-after date
not_yet_valid       error     before its not-before date (clock skew, or issued for later)
expiring_soon       warning   expires within the warning window (default 30 days)
wrong_ca            error     not signed by this directory's CA
ca_expired          error     this directory's CA itself has expired
ca_expiring_soon    warning   the CA expires within the warning window
key_mismatch        error     the private key next to it belongs to another certificate
key_missing         warning   no key next to it to compare (error if --key named one)
key_unreadable      error     the key file is not an unencrypted PEM private key
key_permissions     warning   the key file is readable by group or others
missing_san         error     the name peers connect with (--name) is not in its SANs
wrong_key_usage     error     extended key usage / key usage / CA flag wrong for the role
wrong_role          error     its identity URI names another role
no_identity         error     no (or a malformed) replikant:// identity URI
weak_key            error     RSA below 2048 bits or an EC curve below 256 bits
weak_signature      error     signed with MD5 or SHA-1
==================  ========  =================================================================
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.issue import ROLE_USAGES, usage_names
from certs.keys import PrivateKey, weak_key_reason
from common.tls import Identity, Role, TLSIdentityError, identity_from_cert

Severity = Literal["error", "warning"]
DEFAULT_WARN_DAYS: Final = 30


@dataclass(frozen=True, slots=True)
class Problem:
    """One fault: a stable ``code``, its ``severity``, what is wrong and how to fix it."""

    code: str
    severity: Severity
    message: str
    fix: str

    def line(self) -> str:
        """The one-line form ``replikant certs check`` prints."""
        return f"{self.severity}: {self.code}: {self.message}; fix: {self.fix}"


@dataclass(slots=True)
class CheckReport:
    """The outcome of checking one certificate for one role."""

    file: str
    role: Role
    name: str | None = None
    identity: str | None = None
    not_after: dt.datetime | None = None
    days_left: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Fit for the role: no errors (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``replikant certs check --json``)."""
        return {
            "file": self.file,
            "role": self.role,
            "name": self.name,
            "ok": self.ok,
            "identity": self.identity,
            "not_after": None if self.not_after is None else self.not_after.isoformat(),
            "days_left": self.days_left,
            "problems": [asdict(p) for p in self.problems],
        }


def days_left(not_after: dt.datetime, now: dt.datetime) -> int:
    """Whole days from ``now`` until ``not_after`` (negative once expired)."""
    return (not_after - now) // dt.timedelta(days=1)


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def _when(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def check_validity(
    cert: x509.Certificate,
    *,
    now: dt.datetime,
    warn_days: int,
    label: str,
    rotate_fix: str,
    prefix: str = "",
) -> list[Problem]:
    """Expired, not yet valid or expiring within ``warn_days``; ``prefix`` ``ca_`` for the CA."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        hours = (start - now) / dt.timedelta(hours=1)
        return [
            Problem(
                f"{prefix}not_yet_valid",
                "error",
                f"{label} is not valid until {_when(start)} ({hours:.1f} hours from now)",
                "check the clocks of this host and of the host that issued it (NTP), "
                "or re-issue it",
            )
        ]
    if now > end:
        ago = (now - end) // dt.timedelta(days=1)
        return [
            Problem(
                f"{prefix}expired",
                "error",
                f"{label} expired on {_when(end)} ({_days(ago)} ago)",
                rotate_fix,
            )
        ]
    if end - now < dt.timedelta(days=warn_days):
        return [
            Problem(
                f"{prefix}expiring_soon",
                "warning",
                f"{label} expires on {_when(end)} (in {_days(days_left(end, now))}, within the "
                f"{warn_days}-day warning window)",
                rotate_fix,
            )
        ]
    return []


def check_issuer(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, label: str, ca_label: str, fix: str
) -> list[Problem]:
    """Signed by ``ca_cert``? (issuer name and signature)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return [
            Problem(
                "wrong_ca",
                "error",
                f"{label} was not signed by the CA {ca_label} (its issuer is "
                f"{cert.issuer.rfc4514_string()!r})",
                fix,
            )
        ]
    return []


def _spki(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def check_key_match(
    cert: x509.Certificate, key: PrivateKey, *, label: str, key_label: str
) -> list[Problem]:
    """Does ``key`` belong to ``cert``?"""
    if _spki(cert.public_key()) == _spki(key.public_key()):
        return []
    return [
        Problem(
            "key_mismatch",
            "error",
            f"private key {key_label} does not belong to {label}",
            "deploy the .key that was issued together with this certificate, or issue both "
            "anew with `replikant certs issue` (or `rotate`)",
        )
    ]


def _a(role: str) -> str:
    """``a broker``, ``an agent``, ``an admin``."""
    return f"{'an' if role[:1] in 'aeiou' else 'a'} {role}"


def check_identity(cert: x509.Certificate, role: Role, *, label: str) -> list[Problem]:
    """Does the identity URI exist and name ``role``?"""
    try:
        identity = identity_from_cert(cert)
    except TLSIdentityError as exc:
        return [
            Problem(
                "no_identity",
                "error",
                f"{label}: {exc.message}",
                f"issue it with `replikant certs issue {role}`, which adds the identity URI",
            )
        ]
    if identity.role != role:
        return [
            Problem(
                "wrong_role",
                "error",
                f"{label} identifies {identity} (role {identity.role}), not {_a(role)}",
                f"deploy the {role}'s own certificate here, or issue one with "
                f"`replikant certs issue {role}`",
            )
        ]
    return []


def check_usage(cert: x509.Certificate, role: Role, *, label: str) -> list[Problem]:
    """Extended key usage, key usage and the CA flag, as the role needs them."""
    fix = f"re-issue it with `replikant certs issue {role}`, which sets the usages {_a(role)} needs"
    need = ROLE_USAGES[role]
    problems: list[Problem] = []
    try:
        have = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        have = set()
    missing = need - have - {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if missing:
        problems.append(
            Problem(
                "wrong_key_usage",
                "error",
                f"{label} has extended key usage "
                f"{', '.join(usage_names(have)) or '(none)'}; the {role} role needs "
                f"{', '.join(usage_names(need))} (missing {', '.join(usage_names(missing))})",
                fix,
            )
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        problems.append(
            Problem(
                "wrong_key_usage",
                "error",
                f"{label} is a CA certificate, not a certificate for the {role} role",
                fix,
            )
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        signs = usage.digital_signature
    except x509.ExtensionNotFound:
        signs = True  # absent key usage allows every use
    if not signs:
        problems.append(
            Problem(
                "wrong_key_usage",
                "error",
                f"{label}'s key usage lacks digitalSignature, which TLS 1.3 needs",
                fix,
            )
        )
    return problems


def sans_of(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    """The certificate's DNS names, IP addresses and URIs as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], [], []
    return (
        san.get_values_for_type(x509.DNSName),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
        san.get_values_for_type(x509.UniformResourceIdentifier),
    )


def check_name(cert: x509.Certificate, role: Role, name: str, *, label: str) -> list[Problem]:
    """Can peers reach this certificate's holder as ``name``?

    For brokers and agents ``name`` is what clients connect to, so it must be a DNS or IP SAN
    (hostname verification uses nothing else). For admins it is the user name in the identity.
    """
    dns, ips, uris = sans_of(cert)
    if role == "admin":
        wanted = Identity.admin(name).uri
        if wanted in uris:
            return []
        return [
            Problem(
                "missing_san",
                "error",
                f"{label} has no SAN {wanted} (it has {', '.join(uris) or 'no URI SANs'})",
                f"issue {name}'s own certificate with `replikant certs issue admin --name {name}`",
            )
        ]
    try:
        address: str | None = str(ipaddress.ip_address(name))
    except ValueError:
        address = None
    if address is not None and address in ips:
        return []
    if address is None and name.rstrip(".").lower() in (d.lower() for d in dns):
        return []
    have = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
    flag = "--ip" if address is not None else "--dns"
    return [
        Problem(
            "missing_san",
            "error",
            f"{label} has no SAN for {name!r}, so peers connecting to {name!r} will refuse it "
            f"(it has {', '.join(have) or 'no DNS or IP SANs'})",
            f"re-issue it with `replikant certs issue {role} ... {flag} {name}`, or have peers "
            "connect with a name it has",
        )
    ]


def check_strength(cert: x509.Certificate, *, label: str) -> list[Problem]:
    """Weak keys and weak signature hashes."""
    problems: list[Problem] = []
    weak = weak_key_reason(cert.public_key())
    if weak is not None:
        problems.append(
            Problem(
                "weak_key",
                "error",
                f"{label}: {weak}",
                "issue a new certificate with a strong key: `replikant certs rotate` keeps the "
                "identity, or `replikant certs issue ... --key-type p256`",
            )
        )
    algorithm = cert.signature_hash_algorithm
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        problems.append(
            Problem(
                "weak_signature",
                "error",
                f"{label} is signed with {algorithm.name.upper()}, which is forgeable",
                "re-issue it with `replikant certs issue` (SHA-256 or stronger)",
            )
        )
    return problems


def check_certificate(
    cert: x509.Certificate,
    *,
    ca_cert: x509.Certificate,
    role: Role,
    name: str | None = None,
    key: PrivateKey | None = None,
    now: dt.datetime,
    warn_days: int = DEFAULT_WARN_DAYS,
    label: str = "the certificate",
    ca_label: str = "ca.crt",
    key_label: str = "the key",
    ca_dir: str = "<CA dir>",
) -> list[Problem]:
    """Every fault that makes ``cert`` unfit (errors) or soon unfit (warnings) for ``role``."""
    rotate = f"renew it with `replikant certs rotate --dir {ca_dir}` and restart its service"
    problems = [
        *check_validity(cert, now=now, warn_days=warn_days, label=label, rotate_fix=rotate),
        *check_validity(
            ca_cert,
            now=now,
            warn_days=warn_days,
            label=f"the CA {ca_label}",
            rotate_fix="create a new CA with `replikant certs init --force` and re-issue every "
            "certificate from it (the CA is never rotated automatically)",
            prefix="ca_",
        ),
        *check_issuer(
            cert,
            ca_cert,
            label=label,
            ca_label=ca_label,
            fix=f"re-issue it from this CA with `replikant certs issue {role} --dir {ca_dir}`, or "
            "check it against the CA that signed it (--dir)",
        ),
    ]
    if key is not None:
        problems += check_key_match(cert, key, label=label, key_label=key_label)
    problems += check_identity(cert, role, label=label)
    problems += check_usage(cert, role, label=label)
    if name is not None:
        problems += check_name(cert, role, name, label=label)
    problems += check_strength(cert, label=label)
    return problems
