"""Logs are JSON lines off a terminal, with bound context and stdlib records routed through."""

from __future__ import annotations

import io
import json
import logging

import structlog

from common.logs import configure_logging, get_logger


def test_json_lines_carry_bound_context_and_iso_time() -> None:
    """Bound vm/disk/seq context shows up on every event as JSON fields."""
    out = io.StringIO()
    configure_logging(level="debug", stream=out)
    log = get_logger("replikant.test", vm="web1", disk="disk0")
    structlog.contextvars.bind_contextvars(generation=3)
    try:
        log.info("batch_applied", seq=42)
    finally:
        structlog.contextvars.clear_contextvars()
    record = json.loads(out.getvalue().strip().splitlines()[-1])
    assert record["event"] == "batch_applied"
    assert (record["vm"], record["disk"], record["seq"], record["generation"]) == (
        "web1",
        "disk0",
        42,
        3,
    )
    assert record["level"] == "info"
    assert record["timestamp"].endswith("Z")


def test_stdlib_logging_is_routed_through_the_same_renderer() -> None:
    """A record from a library using stdlib logging comes out as JSON too."""
    out = io.StringIO()
    configure_logging(level="info", stream=out)
    logging.getLogger("aiohttp.server").warning("peer went away")
    record = json.loads(out.getvalue().strip().splitlines()[-1])
    assert record == record | {"event": "peer went away", "level": "warning"}
    assert record["logger"] == "aiohttp.server"


def test_level_filters_debug_events() -> None:
    """Events below the configured level are dropped."""
    out = io.StringIO()
    configure_logging(level="warning", stream=out)
    get_logger("replikant.test").info("cut_taken")
    assert out.getvalue() == ""


def test_context_variables_reach_library_records_too() -> None:
    """Context bound as context variables shows up on a stdlib (library) record as well."""
    out = io.StringIO()
    configure_logging(level="info", stream=out)
    with structlog.contextvars.bound_contextvars(peer="replikant://agent/h1", path="/v1/status"):
        logging.getLogger("aiohttp.server").warning("peer went away")
    logging.getLogger("aiohttp.server").warning("after the request")
    inside, after = (json.loads(line) for line in out.getvalue().strip().splitlines()[-2:])
    assert (inside["peer"], inside["path"]) == ("replikant://agent/h1", "/v1/status")
    assert "peer" not in after
