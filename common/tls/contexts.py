"""SSL contexts for every Replikant connection: TLS 1.3, our CA only, certificates on both sides.

NBD listeners alone also accept TLS 1.2 with AEAD suites (:func:`nbd_server_context`), because
the NBD spec requires it.
"""

from __future__ import annotations

import ssl
from os import PathLike
from pathlib import Path
from typing import Final, TypeAlias

from common.config import TLSFiles
from common.tls.identities import TLSError

StrPath: TypeAlias = str | PathLike[str]
TLSMaterial: TypeAlias = TLSFiles | tuple[StrPath, StrPath, StrPath]
"""Either a config ``[tls]`` section or a ``(ca, cert, key)`` tuple of paths."""


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
