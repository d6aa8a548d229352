"""Who a peer is: the ``replikant://`` URI SAN of its verified certificate, parsed and checked.

Every certificate the deployment's CA issues names exactly one identity:

- ``replikant://agent/<host>``
- ``replikant://broker/<cluster>/<node>``
- ``replikant://admin/<user>``

Identities come from certificates, never from IP addresses. This module needs neither aiohttp nor
an event loop, so certificate tools (``certs``) use it without loading the servers.
"""

from __future__ import annotations

import functools
import re
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final, Literal, get_args

from cryptography import x509

from common.config import NAME_PATTERN
from common.errors import ReplikantError

Role = Literal["broker", "agent", "admin"]
"""What a certificate's holder is allowed to be."""

ROLES: Final[tuple[Role, ...]] = get_args(Role)
URI_PREFIX: Final = "replikant://"
"""Every identity URI starts with this; other URI SANs are ignored."""

_NAME_RE: Final = re.compile(NAME_PATTERN)


class TLSError(ReplikantError):
    """Base of the TLS errors below; ``reason`` is the machine-readable cause."""

    def __init__(self, message: str, *, reason: str, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.reason = reason


class TLSIdentityError(TLSError):
    """A peer certificate carries no usable identity, or the identity is not allowed here.

    ``reason`` is one of ``no_peer_certificate``, ``no_identity``, ``bad_identity``,
    ``wrong_role``, ``wrong_cluster`` or ``not_listed``; ``identity`` is the peer's, when it has
    one.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        fix: str | None = None,
        identity: Identity | None = None,
    ) -> None:
        super().__init__(message, reason=reason, fix=fix)
        self.identity = identity


@dataclass(frozen=True, slots=True)
class Identity:
    """Who holds a certificate: a role, a name, and for brokers the cluster they belong to."""

    role: Role
    name: str
    cluster: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise TLSIdentityError(
                f"unknown role {self.role!r} in identity",
                reason="bad_identity",
                fix=f"use one of {', '.join(ROLES)}",
            )
        for label, value in (("name", self.name), ("cluster", self.cluster)):
            if value is not None and not _NAME_RE.match(value):
                raise TLSIdentityError(
                    f"identity {label} {value!r} is not a valid name",
                    reason="bad_identity",
                    fix="use 1-63 letters, digits, '.', '_' or '-', starting with a letter/digit",
                )
        if (self.role == "broker") != (self.cluster is not None):
            raise TLSIdentityError(
                f"a {self.role} identity {'needs' if self.role == 'broker' else 'has no'} cluster",
                reason="bad_identity",
                fix="brokers are replikant://broker/<cluster>/<node>; others have no cluster",
            )

    @classmethod
    def broker(cls, cluster: str, node: str) -> Identity:
        """The identity of broker ``node`` of ``cluster``."""
        return cls("broker", node, cluster)

    @classmethod
    def agent(cls, host: str) -> Identity:
        """The identity of the agent on ``host``."""
        return cls("agent", host)

    @classmethod
    def admin(cls, user: str) -> Identity:
        """The identity of admin ``user``."""
        return cls("admin", user)

    @property
    def uri(self) -> str:
        """The URI SAN that carries this identity in a certificate."""
        if self.cluster is not None:
            return f"{URI_PREFIX}{self.role}/{self.cluster}/{self.name}"
        return f"{URI_PREFIX}{self.role}/{self.name}"

    @property
    def label(self) -> str:
        """A short, file-name-safe label: ``host``, ``user`` or ``cluster-node``."""
        return f"{self.cluster}-{self.name}" if self.cluster is not None else self.name

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        """Parse ``replikant://agent/H``, ``replikant://broker/C/N`` or ``replikant://admin/U``."""
        if not uri.startswith(URI_PREFIX):
            raise TLSIdentityError(
                f"{uri!r} is not a Replikant identity URI",
                reason="bad_identity",
                fix=f"identity URIs start with {URI_PREFIX}",
            )
        parts = uri.removeprefix(URI_PREFIX).split("/")
        match parts:
            case ["broker", cluster, node]:
                return cls("broker", node, cluster)
            case ["agent" | "admin" as role, name]:
                return cls(role, name)
            case _:
                raise TLSIdentityError(
                    f"identity URI {uri!r} is malformed",
                    reason="bad_identity",
                    fix="expected replikant://agent/H, replikant://broker/C/N or "
                    "replikant://admin/U; re-issue the certificate with `replikant certs issue`",
                )

    def __str__(self) -> str:
        return self.uri


def identity_from_cert(cert: x509.Certificate | bytes) -> Identity:
    """Return the identity in a certificate's ``replikant://`` URI SAN (``cert`` may be DER).

    Raises :class:`TLSIdentityError` when there is none, more than one, or it is malformed.
    """
    if isinstance(cert, bytes):
        return _identity_from_der(cert)
    return _identity_from_cert(cert)


@functools.lru_cache(maxsize=1024)
def _identity_from_der(der: bytes) -> Identity:
    # Cached: aiohttp handlers ask once per request and a connection carries many requests.
    return _identity_from_cert(x509.load_der_x509_certificate(der))


def _identity_from_cert(cert: x509.Certificate) -> Identity:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    ours = [u for u in uris if u.startswith(URI_PREFIX)]
    subject = cert.subject.rfc4514_string()
    if not ours:
        raise TLSIdentityError(
            f"certificate {subject!r} carries no {URI_PREFIX} identity",
            reason="no_identity",
            fix="issue certificates with `replikant certs issue`, which adds the identity SAN",
        )
    if len(ours) > 1:
        raise TLSIdentityError(
            f"certificate {subject!r} carries {len(ours)} identities ({', '.join(ours)})",
            reason="bad_identity",
            fix="a certificate must name exactly one identity; re-issue it",
        )
    return Identity.from_uri(ours[0])


def _roles(roles: Role | Collection[Role]) -> tuple[Role, ...]:
    return (roles,) if isinstance(roles, str) else tuple(roles)


def require_role(
    identity: Identity, roles: Role | Collection[Role], *, cluster: str | None = None
) -> Identity:
    """Return ``identity`` if its role is one of ``roles`` (and, if given, it is in ``cluster``).

    Raises :class:`TLSIdentityError` with reason ``wrong_role`` or ``wrong_cluster``.
    """
    wanted = _roles(roles)
    if identity.role not in wanted:
        names = " or ".join(wanted)
        raise TLSIdentityError(
            f"peer {identity} has role {identity.role}, but only {names} peers are accepted here",
            reason="wrong_role",
            fix=f"present a certificate of role {names} here (issue one with "
            f"`replikant certs issue {wanted[0]}`) and check which certificate the peer's [tls] "
            "section points at",
            identity=identity,
        )
    if cluster is not None and identity.cluster != cluster:
        raise TLSIdentityError(
            f"peer {identity} belongs to cluster {identity.cluster!r}, not {cluster!r}",
            reason="wrong_cluster",
            fix=f"issue the peer a certificate with `replikant certs issue broker --cluster "
            f"{cluster}` or connect it to its own cluster",
            identity=identity,
        )
    return identity


def require_listed(identity: Identity, allowed: Collection[str], *, fix: str) -> Identity:
    """Return ``identity`` if its URI is one of ``allowed``; else :class:`TLSIdentityError`
    (reason ``not_listed``) whose fix is ``fix``. For surfaces where a role is not narrow
    enough: any certificate of our CA is not yet a licence to read a disk."""
    if identity.uri not in allowed:
        raise TLSIdentityError(
            f"peer {identity} is not among the identities allowed here ({', '.join(allowed)})",
            reason="not_listed",
            fix=fix,
            identity=identity,
        )
    return identity


def peer_identity(source: object) -> Identity:
    """Return the verified peer's identity from a TLS connection.

    ``source`` may be an :class:`ssl.SSLObject` / :class:`ssl.SSLSocket`, an asyncio or uvloop
    transport, an :class:`asyncio.StreamWriter`, or an aiohttp request. Raises
    :class:`TLSIdentityError` when the connection is not TLS or the peer sent no certificate.
    """
    ssl_object = _ssl_object(source)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise TLSIdentityError(
            "the connection carries no verified peer certificate",
            reason="no_peer_certificate",
            fix="serve with server_context()/client_context() from common.tls, which require "
            "certificates on both sides",
        )
    return _identity_from_der(der)


def _ssl_object(source: object) -> ssl.SSLObject | ssl.SSLSocket | None:
    if source is None:
        return None
    if isinstance(source, ssl.SSLObject | ssl.SSLSocket):
        return source
    # Duck-typed: uvloop's transports do not derive from asyncio.BaseTransport, and aiohttp's
    # requests pass get_extra_info through to theirs (so this module needs no aiohttp import).
    get_extra_info = getattr(source, "get_extra_info", None)
    if callable(get_extra_info):
        found = get_extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject | ssl.SSLSocket) else None
    raise TypeError(f"cannot find a TLS connection in {type(source).__name__}")


