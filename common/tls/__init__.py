"""Mutual TLS for every Replikant connection: identities, contexts, diagnosis and serving.

Every connection between agents, brokers and admins is TLS 1.3 with a certificate on both sides,
both issued by the deployment's own CA (`replikant certs`); NBD listeners alone also accept TLS 1.2
with AEAD suites. Who a peer *is* comes from the URI SAN ``replikant://<role>/...`` of its
verified certificate, never from its IP address. One job per module:

- :mod:`common.tls.identities`: parse and check the URI SAN (no aiohttp, no event loop);
- :mod:`common.tls.contexts`: the server and client :class:`ssl.SSLContext` builders;
- :mod:`common.tls.diagnosis`: a handshake failure turned into one ``tls_handshake_rejected``
  event that says who refused what, why, and the fix;
- :mod:`common.tls.serving`: accepting TLS connections (from the first byte, or STARTTLS) with
  every refusal logged;
- :mod:`common.tls.web`: the aiohttp glue (an HTTPS site and an identity-checking connector).

The names below are re-exported so that callers write ``from common.tls import ...``. Each is
loaded from its module on first use (PEP 562), so ``from common.tls import Identity`` and
``import common.tls.identities`` load neither aiohttp nor the servers; the table is the
explicit list of what this package exports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.tls.contexts import (
        NBD_TLS12_CIPHERS,
        StrPath,
        TLSMaterial,
        client_context,
        nbd_server_context,
        server_context,
    )
    from common.tls.diagnosis import (
        Rejection,
        Side,
        TLSHandshakeError,
        describe_client_failure,
        describe_tls_error,
        format_peer,
    )
    from common.tls.identities import (
        ROLES,
        URI_PREFIX,
        Identity,
        Role,
        TLSError,
        TLSIdentityError,
        check_server_identity,
        identity_from_cert,
        peer_identity,
        require_role,
    )
    from common.tls.serving import (
        HANDSHAKE_TIMEOUT,
        TLSServer,
        TLSStreamHandler,
        accept_tls,
        serve_tls,
        start_tls_server,
    )
    from common.tls.web import (
        IdentityCheckingConnector,
        MutualTLSSite,
    )

_HOMES: dict[str, str] = {
    "HANDSHAKE_TIMEOUT": "serving",
    "Identity": "identities",
    "IdentityCheckingConnector": "web",
    "MutualTLSSite": "web",
    "NBD_TLS12_CIPHERS": "contexts",
    "ROLES": "identities",
    "Rejection": "diagnosis",
    "Role": "identities",
    "Side": "diagnosis",
    "StrPath": "contexts",
    "TLSError": "identities",
    "TLSHandshakeError": "diagnosis",
    "TLSIdentityError": "identities",
    "TLSMaterial": "contexts",
    "TLSServer": "serving",
    "TLSStreamHandler": "serving",
    "URI_PREFIX": "identities",
    "accept_tls": "serving",
    "check_server_identity": "identities",
    "client_context": "contexts",
    "describe_client_failure": "diagnosis",
    "describe_tls_error": "diagnosis",
    "format_peer": "diagnosis",
    "identity_from_cert": "identities",
    "nbd_server_context": "contexts",
    "peer_identity": "identities",
    "require_role": "identities",
    "serve_tls": "serving",
    "server_context": "contexts",
    "start_tls_server": "serving",
}

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "NBD_TLS12_CIPHERS",
    "ROLES",
    "URI_PREFIX",
    "Identity",
    "IdentityCheckingConnector",
    "MutualTLSSite",
    "Rejection",
    "Role",
    "Side",
    "StrPath",
    "TLSError",
    "TLSHandshakeError",
    "TLSIdentityError",
    "TLSMaterial",
    "TLSServer",
    "TLSStreamHandler",
    "accept_tls",
    "check_server_identity",
    "client_context",
    "describe_client_failure",
    "describe_tls_error",
    "format_peer",
    "identity_from_cert",
    "nbd_server_context",
    "peer_identity",
    "require_role",
    "serve_tls",
    "server_context",
    "start_tls_server",
]


def __getattr__(name: str) -> Any:
    """Load an exported name from its module the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'common.tls' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"common.tls.{home}"), name)
    globals()[name] = value
    return value
