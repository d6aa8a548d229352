"""How the broker's HTTP API fails: every :class:`~broker.errors.BrokerError` a handler raises
becomes the JSON refusal body of docs/protocol/http.md with its status code and one logged event;
a client that goes away, a request aiohttp cannot parse and a bug each get one event too."""

from __future__ import annotations

import logging
from typing import Final, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from broker.authz import json_body
from broker.errors import BadRequest, BrokerError
from common.logs import get_logger
from common.tls import TLSIdentityError, peer_identity

M = TypeVar("M", bound=BaseModel)

_log = get_logger("broker.ingest")


def json_error(exc: BrokerError) -> web.Response:
    """The refusal body of ``exc`` (docs/protocol/http.md) with its status code."""
    return web.json_response(exc.body(), status=exc.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn whatever a handler raises into one logged event and a JSON answer.

    Every event logged while the request runs (ours, the handler's, aiohttp's) carries its
    method, path and peer, bound once here as context variables.
    """
    peer = peer_text(request)  # now: once the client is gone its certificate is too
    with structlog.contextvars.bound_contextvars(
        method=request.method, path=request.path, peer=peer
    ):
        return await _answer(request, handler)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException:
        raise
    except CLIENT_GONE as exc:
        # The peer went away (reset, closed mid-body, broken chunking): nothing to answer.
        _log.warning("request_aborted", reason=reason_text(exc))
        raise web.HTTPBadRequest(text="request aborted") from None
    except BrokerError as exc:
        _log.warning("request_refused", error=exc.code, status=exc.status, detail=exc.message)
        return json_error(exc)
    except Exception as exc:
        # A bug, not the peer's fault: one event with the traceback, and a JSON 500 that says so.
        _log.exception("request_failed")
        internal = BrokerError(
            f"the broker failed on {request.method} {request.path}: {type(exc).__name__}",
            fix="this is a broker bug: report it with the broker log's request_failed event",
        )
        return json_error(internal)
    return response


CLIENT_GONE: Final = (ConnectionError, RequestPayloadError, HttpProcessingError)
"""What reading a request raises when the client resets, closes early or breaks the framing."""


class _OneEventPerProtocolError(logging.Filter):
    """aiohttp reports a request it cannot parse (bad request line, overlong header, broken
    chunking) with a traceback of its own parser: log one event naming the peer and the reason
    instead; the client already got aiohttp's 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        _log.warning("http_request_malformed", remote=str(remote), reason=reason_text(exc))
        return False


HTTP_LOG: Final = logging.getLogger("broker.http")
"""The logger aiohttp's request handler reports to (``AppRunner(logger=HTTP_LOG)``)."""
HTTP_LOG.addFilter(_OneEventPerProtocolError())


def reason_text(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` for a log event."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def peer_text(request: web.Request) -> str | None:
    """The peer's identity URI for a log event (None when it has none)."""
    try:
        return str(peer_identity(request))
    except (TLSIdentityError, TypeError):
        return None


async def model_body(request: web.Request, model: type[M], what: str) -> M:
    """The request's JSON body (:func:`broker.authz.json_body`) as ``model``; a 400 naming
    ``what`` and the field at fault otherwise."""
    try:
        return model.model_validate(await json_body(request))
    except ValidationError as exc:
        raise body_error(what, exc) from None
    except ValueError as exc:
        raise BadRequest(f"{what}: not JSON ({exc})") from None


def body_error(what: str, exc: ValidationError) -> BadRequest:
    """A request body that fails validation, as a refusal naming its first wrong field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(body)"
    return BadRequest(
        f"{what}: {field}: {first['msg']}",
        fix=f"correct {field} as the message says (docs/protocol/http.md)",
        details={"field": field, "rule": first["msg"], "errors": exc.error_count()},
    )
