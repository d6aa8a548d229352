"""Requests and responses over MQTT: commands to a daemon, answers to whoever asked.

The lab's amqtt speaks MQTT 3.1.1 only (no response-topic or correlation properties), so both
travel in the payload: a :class:`common.topics.Request` carries an id and an expiry, the answer
goes to the requester's own reply topic (:func:`common.topics.replies`, derived from the
certificate that signed the request, never from anything the request says) and carries the same
id. Both are signed like every record (:mod:`common.signedrecord`): the server knows who asks, the
client accepts an answer only from the daemon it asked.

Adding a command is one call: ``server.command("status", handler, roles=("admin", "broker"))``
with ``async def handler(args, requester) -> dict``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from common import topics
from common.errors import ReplikantError
from common.logs import get_logger
from common.mqtt import MQTTLink
from common.tls.identities import Identity, Role

log = get_logger("replikant.mqttrpc")

Handler = Callable[[dict[str, Any], Identity], Awaitable[dict[str, Any]]]
"""``handler(args, requester)``: the result, or raise :class:`ReplikantError` (message, fix)."""


class RPCError(ReplikantError):
    """A request that was refused, failed, or not answered in time."""


def request_topic(target: Identity) -> str:
    """Where requests to ``target`` go (agents only, for now)."""
    if target.role != "agent":
        raise RPCError(
            f"{target} takes no requests over MQTT", fix="address an agent: Identity.agent(HOST)"
        )
    return topics.requests(target.name)


@dataclass(frozen=True)
class _Command:
    handler: Handler
    roles: frozenset[Role]


class RPCServer:
    """Answers the requests that arrive on ``topic`` with the registered commands."""

    def __init__(self, link: MQTTLink, topic: str, *, timeout: float = 30.0) -> None:
        self.link = link
        self.topic = topic
        self._commands: dict[str, _Command] = {}
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        link.subscribe_signed(topic, topics.Request, self._on_request)

    def command(
        self, name: str, handler: Handler, *, roles: Collection[Role] = ("admin", "broker")
    ) -> None:
        """Answer requests for ``name`` with ``handler`` when the requester's role is in
        ``roles``."""
        self._commands[name] = _Command(handler, frozenset(roles))

    def _on_request(
        self, _topic: str, request: topics.Request | None, requester: Identity | None
    ) -> None:
        if request is None:
            return
        if requester is None:
            # A link without a verifier cannot say who asks, so it answers nobody.
            log.warning("rpc_request_refused", id=request.id, reason="unsigned")
            return
        if request.expires < time.time():
            log.info("rpc_request_expired", id=request.id, requester=requester.uri)
            return
        task = asyncio.get_running_loop().create_task(self._answer(request, requester))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: topics.Request, requester: Identity) -> None:
        response = await self._run(request, requester)
        await self.link.publish(topics.replies(requester), response)

    async def _run(self, request: topics.Request, requester: Identity) -> topics.Response:
        bound = log.bind(id=request.id, command=request.command, requester=requester.uri)
        spec = self._commands.get(request.command)
        if spec is None:
            known = ", ".join(sorted(self._commands))
            bound.warning("rpc_request_refused", reason="unknown_command")
            return topics.Response(
                id=request.id,
                ok=False,
                error=f"unknown command {request.command!r}",
                fix=f"use one of: {known} (is the daemon of the same release?)",
            )
        if requester.role not in spec.roles:
            bound.warning("rpc_request_refused", reason="wrong_role")
            return topics.Response(
                id=request.id,
                ok=False,
                error=f"{requester} may not run {request.command!r}",
                fix=f"ask with a certificate of role {' or '.join(sorted(spec.roles))}",
            )
        try:
            async with asyncio.timeout(self._timeout):
                result = await spec.handler(dict(request.args), requester)
        except ReplikantError as exc:
            bound.warning("rpc_request_failed", error=exc.message)
            return topics.Response(id=request.id, ok=False, error=exc.message, fix=exc.fix)
        except TimeoutError:
            bound.warning("rpc_request_failed", error="timeout")
            return topics.Response(
                id=request.id,
                ok=False,
                error=f"{request.command!r} took longer than {self._timeout:g} s",
                fix="see the daemon's log",
            )
        bound.info("rpc_request_answered")
        return topics.Response(id=request.id, ok=True, result=result)


class RPCClient:
    """Sends requests as ``me`` (the identity of the link's signer) and waits for answers."""

    def __init__(self, link: MQTTLink, me: Identity) -> None:
        self.link = link
        self._pending: dict[str, tuple[asyncio.Future[topics.Response], Identity]] = {}
        link.subscribe_signed(topics.replies(me), topics.Response, self._on_response)

    async def call(
        self,
        target: Identity,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        within: float = 5.0,
    ) -> dict[str, Any]:
        """Run ``command`` on ``target`` and return its result; :class:`RPCError` when refused,
        failed, or not answered ``within`` seconds (the message names ``target``)."""
        request = topics.Request(
            id=secrets.token_hex(8),
            command=command,
            args=args or {},
            expires=time.time() + within,
        )
        future: asyncio.Future[topics.Response] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = (future, target)
        try:
            async with asyncio.timeout(within):
                await self.link.wait_connected()
                await self.link.publish(request_topic(target), request)
                response = await future
        except TimeoutError:
            raise RPCError(
                f"{target} did not answer {command!r} within {within:g} s",
                fix=f"check that the {target.role} on {target.name} runs with an [mqtt] section "
                f"for this MQTT broker (its presence record: {topics.host(target.name)})",
            ) from None
        finally:
            self._pending.pop(request.id, None)
        if not response.ok:
            raise RPCError(f"{target}: {response.error}", fix=response.fix)
        return response.result or {}

    def _on_response(
        self, _topic: str, response: topics.Response | None, sender: Identity | None
    ) -> None:
        if response is None:
            return
        entry = self._pending.get(response.id)
        if entry is None:
            log.debug("rpc_response_unexpected", id=response.id)
            return
        future, target = entry
        if sender != target:
            log.warning(
                "rpc_response_forged",
                id=response.id,
                expected=target.uri,
                claimed=sender.uri if sender else None,
            )
            return
        if not future.done():
            future.set_result(response)
