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
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from tests.support_guest import (
    GuestImage,
    console_value,
    guest_image,
    pattern,
    sha256,
    wait_console,
)
from tests.test_failover_sites import _cli, _roles, _run, _same, _steps, lab

__all__ = ["lab"]

pytestmark = [pytest.mark.timeout(180)]

OFF = 1 << 20
LEN = 256 * 1024


def _with_guest(config: Path, guest: GuestImage, **ops: str | int) -> None:
    doc = tomllib.loads(config.read_text())
    doc["vms"][0]["hypervisor"] = {
        "driver": "qemu",
        "machine": "pc",
        "memory_mib": 192,
        "disk_bus": "nvme",
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "append": guest.append(**ops),
        "extra_args": ["-no-reboot"],
        "stop_timeout_seconds": 20,
    }
    config.write_bytes(tomli_w.dumps(doc).encode())


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


async def _guest_call(sock: str, method: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s,
        s.request(method, "http://agent" + path, json={}) as resp,
    ):
        return resp.status, await resp.json()


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
    stopped = await _guest_call(recovery, "POST", "/v1/guests/demo1/stop")
    assert stopped[0] == 200, stopped
