"""TLS helpers only the tests use: a STARTTLS upgrade of a stream, and a role-checking aiohttp
middleware."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Collection

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from common.tls import (
    HANDSHAKE_TIMEOUT,
    Identity,
    Role,
    TLSHandshakeError,
    TLSIdentityError,
    describe_tls_error,
    format_peer,
    peer_identity,
    require_role,
)
from common.tls.serving import check_identity


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
        return check_identity(writer, allowed_roles, side="server", peer=peer)
    except TLSHandshakeError:
        writer.close()
        raise


def require_role_middleware(
    roles: Role | Collection[Role], *, cluster: str | None = None
) -> Middleware:
    """An aiohttp middleware that answers 403 to peers whose identity is not one of ``roles``.

    The refusal is logged as ``tls_handshake_rejected`` (reason ``wrong_role``, ``no_identity``
    ...) and the JSON body carries the same ``reason``, ``detail`` and ``fix`` for the client.
    Handlers get the identity with :func:`peer_identity` ``(request)``.
    """

    @web.middleware
    async def check_role(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            require_role(peer_identity(request), roles, cluster=cluster)
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