def check_server_identity(
    source: object, role: Role, cluster: str | None = None, *, peer: str | None = None
) -> Identity:
    """Return the server's identity if it holds ``role`` (and, if given, is in ``cluster``).

    For clients, right after the handshake: :func:`client_context` checks only that the server's
    certificate names the host we dialled, and lab hosts share ``localhost``, so only the
    identity tells a broker from an agent. ``source`` is anything :func:`peer_identity` takes.
    Raises :class:`TLSIdentityError` (``wrong_role``, ``wrong_cluster``, ``no_identity`` ...)
    whose message names the identity presented and the one expected.
    """
    where = f"the server at {peer}" if peer else "the server"
    expected = f"a {role} of cluster {cluster!r}" if cluster else _a_role(role)
    issue = f"replikant certs issue {role}" + (f" --cluster {cluster}" if cluster else "")
    try:
        identity = peer_identity(source)
        require_role(identity, role, cluster=cluster)
    except TLSIdentityError as exc:
        found = (
            f"identity {exc.identity}" if exc.identity else f"no usable identity ({exc.message})"
        )
        raise TLSIdentityError(
            f"{where} presented {found}, but we expected {expected}",
            reason=exc.reason,
            fix=f"point this client at {expected} (check the URL: lab brokers and agents share "
            f"localhost/127.0.0.1), or give that server its own certificate (`{issue}`; check "
            f"it with `replikant certs check CERT --dir PKI --role {role}`)",
            identity=exc.identity,
        ) from None
    return identity


def _a_role(role: str) -> str:
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"
