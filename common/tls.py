"""Mutual TLS for every Replikant connection: contexts, peer identities and rejection logging.

Every connection between agents, brokers and admins is TLS 1.3 with a certificate on both sides,
both issued by the deployment's own CA (`replikant certs`); NBD listeners alone also accept TLS 1.2
with AEAD suites (:func:`nbd_server_context`), because the NBD spec requires it. Who a peer *is*
comes from the URI SAN ``replikant://<role>/...`` of its verified certificate, never from its IP
address:

- ``replikant://agent/<host>``
- ``replikant://broker/<cluster>/<node>``
- ``replikant://admin/<user>``

A refused peer produces exactly one structured event, ``tls_handshake_rejected``, that says which
side refused what and why (``reason``), in words (``detail``) and with the remedy (``fix``).
Servers started with ``ssl=`` by asyncio or aiohttp drop handshake failures silently (asyncio logs
them only in debug mode), so the servers here accept each socket themselves and run the handshake
through ``loop.connect_accepted_socket``, where a failure can be caught:

- :class:`MutualTLSSite` for aiohttp, plus :func:`require_role_middleware` for the role check;
- :func:`start_tls_server` for stream servers, :func:`serve_tls` for protocol-based ones;
- :func:`accept_tls_stream` / :func:`accept_tls` for a STARTTLS upgrade of a connection that is
  already open (NBD's ``NBD_OPT_STARTTLS``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, get_args

import aiohttp
from aiohttp import web
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from aiohttp.typedefs import Handler, Middleware
from cryptography import x509

from common.config import NAME_PATTERN, TLSFiles
from common.errors import ReplikantError
from common.logs import get_logger

Role = Literal["broker", "agent", "admin"]
"""What a certificate's holder is allowed to be."""

ROLES: Final[tuple[Role, ...]] = get_args(Role)
URI_PREFIX: Final = "replikant://"
"""Every identity URI starts with this; other URI SANs are ignored."""

Side = Literal["server", "client"]
StrPath: TypeAlias = str | PathLike[str]
TLSMaterial: TypeAlias = TLSFiles | tuple[StrPath, StrPath, StrPath]
"""Either a config ``[tls]`` section or a ``(ca, cert, key)`` tuple of paths."""

HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a peer gets to complete the handshake before it is dropped (slowloris guard)."""

_NAME_RE: Final = re.compile(NAME_PATTERN)
_log = get_logger("common.tls")


# --------------------------------------------------------------------------------------------
# Identities


class TLSError(ReplikantError):
    """Base of the TLS errors below; ``reason`` is the machine-readable cause."""

    def __init__(self, message: str, *, reason: str, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.reason = reason


class TLSIdentityError(TLSError):
    """A peer certificate carries no usable identity, or the identity is not allowed here.

    ``reason`` is one of ``no_peer_certificate``, ``no_identity``, ``bad_identity``,
    ``wrong_role`` or ``wrong_cluster``; ``identity`` is the peer's, when it has one.
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
    if isinstance(source, web.BaseRequest):
        transport = source.transport
        return None if transport is None else _ssl_object(transport)
    # Duck-typed: uvloop's transports do not derive from asyncio.BaseTransport.
    get_extra_info = getattr(source, "get_extra_info", None)
    if callable(get_extra_info):
        found = get_extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject | ssl.SSLSocket) else None
    raise TypeError(f"cannot find a TLS connection in {type(source).__name__}")


# --------------------------------------------------------------------------------------------
# Contexts


def _material(tls: TLSMaterial) -> tuple[Path, Path, Path]:
    if isinstance(tls, TLSFiles):
        return tls.ca, tls.cert, tls.key
    ca, cert, key = tls
    return Path(ca), Path(cert), Path(key)


