"""Structured logging for every Replikant process.

JSON lines when stderr is not a terminal (systemd, CI, log shippers), coloured key=value output on
a terminal. The standard library's ``logging`` (aiohttp, aiomqtt, amqtt) is routed through the same
processors, so one process writes one format. Context such as ``vm``, ``disk``, ``seq``,
``generation``, ``epoch`` and ``peer`` is bound with :func:`structlog.contextvars.bind_contextvars`
or ``log.bind(...)`` and shows up on every event, a library's stdlib records included
(``merge_contextvars`` runs for both). Each broker request binds its method, path and peer this
way, and each agent worker task its VM; per-replica loggers bind vm and disk once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_SHARED_PROCESSORS: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(
    *, level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and stdlib logging for a Replikant process.

    ``json=None`` picks JSON unless ``stream`` is a terminal. Safe to call more than once (the
    last call wins), which the CLI relies on when a sub-command overrides the level.
    """
    out = stream if stream is not None else sys.stderr
    use_json = not out.isatty() if json is None else json
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiohttp's access log is one line per request: the batch endpoint logs its own events.
    logging.getLogger("aiohttp.access").setLevel(max(numeric, logging.WARNING))

    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """Return a logger named ``name`` with ``context`` bound to every event it logs."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger.bind(**context) if context else logger
