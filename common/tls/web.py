"""aiohttp glue: an HTTPS site that logs every refused handshake, and a client connector that
checks the server's identity before a request is sent."""

from __future__ import annotations

import ssl
from collections.abc import Collection
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from common.tls.identities import Role, check_server_identity
from common.tls.serving import HANDSHAKE_TIMEOUT, TLSServer, serve_tls


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
    connection); to answer them with a 403 that explains why, check
    :func:`common.tls.require_role` in a middleware instead. ``port=0`` binds an ephemeral port,
    see ``port``.
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
