"""Fixtures shared by every test module.

Area-specific helpers live in `tests/support_*.py` modules so that the agent, broker, NBD and PKI
suites can grow side by side without editing one file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Undo any logging configuration a test made (a CLI run in-process, `configure_logging`),
    so that a level set by one test cannot filter the events another test captures."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