def _base_context(protocol: int, tls: TLSMaterial) -> ssl.SSLContext:
    ca, cert, key = _material(tls)
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict X.509 checks: our own CA issues every certificate, so nothing legitimate fails them.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    for label, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        if not path.is_file():
            raise TLSError(
                f"TLS {label} {path} does not exist",
                reason="missing_file",
                fix="check the [tls] section of the config, or create the file with "
                "`replikant certs init` / `replikant certs issue`",
            )
    try:
        # Only our CA: never the system store, so a public certificate cannot get in.
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise TLSError(
            f"TLS CA certificate {ca} is not a PEM certificate ({exc.reason})",
            reason="bad_file",
            fix="point [tls] ca at the ca.crt written by `replikant certs init`",
        ) from None
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise TLSError(
            f"TLS certificate {cert} and key {key} cannot be loaded together ({exc.reason})",
            reason="bad_file",
            fix=f"run `replikant certs check {cert} --dir <CA dir> --role <role>`; the key must "
            "be the one issued with the certificate",
        ) from None
    return ctx


def server_context(tls: TLSMaterial) -> ssl.SSLContext:
    """An SSL context for a Replikant server: TLS 1.3, our CA only, client certificate required.

    Prefer serving through :func:`start_tls_server` or :class:`MutualTLSSite`, which log
    handshake rejections; passing this context as ``ssl=`` to asyncio or aiohttp loses them.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, tls)
    # No session tickets: every connection re-verifies the client certificate against the CA,
    # so an expired or replaced certificate stops working at once instead of after resumption.
    ctx.num_tickets = 0
    return ctx


# TLS 1.2 suites NBD listeners accept: forward secrecy (ECDHE) with an AEAD cipher, nothing else.
# (TLS 1.3 suites are all AEAD and are not affected by this string.)
NBD_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"


def nbd_server_context(tls: TLSMaterial) -> ssl.SSLContext:
    """An SSL context for an NBD listener: :func:`server_context`, but TLS 1.2 is accepted too.

    The NBD spec says implementations MUST support TLS 1.2, and the NBD project's own clients
    (nbd-client, its test client) default to it, so NBD cannot be 1.3-only like our HTTPS and
    MQTT. TLS 1.2 gets only ECDHE with AES-GCM or ChaCha20-Poly1305, no renegotiation and no
    session tickets; TLS 1.1 and older are refused. The client certificate is required and checked
    exactly as on every other surface.
    """
    ctx = server_context(tls)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(NBD_TLS12_CIPHERS)
    # num_tickets only covers TLS 1.3; these keep TLS 1.2 from resuming without re-verification
    # or renegotiating mid-session.
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    return ctx


def client_context(tls: TLSMaterial) -> ssl.SSLContext:
    """An SSL context for a Replikant client: TLS 1.3, our CA only, our certificate presented.

    The server's host name (or IP address) is checked against its certificate's SANs, so
    connect with the name the server's certificate was issued for.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, tls)
    ctx.check_hostname = True
    return ctx


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


