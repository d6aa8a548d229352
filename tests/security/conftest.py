"""The security suite's one rule: every attempt is refused, and every attempt prints its row.

A test records each attempt it makes with the ``door`` fixture: what was tried, the refusal we
expect, what was observed, and whether it was refused. An accepted attempt fails the test at
once; at the end of the run the terminal summary prints every row (attempt, expected refusal,
observed), so a reader of the CI log sees the whole wall, not only its cracks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.security.rows import Door, all_rows
from tests.support_broker import PKI, make_pki, running_broker

if TYPE_CHECKING:
    from broker.service import BrokerService


@pytest.fixture
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    """A recorder of attempts for one test; the test fails on the first accepted attempt."""
    d = Door(test=request.node.nodeid)
    yield d
    if not d.rows:
        pytest.fail("a security test must record at least one attempt with door.attempt(...)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA with a broker, agents h1/h2/h3, admin alice and a foreign-CA agent."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def broker(pki: PKI, tmp_path: Path) -> AsyncIterator[BrokerService]:
    """An in-process broker with an empty store under ``tmp_path``."""
    async with running_broker(pki, tmp_path / "store") as svc:
        yield svc


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = all_rows()
    if not rows:
        return
    terminalreporter.section("security: attempts and what stopped them")
    for row in rows:
        terminalreporter.line(row.text())
