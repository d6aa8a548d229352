"""Failover of a real Linux guest between the lab's two sites (issue 13 acceptance).

The demo VM gets a ``[vms.hypervisor]`` section at each site (qemu, the test kernel and busybox
initramfs of :mod:`tests.support_guest`). Each guest hashes a region, writes incompressible data
after it and waits for the power button: the guest moves primary -> recovery by `failover
planned`, back by `failover planned`, then to the recovery site again by `failover unplanned`
after kill -9 of the whole primary site; each boot's hash proves it sees exactly what was written
before the switch, and the bytes on the wire prove no switch copied a disk in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support_guest import (
    console_value,
    guest_image,
    pattern,
    sha256,
    wait_console,
)
from tests.test_failover_sites import (
    _agent_shipped,
    _cli,
    _differing_bytes,
    _guest_call,
    _roles,
    _run,
    _same,
    _shipped,
    _steps,
    _wait,
    _with_guest,
    _write,
    lab,
)

__all__ = ["lab"]

pytestmark = [pytest.mark.timeout(240)]

OFF = 1 << 20
LEN = 256 * 1024
FIRST, SECOND, THIRD = "noise@0", f"noise@{LEN}", f"noise@{2 * LEN}"


def _stop_agent(root: Path, name: str) -> None:
    pid = json.loads((root / "lab.json").read_text())["processes"][name]
    os.kill(pid, signal.SIGTERM)
    _wait(f"{name} to stop", lambda: not _alive(pid), limit=20)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead: nothing reaps the lab's orphans here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


def _start_site(root: Path, site: str) -> None:
    res = _run("lab", "start", "--dir", str(root), "--site", site)
    assert res.returncode == 0, res.stderr


def _console(root: Path, site: str) -> Path:
    return root / site / "state" / "guests" / "demo1" / "main" / "console.log"


def _kill_site(root: Path, site: str) -> int:
    """kill -9 of every daemon of ``site`` and of its guest's qemu (whose pid it returns)."""
    qemu = int((_console(root, site).parent / "qemu.pid").read_text())
    pids = [*json.loads((root / "lab.json").read_text())["pids"][site], qemu]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _wait(f"site {site} to die", lambda: not any(_alive(p) for p in pids), limit=20)
    return qemu


def _stop_guests(lab: dict[str, Any]) -> None:
    """No guest outlives the test, whatever failed: stopped by its agent, else killed."""
    for site in ("primary", "recovery"):
        sock = lab["sites"][site]["agent_control_socket"]
        with contextlib.suppress(aiohttp.ClientError, OSError):
            asyncio.run(_guest_call(sock, "POST", "/v1/guests/demo1/stop"))
        run_dir = _console(Path(lab["root"]), site).parent
        with contextlib.suppress(OSError, ValueError):
            pid = int((run_dir / "qemu.pid").read_text())
            # Only our qemu: its command line names its run directory (a pid may be reused).
            if _alive(pid) and str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def _hash_seen(root: Path, site: str) -> str:
    text = wait_console(_console(root, site), "RK-DONE")
    return console_value(text, "RK-HASH")


