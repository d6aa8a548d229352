"""The agent's shipping process (decision 029): what sits in the agent's working directory is
never imported by it, and it listens on nothing.

The agent starts it as ``python -P -m agents.shipd``; without ``-P``, ``-m`` puts the working
directory first on the module path, so an ``agents`` package planted there would run as the
agent's user with the agent's certificate.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.security.rows import Door
from tests.support_agent import MiB, wait_for
from tests.test_agent_ship import make_rig
from tests.test_shipproc import _tcp_ports

pytestmark = pytest.mark.timeout(120)


async def test_a_planted_agents_package_is_never_run(
    tmp_path: Path, door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``agents/shipd.py`` in the working directory never runs; the real process ships."""
    planted = tmp_path / "cwd"
    (planted / "agents").mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "agents" / "__init__.py").write_text("")
    (planted / "agents" / "shipd.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    )
    monkeypatch.chdir(planted)
    rig = await make_rig(tmp_path / "rig")
    try:
        await rig.start()
        await rig.write(("write", 2 * MiB, os.urandom(64 * 1024)))
        await wait_for(rig.settled, "the replica to converge through the shipping process", 60)
        assert rig.agent is not None
        assert rig.agent.uploader is not None
        pid = rig.agent.uploader.shipper.pid
        assert pid is not None
        door.attempt(
            "agent's shipping process",
            "plant agents/shipd.py in the agent's working directory",
            expected="never imported; batches shipped by the real process",
            observed="ran" if marker.exists() else "not run, replica converged",
            refused=not marker.exists(),
        )
        listening = _tcp_ports(pid, listening=True)
        door.attempt(
            "agent's shipping process",
            "find a TCP listener of the shipping process",
            expected="none",
            observed=f"{len(listening)} TCP listening sockets",
            refused=not listening,
        )
    finally:
        await rig.halt()
        await rig.rx.stop()
