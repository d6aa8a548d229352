"""Handshake failures turned into one explained event, ``tls_handshake_rejected``.

A refused peer produces exactly one structured event that says which side refused what and why
(``reason``), in words (``detail``) and with the remedy (``fix``). Servers log it as they refuse
(:mod:`common.tls.serving`); clients build it from the exception their request raised
(:func:`describe_client_failure`).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp

from common.logs import get_logger
from common.tls.contexts import StrPath
from common.tls.identities import Identity, Role, TLSError, TLSIdentityError

Side = Literal["server", "client"]

_log = get_logger("common.tls")


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