class IdentityCheckingConnector(aiohttp.TCPConnector):
    """An aiohttp connector that refuses HTTPS servers without the expected identity.

    Every connection it hands out over TLS (new or reused) passes :func:`check_server_identity`
    before aiohttp writes the request, so nothing is sent to, and no answer trusted from, the
    wrong peer; a refused connection is closed and ``session.request`` raises
    :class:`TLSIdentityError`. Plain ``http://`` connections carry no identity and pass
    unchecked (the agents' loopback status listeners)::

        connector = IdentityCheckingConnector(role="broker", ssl=client_context(config.tls))
    """

    def __init__(self, *, role: Role, cluster: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.role: Role = role
        self.cluster = cluster

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Connection:
        """Get a connection as aiohttp does, then check the server's identity on it."""
        conn = await super().connect(req, traces, timeout)
        if not req.is_ssl():
            return conn
        try:
            check_server_identity(
                conn.transport, self.role, self.cluster, peer=f"{req.host}:{req.port}"
            )
        except BaseException:
            conn.close()
            raise
        return conn


# --------------------------------------------------------------------------------------------
# Rejections


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a TLS peer was refused, for one ``tls_handshake_rejected`` log event.

    ``rejected_by`` is ``"us"`` when this process refused the peer and ``"peer"`` when the peer
    refused us (we learn that from the TLS alert it sent).
    """

    side: Side
    reason: str
    detail: str
    fix: str
    rejected_by: Literal["us", "peer"]
    peer: str | None = None
    identity: Identity | None = None
    ssl_reason: str | None = None
    verify_code: int | None = None

    def fields(self) -> dict[str, Any]:
        """The log event's fields, without the empty ones."""
        out: dict[str, Any] = {
            "side": self.side,
            "peer": self.peer,
            "reason": self.reason,
            "rejected_by": self.rejected_by,
            "detail": self.detail,
            "fix": self.fix,
            "identity": None if self.identity is None else self.identity.uri,
            "ssl_reason": self.ssl_reason,
            "verify_code": self.verify_code,
        }
        return {k: v for k, v in out.items() if v is not None}

    def log(self) -> None:
        """Emit the ``tls_handshake_rejected`` event."""
        _log.warning("tls_handshake_rejected", **self.fields())


class TLSHandshakeError(TLSError):
    """A peer was refused during or right after the TLS handshake; ``rejection`` says why."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.detail, reason=rejection.reason, fix=rejection.fix)
        self.rejection = rejection


_CHECK_HINT = "check it with `replikant certs check <file> --dir <CA dir> --role <role>`"

# OpenSSL X509_V_ERR_* codes, grouped by what the operator has to do about them.
_VERIFY_REASONS: Final[dict[int, tuple[str, str]]] = {
    2: ("unknown_ca", "its issuer is not our CA"),
    7: ("unknown_ca", "its signature does not verify against our CA"),
    9: ("certificate_not_yet_valid", "it is not valid yet"),
    10: ("certificate_expired", "it has expired"),
    18: ("unknown_ca", "it is self-signed"),
    19: ("unknown_ca", "its chain ends in a CA we do not trust"),
    20: ("unknown_ca", "it was signed by a CA we do not trust"),
    21: ("unknown_ca", "it was signed by a CA we do not trust"),
    23: ("certificate_revoked", "it has been revoked"),
    26: ("wrong_key_usage", "its extended key usage does not allow this use"),
    62: ("hostname_mismatch", "its SANs do not include the host name we connected to"),
    64: ("hostname_mismatch", "its SANs do not include the IP address we connected to"),
}

_FIXES: Final[dict[str, str]] = {
    "no_client_certificate": "configure the client's [tls] cert and key (issue them with "
    "`replikant certs issue`)",
    "unknown_ca": "issue the certificate from this deployment's CA (`replikant certs issue ... "
    "--dir <CA dir>`) or point [tls] ca at the CA that signed it; " + _CHECK_HINT,
    "certificate_expired": "renew it with `replikant certs rotate --dir <CA dir>` and restart "
    "the process that uses it",
    "certificate_not_yet_valid": "check both hosts' clocks (NTP), or re-issue the certificate",
    "certificate_revoked": "issue a new certificate with `replikant certs issue`",
    "wrong_key_usage": "re-issue it with `replikant certs issue <role>` (servers need serverAuth, "
    "clients clientAuth; admin certificates are client-only); " + _CHECK_HINT,
    "hostname_mismatch": "connect with a name listed in the server certificate's SANs, or "
    "re-issue it with --dns/--ip for the name clients use",
    "certificate_invalid": _CHECK_HINT,
    "peer_requires_certificate": "configure this process's [tls] cert and key",
    "peer_rejected_certificate": "read the peer's log for its tls_handshake_rejected event; "
    + _CHECK_HINT.replace("check it", "check our certificate"),
    "protocol_version": "Replikant requires TLS 1.3 (NBD listeners: TLS 1.2 with ECDHE and "
    "AES-GCM or ChaCha20-Poly1305, or 1.3): upgrade the peer's OpenSSL / TLS library",
    "not_tls": "the peer spoke plain text to a TLS port: use https:// or enable TLS on the peer",
    "handshake_timeout": "check the network path between the hosts, and that the peer is a "
    "Replikant TLS client rather than a port scanner or a plain-text client",
    "connection_closed": "the peer hung up, usually because it refused our certificate: read "
    "its log for tls_handshake_rejected, and "
    + _CHECK_HINT.replace("check it", "check our certificate"),
    "handshake_failed": "read the ssl_reason field; both sides must use certificates from "
    "`replikant certs` and TLS 1.3 (NBD also accepts TLS 1.2 with ECDHE and an AEAD cipher)",
}

_CERT_ALERTS: Final = (
    "BAD_CERTIFICATE",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_UNKNOWN",
    "UNKNOWN_CA",
    "ACCESS_DENIED",
    "DECRYPT_ERROR",
)
_NOT_TLS: Final = (
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LENGTH_MISMATCH",
)
_PROTOCOL: Final = (
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "TLSV1_ALERT_PROTOCOL_VERSION",
)


def describe_tls_error(exc: BaseException, *, side: Side, peer: str | None = None) -> Rejection:
    """Turn a TLS failure (``ssl.SSLError``, ``SSLCertVerificationError``, a reset, a timeout or
    a :class:`TLSIdentityError`) into a :class:`Rejection` an operator can act on.

    ``side`` is this process's side of the connection. Clients can use it on errors raised while
    connecting or on the first read: with TLS 1.3 a server refuses a client's certificate after
    the client believes the handshake is done, so the refusal shows up as an alert on read.
    """
    exc = _root_cause(exc)
    us = "the server" if side == "server" else "the client"
    them = "client" if side == "server" else "server"
    if isinstance(exc, TLSHandshakeError):
        return exc.rejection
    if isinstance(exc, TLSIdentityError):
        return Rejection(
            side=side,
            reason=exc.reason,
            detail=f"{us} refused the {them}: {exc.message}",
            fix=exc.fix or _FIXES["certificate_invalid"],
            rejected_by="us",
            peer=peer,
            identity=exc.identity,
        )
    if isinstance(exc, TimeoutError):
        return _rejection(
            side,
            peer,
            "handshake_timeout",
            f"the {them} did not complete the TLS handshake in time",
            rejected_by="us",
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        reason, why = _VERIFY_REASONS.get(code, ("certificate_invalid", "it failed verification"))
        return _rejection(
            side,
            peer,
            reason,
            f"{us} refused the {them}'s certificate: {why} ({exc.verify_message})",
            rejected_by="us",
            ssl_reason=exc.reason,
            verify_code=code,
        )
    if isinstance(exc, ssl.SSLError):
        return _describe_ssl_error(exc, side=side, peer=peer, us=us, them=them)
    if isinstance(exc, ConnectionError | EOFError | aiohttp.ServerDisconnectedError):
        # With TLS 1.3 the client's handshake ends before the server has checked the client's
        # certificate, so a refused client sees only a closed connection.
        when = (
            "during the TLS handshake"
            if side == "server"
            else "during or right after the TLS handshake"
        )
        return _rejection(
            side,
            peer,
            "connection_closed",
            f"the {them} closed the connection {when}",
            rejected_by="peer",
        )
    return _rejection(
        side,
        peer,
        "handshake_failed",
        f"the TLS handshake with the {them} failed: {exc!r}",
        rejected_by="us",
    )


def describe_client_failure(
    exc: BaseException, *, url: str, role: Role, cert: StrPath | None = None
) -> Rejection | None:
    """Why a client's request to ``url`` failed at the TLS layer, or ``None`` if TLS is not why.

    Walks the exception chain (aiohttp keeps the ``ssl`` error in ``certificate_error``,
    ``os_error``, ``__cause__`` or ``__context__``) for a certificate or TLS error, our own
    refusal of the server's identity, or a bare disconnect on an ``https://`` URL: with TLS 1.3
    a server that refuses our certificate (``role``'s, in file ``cert``) only hangs up.
    """
    chain = _exception_chain(exc)
    peer = _url_peer(url)
    for item in chain:
        if isinstance(item, ssl.SSLEOFError):
            break
        if isinstance(item, TLSError | ssl.SSLError | aiohttp.ClientSSLError):
            return describe_tls_error(item, side="client", peer=peer)
    if url.startswith("https://") and any(
        isinstance(item, aiohttp.ServerDisconnectedError | ConnectionResetError | ssl.SSLEOFError)
        for item in chain
    ):
        return Rejection(
            side="client",
            reason="connection_closed",
            detail="the server closed the connection right after the TLS handshake: it probably "
            "refused our certificate (wrong CA, expired, or not authorised)",
            fix=f"run `replikant certs check {cert or 'CERT'} --dir PKI --role {role}` and read "
            "the server's log for tls_handshake_rejected",
            rejected_by="peer",
            peer=peer,
        )
    return None


def _exception_chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(out) < 16:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or any(item is seen for seen in out):
            continue
        out.append(item)
        todo += [
            getattr(item, "certificate_error", None),
            getattr(item, "os_error", None),
            item.__cause__,
            item.__context__,
        ]
    return out


def _url_peer(url: str) -> str | None:
    rest = url.partition("://")[2]
    return rest.split("/", 1)[0] or None


def _root_cause(exc: BaseException) -> BaseException:
    # Client libraries wrap the ssl error: aiohttp keeps it in `certificate_error` / `os_error`
    # and in __cause__. Unwrap until we reach something we can classify.
    for _ in range(8):
        wrapped = isinstance(exc, aiohttp.ClientError) or not isinstance(
            exc, OSError | TimeoutError | TLSError | EOFError
        )
        inner = (
            getattr(exc, "certificate_error", None)
            or getattr(exc, "os_error", None)
            or exc.__cause__
            or exc.__context__
        )
        if not wrapped or not isinstance(inner, BaseException):
            return exc
        exc = inner
    return exc


def _describe_ssl_error(
    exc: ssl.SSLError, *, side: Side, peer: str | None, us: str, them: str
) -> Rejection:
    code = str(exc.reason or "")
    if code == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return _rejection(
            side,
            peer,
            "no_client_certificate",
            f"{us} refused the {them}: it presented no certificate",
            rejected_by="us",
            ssl_reason=code,
        )
    if code == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return _rejection(
            side,
            peer,
            "peer_requires_certificate",
            f"the {them} refused us: it requires a certificate and we presented none",
            rejected_by="peer",
            ssl_reason=code,
        )
    if code in _PROTOCOL:
        return _rejection(
            side,
            peer,
            "protocol_version",
            f"the {them} and we share no TLS version (Replikant requires TLS 1.3, NBD 1.2+)",
            rejected_by="peer" if "ALERT" in code else "us",
            ssl_reason=code,
        )
    if code in _NOT_TLS:
        return _rejection(
            side,
            peer,
            "not_tls",
            f"the {them} did not speak TLS",
            rejected_by="us",
            ssl_reason=code,
        )
    alert = re.sub(r"^(SSLV3|TLSV1|TLSV13)_ALERT_", "", code)
    if alert != code and alert in _CERT_ALERTS:
        words = alert.lower().replace("_", " ")
        return _rejection(
            side,
            peer,
            "peer_rejected_certificate",
            f"the {them} refused our certificate (TLS alert: {words})",
            rejected_by="peer",
            ssl_reason=code,
        )
    if isinstance(exc, ssl.SSLEOFError) or code == "UNEXPECTED_EOF_WHILE_READING":
        return _rejection(
            side,
            peer,
            "connection_closed",
            f"the {them} closed the connection during the TLS handshake",
            rejected_by="peer",
            ssl_reason=code or None,
        )
    return _rejection(
        side,
        peer,
        "handshake_failed",
        f"the TLS handshake with the {them} failed: {exc.reason or exc}",
        rejected_by="peer" if alert != code else "us",
        ssl_reason=code or None,
    )


def _rejection(
    side: Side,
    peer: str | None,
    reason: str,
    detail: str,
    *,
    rejected_by: Literal["us", "peer"],
    ssl_reason: str | None = None,
    verify_code: int | None = None,
) -> Rejection:
    return Rejection(
        side=side,
        reason=reason,
        detail=detail,
        fix=_FIXES[reason],
        rejected_by=rejected_by,
        peer=peer,
        ssl_reason=ssl_reason,
        verify_code=verify_code,
    )


def format_peer(peername: object) -> str | None:
    """``host:port`` (``[v6]:port``) from a socket's peer name, or ``None`` when unknown."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return None if peername in (None, "", b"") else str(peername)


# --------------------------------------------------------------------------------------------
# Accepting connections


def _check_identity(
    source: object, allowed_roles: Collection[Role] | None, *, side: Side, peer: str | None
) -> Identity:
    try:
        identity = peer_identity(source)
        if allowed_roles is not None:
            require_role(identity, allowed_roles)
    except TLSIdentityError as exc:
        rejection = describe_tls_error(exc, side=side, peer=peer)
        rejection.log()
        raise TLSHandshakeError(rejection) from None
    return identity


async def accept_tls(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[asyncio.Transport, Identity]:
    """Run the server side of the TLS handshake on an open connection.

    For STARTTLS-style upgrades: the peer must be waiting for our go-ahead, since bytes it sent
    before this call are not part of the handshake. (For connections that are TLS from the
    first byte use :func:`serve_tls`.) Returns the TLS transport (``protocol`` receives its data
    from now on) and the peer's identity. On failure, logs one ``tls_handshake_rejected``
    event, closes the connection and raises :class:`TLSHandshakeError`.
    """
    loop = asyncio.get_running_loop()
    peer = format_peer(transport.get_extra_info("peername"))
    try:
        async with asyncio.timeout(handshake_timeout):
            tls_transport = await loop.start_tls(transport, protocol, ctx, server_side=True)
    except (OSError, TimeoutError, EOFError) as exc:
        # start_tls has already closed the connection.
        rejection = describe_tls_error(exc, side="server", peer=peer)
        rejection.log()
        raise TLSHandshakeError(rejection) from None
    if tls_transport is None:  # pragma: no cover - only for transports without TLS support
        transport.close()
        raise TLSError("the transport cannot be upgraded to TLS", reason="handshake_failed")
    try:
        identity = _check_identity(tls_transport, allowed_roles, side="server", peer=peer)
    except TLSHandshakeError:
        tls_transport.close()
        raise
    return tls_transport, identity


async def accept_tls_stream(
    writer: asyncio.StreamWriter,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Identity:
    """Upgrade a server-side stream to TLS (a STARTTLS) and return the peer's identity.

    ``writer`` must come from :func:`asyncio.start_server`, and the peer must be waiting for
    our go-ahead (as STARTTLS protocols such as NBD's require): handshake bytes it sent early
    would sit in the stream's buffer, out of TLS's reach. On failure, logs one
    ``tls_handshake_rejected`` event, closes the connection and raises
    :class:`TLSHandshakeError`; do not ``await writer.wait_closed()`` afterwards, as a failed
    upgrade never reports the close to the stream. For a server that is TLS from the first
    byte use :func:`start_tls_server`.
    """
    peer = format_peer(writer.get_extra_info("peername"))
    try:
        async with asyncio.timeout(handshake_timeout):
            await writer.start_tls(ctx)
    except (OSError, TimeoutError, EOFError) as exc:
        writer.close()
        rejection = describe_tls_error(exc, side="server", peer=peer)
        rejection.log()
        raise TLSHandshakeError(rejection) from None
    try:
        return _check_identity(writer, allowed_roles, side="server", peer=peer)
    except TLSHandshakeError:
        writer.close()
        raise


class _IdentityGate(asyncio.Protocol):
    """The first protocol of a fresh TLS connection: checks the peer, then hands over.

    The loop calls ``connection_made`` right after the handshake; the check and the hand-over
    happen there, synchronously, so the application protocol sees every byte the peer sends.
    """

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        allowed_roles: Collection[Role] | None,
        peer: str | None,
    ) -> None:
        self._factory = factory
        self._allowed_roles = allowed_roles
        self._peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Check the peer's identity; hand the connection to a new application protocol."""
        try:
            _check_identity(transport, self._allowed_roles, side="server", peer=self._peer)
        except TLSHandshakeError:
            transport.close()
            return
        app = self._factory()
        transport.set_protocol(app)
        app.connection_made(transport)


class TLSServer(asyncio.AbstractServer):
    """A listening mutual-TLS server that completes each handshake itself and logs rejections.

    ``asyncio``'s and ``aiohttp``'s ``ssl=`` servers drop failed handshakes silently, and
    ``loop.start_tls`` on a freshly accepted connection races the client's first bytes (uvloop
    reads them before anyone can pause the transport). So this server accepts sockets itself
    and hands each one to :meth:`asyncio.loop.connect_accepted_socket` with the TLS context,
    which raises when the handshake fails. Build one with :func:`serve_tls` or
    :func:`start_tls_server`; it has ``sockets``, ``close()`` and ``wait_closed()`` like
    :class:`asyncio.Server`.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ctx: ssl.SSLContext,
        *,
        allowed_roles: Collection[Role] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._factory = protocol_factory
        self._ctx = ctx
        self._allowed_roles = allowed_roles
        self._timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._accepting: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def listen(self, host: str | None, port: int, *, backlog: int = 128) -> None:
        """Bind every address of ``host`` (all interfaces when ``None``) and start accepting."""
        infos = await self._loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[Any, ...]] = set()
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            listener = socket.socket(family, kind, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # One socket per family, as asyncio's create_server does.
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # port 0 on several addresses: bind them all to the port the first one got.
                bound = (address[0], self.port or address[1], *address[2:])
                listener.bind(bound)
                listener.listen(backlog)
                listener.setblocking(False)
            except OSError:
                listener.close()
                self.close()
                raise
            self._listeners.append(listener)
        for listener in self._listeners:
            self._spawn(self._accepting, self._accept(listener))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return tuple(self._listeners)

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0); 0 before :meth:`listen`."""
        return int(self._listeners[0].getsockname()[1]) if self._listeners else 0

    def _spawn(self, tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, address = await self._loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() == -1:
                    return
                # Out of file descriptors and the like: say so, breathe, keep serving.
                _log.error("tls_accept_failed", error=str(exc), errno=exc.errno)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._handshakes, self._handshake(conn, format_peer(address)))

    async def _handshake(self, conn: socket.socket, peer: str | None) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._loop.connect_accepted_socket(
                    lambda: _IdentityGate(self._factory, self._allowed_roles, peer),
                    conn,
                    ssl=self._ctx,
                )
        except (OSError, TimeoutError, EOFError) as exc:
            # The loop has closed the connection already.
            describe_tls_error(exc, side="server", peer=peer).log()

    def close(self) -> None:
        """Stop accepting and abandon handshakes in progress; live connections stay open."""
        for task in (*self._accepting, *self._handshakes):
            task.cancel()
        for listener in self._listeners:
            listener.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has been called and its tasks have ended."""
        await self._closed.wait()
        await asyncio.gather(*self._accepting, *self._handshakes, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether it is accepting connections."""
        return bool(self._accepting)

    async def start_serving(self) -> None:
        """Nothing to do: :meth:`listen` starts serving."""

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` (or cancellation)."""
        try:
            await self._closed.wait()
        finally:
            self.close()


async def serve_tls(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    backlog: int = 128,
) -> TLSServer:
    """Serve a protocol over mutual TLS; the protocol sees only peers that passed.

    The protocol's ``connection_made`` gets the TLS transport; ``peer_identity(transport)`` says
    who is on the other end. Every refused peer is logged as ``tls_handshake_rejected``.
    """
    server = TLSServer(
        protocol_factory, ctx, allowed_roles=allowed_roles, handshake_timeout=handshake_timeout
    )
    await server.listen(host, port, backlog=backlog)
    return server


TLSStreamHandler: TypeAlias = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, Identity], Awaitable[None]
]


async def start_tls_server(
    handler: TLSStreamHandler,
    host: str | None,
    port: int,
    ctx: ssl.SSLContext,
    *,
    allowed_roles: Collection[Role] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    backlog: int = 128,
) -> TLSServer:
    """Start a mutual-TLS stream server; ``handler(reader, writer, identity)`` runs per peer.

    Only peers that complete the handshake and (if ``allowed_roles`` is given) hold one of those
    roles reach ``handler``; every other one is logged as ``tls_handshake_rejected``. The writer
    is closed when ``handler`` returns.
    """

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer, peer_identity(writer))
        finally:
            writer.close()
            try:
                async with asyncio.timeout(handshake_timeout):
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                pass  # the peer is gone either way

    def stream_protocol() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), on_connect)

    return await serve_tls(
        stream_protocol,
        host,
        port,
        ctx,
        allowed_roles=allowed_roles,
        handshake_timeout=handshake_timeout,
        backlog=backlog,
    )


class MutualTLSSite(web.BaseSite):
    """An aiohttp site that serves HTTPS with client certificates and logs every rejection.

    Use it instead of ``web.TCPSite(ssl_context=...)``, which drops handshake failures silently::

        runner = web.AppRunner(app)
        await runner.setup()
        site = MutualTLSSite(runner, "0.0.0.0", 8443, server_context(config.tls))
        await site.start()
        ...
        await runner.cleanup()   # stops the site too

    ``allowed_roles`` refuses other roles at the connection (the client sees a closed
    connection); to answer them with a 403 that explains why, use
    :func:`require_role_middleware` instead. ``port=0`` binds an ephemeral port, see ``port``.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        allowed_roles: Collection[Role] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._tls = ssl_context
        self._allowed_roles = allowed_roles
        self._handshake_timeout = handshake_timeout
        self._tls_server: TLSServer | None = None

    @property
    def port(self) -> int:
        """The bound port once started (useful with ``port=0``), else the requested one."""
        return self._tls_server.port if self._tls_server is not None else self._port

    @property
    def name(self) -> str:
        """The site's URL, as aiohttp prints it."""
        host = self._host or "0.0.0.0"
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        """Listen; every connection completes its TLS handshake before aiohttp sees it."""
        await super().start()
        server = self._runner.server
        if server is None:  # pragma: no cover - BaseSite.__init__ already checked this
            raise RuntimeError("call runner.setup() before starting a site")
        self._tls_server = await serve_tls(
            server,
            self._host,
            self._port,
            self._tls,
            allowed_roles=self._allowed_roles,
            handshake_timeout=self._handshake_timeout,
            backlog=self._backlog,
        )
        # BaseSite.stop() closes it, and the runner lists its sockets in `addresses`.
        self._server = self._tls_server

    async def stop(self) -> None:
        """Stop listening and wait for handshakes in progress to be abandoned."""
        await super().stop()
        if self._tls_server is not None:
            await self._tls_server.wait_closed()


def require_role_middleware(
    roles: Role | Collection[Role], *, cluster: str | None = None
) -> Middleware:
    """An aiohttp middleware that answers 403 to peers whose identity is not one of ``roles``.

    The refusal is logged as ``tls_handshake_rejected`` (reason ``wrong_role``, ``no_identity``
    ...) and the JSON body carries the same ``reason``, ``detail`` and ``fix`` for the client.
    Handlers get the identity with :func:`peer_identity` ``(request)``.
    """
    wanted = _roles(roles)

    @web.middleware
    async def check_role(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            require_role(peer_identity(request), wanted, cluster=cluster)
        except TLSIdentityError as exc:
            peer = format_peer(
                request.transport.get_extra_info("peername") if request.transport else None
            )
            rejection = describe_tls_error(exc, side="server", peer=peer)
            rejection.log()
            body = {"error": rejection.reason, "detail": rejection.detail, "fix": rejection.fix}
            raise web.HTTPForbidden(
                text=json.dumps(body), content_type="application/json"
            ) from None
        return await handler(request)

    return check_role