@pytest.mark.qemu
@pytest.mark.slow
def test_a_guest_keeps_its_data_through_failover_failback_and_site_loss(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """A guest sees exactly the data written before each switch (planned failover, planned
    failback, unplanned failover after kill -9 of its site), the lost site stays FENCED when it
    returns, and every reverse ships at most 1.1x the bytes that changed."""
    guest = guest_image()
    root = Path(lab["root"])
    d0, d1 = lab["vms"][0]["disks"]
    # Each guest hashes [OFF, OFF + n * LEN) and then writes its own LEN bytes after that.
    _with_guest(root / "agent.toml", guest, op="read", off=OFF, len=2 * LEN,
                woff=OFF, wlen=LEN, wseed=FIRST)  # fmt: skip
    _with_guest(root / "agent-recovery.toml", guest, op="read", off=OFF, len=LEN,
                woff=OFF + LEN, wlen=LEN, wseed=SECOND)  # fmt: skip
    for name in ("agent", "agent-recovery"):
        _stop_agent(root, name)
    for site in ("primary", "recovery"):
        _start_site(root, site)
    primary = lab["sites"]["primary"]["agent_control_socket"]
    recovery = lab["sites"]["recovery"]["agent_control_socket"]
    try:
        refused = asyncio.run(_guest_call(recovery, "POST", "/v1/guests/demo1/start"))
        assert refused[0] == 409, refused
        assert "REPLICA" in refused[1]["message"], refused
        found = Path(d0["source_image"]).read_bytes()[OFF : OFF + 2 * LEN]  # the lab's own data
        started = asyncio.run(_guest_call(primary, "POST", "/v1/guests/demo1/start"))
        assert started[0] == 200, started
        assert _hash_seen(root, "primary") == sha256(found)

        # Planned failover: the guest at the recovery site reads the first data, adds its own.
        steps = _steps(_cli(lab, "failover", "planned", "demo1", "--json"))
        names = [s["step"] for s in steps]
        assert "site recovery: guest started" in names
        down = next(s for s in steps if s["step"] == "site primary: guest shut down")
        assert down["how"] == "powerdown", down
        assert _hash_seen(root, "recovery") == sha256(pattern(FIRST, LEN))
        assert _roles(lab) == {"primary": "REPLICA", "recovery": "PRIMARY"}
        again = asyncio.run(_guest_call(primary, "POST", "/v1/guests/demo1/start"))
        assert again[0] == 409, again
        assert "REPLICA" in again[1]["message"], again
        _wait("reverse replication of the guest's writes", lambda: _same(lab))
        # The promoted agent's replicators started at the promotion: all they shipped is the
        # reverse, and the guest's data is incompressible.
        reversed_ = asyncio.run(_agent_shipped(recovery))
        assert LEN <= reversed_ <= 1.1 * LEN, reversed_

        # Planned failback: the guest at the primary site reads both sites' data.
        steps = _steps(_cli(lab, "failover", "planned", "demo1", "--json"))
        assert _roles(lab) == {"primary": "PRIMARY", "recovery": "REPLICA"}
        both = pattern(FIRST, LEN) + pattern(SECOND, LEN)
        assert _hash_seen(root, "primary") == sha256(both)
        # The failback's reverse carries at most the guest's rewrite of its first data.
        assert _shipped(steps) <= 1.1 * LEN, steps
        assert Path(d0["source_image"]).read_bytes()[OFF : OFF + 2 * LEN] == both

        # The recovery site's guest will check for both and add a third region.
        _stop_agent(root, "agent-recovery")
        _with_guest(root / "agent-recovery.toml", guest, op="read", off=OFF, len=2 * LEN,
                    woff=OFF + 2 * LEN, wlen=LEN, wseed=THIRD)  # fmt: skip
        _start_site(root, "recovery")
        _wait("the replica in step", lambda: _same(lab))
        qemu = _kill_site(root, "primary")

        steps = _steps(_cli(lab, "failover", "unplanned", "demo1", "--json"))
        assert "site recovery: guest started" in [s["step"] for s in steps]
        assert _hash_seen(root, "recovery") == sha256(both)
        _start_site(root, "primary")
        refused_write = _write(d0["nbd_uris"]["primary"], 0, b"y" * 4096, tmp_path)
        assert "Operation not permitted" in refused_write.stdout + refused_write.stderr
        assert _roles(lab).get("primary") == "FENCED"
        status, doc = asyncio.run(_guest_call(primary, "POST", "/v1/guests/demo1/start"))
        assert status == 409, doc
        assert "FENCED" in doc["message"], doc
        assert "replikant reverse demo1" in doc["fix"], doc
        # No qemu was launched: a start would have replaced the killed guest's pid file.
        assert (_console(root, "primary").parent / "qemu.pid").read_text().strip() == str(qemu)

        _steps(_cli(lab, "failover", "commit", "demo1", "--json"))
        differing = sum(_differing_bytes(d["replica_image"], d["source_image"]) for d in (d0, d1))
        assert differing == LEN, differing
        steps = _steps(_cli(lab, "reverse", "demo1", "--json"))
        _wait("both sites byte-identical", lambda: _same(lab))
        third = Path(d0["source_image"]).read_bytes()[OFF + 2 * LEN : OFF + 3 * LEN]
        assert third == pattern(THIRD, LEN), "the old primary lacks the new primary's writes"
        shipped = asyncio.run(_agent_shipped(recovery))
        assert _shipped(steps) <= shipped
        assert LEN <= shipped <= 1.1 * differing, (shipped, differing)
        assert _roles(lab) == {"primary": "REPLICA", "recovery": "PRIMARY"}
    finally:
        _stop_guests(lab)
