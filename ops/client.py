"""How the operator's CLI talks to Replikant: HTTPS with the admin certificate to brokers, HTTP on
the control sockets to agents, and every failure turned into an :class:`AdminError` that names
the peer and the fix."""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click

from common.config import AdminConfig, load_config
from common.errors import ConfigError, ReplikantError
from common.refusal import Refusal, member_redirect, not_our_service
from common.tls import IdentityCheckingConnector, client_context, describe_client_failure

T = TypeVar("T")

HOPS = 3
"""Most not_owner refusals one request follows: one to the serving member, spares for a move."""


class AdminError(ReplikantError):
    """A broker or agent refused, or could not be reached."""


def admin_config(ctx: click.Context) -> AdminConfig:
    """The admin config named by ``replikant --config`` (or REPLIKANT_CONFIG), validated."""
    obj = ctx.find_root().obj or {}
    path = obj.get("config_path")
    if path is None:
        raise ConfigError(
            "no admin config given",
            fix="pass `replikant --config admin.toml ...` or set REPLIKANT_CONFIG",
        )
    return load_config(Path(path), AdminConfig)


class AdminClient:
    """HTTPS with our admin certificate to brokers; HTTP on their control sockets to agents."""

    def __init__(self, config: AdminConfig, timeout: float = 120.0) -> None:
        self.config = config
        self._ctx = client_context(config.tls)
        self._timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self._agents: dict[str, aiohttp.ClientSession] = {}

    async def __aenter__(self) -> AdminClient:
        self.session = aiohttp.ClientSession(
            # Every https:// peer must be a broker (agents answer only on their unix sockets).
            connector=IdentityCheckingConnector(role="broker", ssl=self._ctx),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        for session in self._agents.values():
            await session.close()

    async def agent(self, sock: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """One JSON request to the agent whose control socket is ``sock``: (status, body).

        State-changing requests go as JSON (the agent refuses anything else). A socket that is
        missing, silent or not ours to use raises :class:`AdminError` naming it and the fix.
        """
        session = self._agents.get(sock)
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=sock),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
            self._agents[sock] = session
        if method != "GET":
            kwargs.setdefault("json", {})
        try:
            async with session.request(method, "http://agent" + path, **kwargs) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise _agent_error(sock, exc) from None

    async def request(
        self, method: str, url: str, *, expect: str = "json", **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        """One request to a broker; returns (status, body, headers). A cluster member that does
        not serve the VM (503 ``not_owner``) names the member that does: the request goes there
        instead (at most :data:`HOPS` times, never back to a member already asked), as an
        agent's would. Network failures raise AdminError."""
        base, path = _split(url)
        asked = {base}
        while True:
            status, body, headers = await self._once(method, base + path, expect, kwargs)
            target = member_redirect(status, body)
            if target is None or target in asked or len(asked) > HOPS:
                return status, body, headers
            asked.add(target)
            base = target

    async def _once(
        self, method: str, url: str, expect: str, kwargs: dict[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        assert self.session is not None
        try:
            async with self.session.request(method, url, **kwargs) as resp:
                if expect == "json" or resp.status >= 400:
                    body: Any = await resp.json(content_type=None)
                else:
                    body = await resp.read()
                return resp.status, body, dict(resp.headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, ReplikantError) as exc:
            raise self._network_error(url, exc) from None

    def _network_error(self, url: str, exc: BaseException) -> AdminError:
        """Name what went wrong talking to ``url``, with the fix: TLS first, then the rest."""
        rejection = describe_client_failure(exc, url=url, role="admin", cert=self.config.tls.cert)
        if rejection is not None:
            return AdminError(f"cannot talk to {url}: {rejection.detail}", fix=rejection.fix)
        if isinstance(exc, ValueError | aiohttp.ContentTypeError):
            message, fix = not_our_service(
                url,
                "broker",
                "[admin] brokers in the admin config: it must list the brokers' "
                "https:// listen addresses",
            )
            return AdminError(message, fix=fix)
        if isinstance(exc, ReplikantError):
            return AdminError(f"cannot talk to {url}: {exc.message}", fix=exc.fix)
        return AdminError(
            f"cannot talk to {url}: {type(exc).__name__}: {exc}",
            fix="check the URL in the admin config and that the service runs",
        )

    async def broker_json(self, path: str, *, method: str = "GET", **kw: Any) -> list[Any]:
        """The answers of every broker that knows ``path`` (404s skipped). A cluster member
        that does not serve it answers 503 ``not_owner`` naming the member that does: that one is
        asked in turn, once, even when the admin config does not list it."""
        out = []
        errors = []
        queue = [b.rstrip("/") for b in self.config.admin.brokers]
        asked: set[str] = set()
        while queue:
            base = queue.pop(0)
            if base in asked:
                continue
            asked.add(base)
            status, body, _ = await self._once(method, base + path, "json", kw)
            target = member_redirect(status, body)
            if status == 404 or _standby(status, body):
                errors.append(body)
                if target is not None:
                    queue.append(target)
                continue
            if status >= 400:
                raise refusal(base, status, body)
            out.append(body)
        if not out and errors:
            raise refusal(self.config.admin.brokers[0], 404, errors[0])
        return out


def _standby(status: int, body: object) -> bool:
    """A cluster member that does not serve the request (503 ``not_owner``)."""
    return status == 503 and isinstance(body, dict) and body.get("error") == "not_owner"


def _split(url: str) -> tuple[str, str]:
    """``https://host:port`` and the path (``/v1/...``) of a broker request URL."""
    base, sep, rest = url.partition("/v1/")
    return base.rstrip("/"), sep + rest


def _agent_error(sock: str, exc: BaseException) -> AdminError:
    """Name what went wrong on an agent's control socket, with the fix."""
    code = getattr(exc, "errno", None)
    if code == errno.EACCES:
        return AdminError(
            f"no permission to use the agent's control socket {sock}",
            fix="run this as a member of the agent's [agent] control_group (or as its user)",
        )
    if code in (errno.ENOENT, errno.ECONNREFUSED):
        return AdminError(
            f"no agent listens on {sock}",
            fix="start that agent (systemctl start replikant-agent) or correct [admin] agents: "
            "each entry is an agent's [agent] control_socket, and this runs on the agent's host",
        )
    if isinstance(exc, ValueError):
        message, fix = not_our_service(
            sock, "agent", "[admin] agents: each entry must be an agent's [agent] control_socket"
        )
        return AdminError(message, fix=fix)
    return AdminError(
        f"cannot talk to the agent on {sock}: {type(exc).__name__}: {exc}",
        fix="check that the agent runs (replikant agent status)",
    )


def refusal(url: str, status: int, body: object) -> AdminError:
    """The refusal ``url`` answered with (docs/protocol/http.md), as an :class:`AdminError`."""
    refused = Refusal.from_body(status, body)
    return AdminError(refused.sentence(url), fix=refused.fix)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine to completion on a fresh event loop."""

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def emit_json(doc: Any) -> None:
    """Print ``doc`` as the command's JSON output (``--json``)."""
    click.echo(json.dumps(doc, indent=2, sort_keys=False))
