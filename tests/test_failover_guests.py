"""Planned failover of a real Linux guest between the lab's two sites (issue 13 acceptance).

The demo VM gets a ``[vms.hypervisor]`` section at each site (qemu, the test kernel and busybox
initramfs of :mod:`tests.support_guest`): at the primary site its guest writes a pattern and
waits for the power button; `failover planned` shuts it down through the driver, proves zero lag,
promotes, and boots the guest at the recovery site, where it reads the region back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support_guest import (
    console_value,
    guest_image,
    pattern,
    sha256,
    wait_console,
)
from tests.test_failover_sites import (
    _cli,
    _guest_call,
    _roles,
    _run,
    _same,
    _steps,
    _with_guest,
    lab,
)

__all__ = ["lab"]

pytestmark = [pytest.mark.timeout(180)]

OFF = 1 << 20
LEN = 256 * 1024


def _restart_agents(lab: dict[str, Any]) -> None:
    root = Path(lab["root"])
    pids = json.loads((root / "lab.json").read_text())["processes"]
    for name in ("agent", "agent-recovery"):
        os.kill(pids[name], signal.SIGTERM)
    deadline = time.monotonic() + 20
    for name in ("agent", "agent-recovery"):
        while Path(f"/proc/{pids[name]}").exists():
            assert time.monotonic() < deadline, f"{name} did not stop"
            time.sleep(0.1)
    for site in ("primary", "recovery"):
        res = _run("lab", "start", "--dir", str(root), "--site", site)
        assert res.returncode == 0, res.stderr


@pytest.mark.qemu
@pytest.mark.slow
async def test_planned_failover_moves_a_running_guest_with_its_data(lab: dict[str, Any]) -> None:
    """A guest's writes at the primary site are what the same guest reads after a planned
    failover at the recovery site; the old site then refuses to start it."""
    guest = guest_image()
    root = Path(lab["root"])
    _with_guest(root / "agent.toml", guest, op="write", off=OFF, len=LEN, seed="before-switch")
    _with_guest(root / "agent-recovery.toml", guest, op="read", off=OFF, len=LEN)
    _restart_agents(lab)
    primary = lab["sites"]["primary"]["agent_control_socket"]
    recovery = lab["sites"]["recovery"]["agent_control_socket"]

    try:
        refused = await _guest_call(recovery, "POST", "/v1/guests/demo1/start")
        assert refused[0] == 409, refused
        assert "REPLICA" in refused[1]["message"], refused
        started = await _guest_call(primary, "POST", "/v1/guests/demo1/start")
        assert started[0] == 200, started
        main = root / "primary" / "state" / "guests" / "demo1" / "main" / "console.log"
        wait_console(main, "RK-DONE")

        steps = _steps(_cli(lab, "failover", "planned", "demo1", "--json"))
        names = [s["step"] for s in steps]
        assert "site primary: guest shut down" in names
        assert "site recovery: guest started" in names
        assert next(s for s in steps if s["step"] == "site primary: guest shut down")["how"] == (
            "powerdown"
        )
        assert _same(lab)
        moved = root / "recovery" / "state" / "guests" / "demo1" / "main" / "console.log"
        text = wait_console(moved, "RK-HASH")
        assert console_value(text, "RK-HASH") == sha256(pattern("before-switch", LEN))
        assert _roles(lab) == {"primary": "REPLICA", "recovery": "PRIMARY"}
        again = await _guest_call(primary, "POST", "/v1/guests/demo1/start")
        assert again[0] == 409, again
        assert "REPLICA" in again[1]["message"], again
    finally:
        for sock in (primary, recovery):  # no guest outlives the test, whatever failed
            await _guest_call(sock, "POST", "/v1/guests/demo1/stop")
