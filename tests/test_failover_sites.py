"""Failover between the lab's two sites, end to end with real daemons (issue 13).

Every test brings up the two-site lab (`replikant lab up`: per site a broker and an agent, one
PKI), writes incompressible data through the VM's NBD exports with ``qemu-io`` (the hypervisor
driver is not part of this lane yet: qemu-io stands in for the guest's writes), runs the
``replikant failover`` / ``reverse`` commands as an operator would, and compares the images at
both sites byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from common import topics
from common.config import TLSFiles
from common.tls.contexts import client_context
from ops.lab import AGENT_HOST
from ops.labsites import RECOVERY_AGENT_HOST
from tests.support_guest import GuestImage, guest_image
from tests.support_mqtt import read_retained, record_of

REPLIKANT = str(Path(sys.executable).with_name("replikant"))
BLOCK = 64 * 1024


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REPLIKANT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _cli(lab: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return _run("--config", lab["config"], *args)


@pytest.fixture
def lab(tmp_path: Path) -> Any:
    """A two-site lab with one VM of two 8 MiB disks, replicating every half second."""
    root = tmp_path / "lab"
    up = _run("lab", "up", "--dir", str(root), "--vms", "1", "--disk-mib", "8",
              "--interval", "0.5", "--detach")  # fmt: skip
    assert up.returncode == 0, up.stderr
    doc = json.loads((root / "lab.json").read_text())
    doc["root"] = str(root)
    yield doc
    _run("lab", "down", "--dir", str(root))


def _write(uri: str, offset: int, data: bytes, scratch: Path) -> subprocess.CompletedProcess[str]:
    """Write ``data`` at ``offset`` through the NBD export ``uri`` with qemu-io."""
    src = scratch / f"w{offset}-{len(data)}.bin"
    src.write_bytes(data)
    cmd = f"write -s {src} {offset} {len(data)}"
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", cmd, uri],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _write_ok(uri: str, offset: int, data: bytes, scratch: Path) -> None:
    res = _write(uri, offset, data, scratch)
    assert res.returncode == 0, res
    assert "failed" not in res.stdout + res.stderr, res


def _differing_bytes(a: str, b: str) -> int:
    """Bytes in the 64 KiB blocks where two images differ."""
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if not x and not y:
                return n
            n += len(x) if x != y else 0


def _same(lab: dict[str, Any]) -> bool:
    disks = lab["vms"][0]["disks"]
    return all(
        Path(d["source_image"]).read_bytes() == Path(d["replica_image"]).read_bytes() for d in disks
    )


def _wait(what: str, check: Any, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _roles(lab: dict[str, Any], *, agents: bool = True) -> dict[str, str]:
    """The VM's roles by site as `status` shows them (``agents=False``: from a machine that
    reaches the brokers but no agent's control socket)."""
    config = Path(lab["config"])
    if not agents:
        doc = tomllib.loads(config.read_text())
        doc["admin"]["agents"] = []
        config = config.with_name("admin-brokers-only.toml")
        config.write_text(tomli_w.dumps(doc))
    res = _run("--config", str(config), "status", "--json")
    assert res.returncode == 0, res.stderr
    roles: dict[str, str] = json.loads(res.stdout)["vms"][0]["roles"]
    return roles


def _host_vm(lab: dict[str, Any], host: str) -> dict[str, Any]:
    """Demo1 in ``host``'s retained host record on the lab's MQTT (checked against the CA),
    once that record is online."""
    tls = TLSFiles(**tomllib.loads(Path(lab["config"]).read_text())["tls"])
    topic, port = topics.host(host), int(lab["mqtt"].rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while True:
        payload = asyncio.run(read_retained(port, topic, client_context(tls), window=1.0))
        record = record_of(tls.ca, topic, payload) if payload else None
        if (record is not None and record["online"]) or time.monotonic() > deadline:
            assert record is not None, f"no retained record on {topic}"
            vm: dict[str, Any] = next(v for v in record["vms"] if v["name"] == "demo1")
            return vm
        time.sleep(0.5)


def _steps(res: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"], doc
    assert [v["result"] for v in doc["vms"]] == ["ok"], doc
    steps: list[dict[str, Any]] = doc["vms"][0]["steps"]
    return steps


def _shipped(steps: list[dict[str, Any]]) -> int:
    return int(next(s["bytes_shipped"] for s in steps if "bytes_shipped" in s))


async def _agent_disks(sock: str) -> dict[str, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s,
        s.get("http://agent/v1/status") as resp,
    ):
        doc = await resp.json()
    return {d["disk"]: d for d in doc["disks"]}


async def _agent_shipped(sock: str) -> int:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s,
        s.get("http://agent/v1/status") as resp,
    ):
        doc = await resp.json()
    return sum(int(d["bytes_shipped"]) for d in doc["disks"])


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


async def _guest_call(sock: str, method: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s,
        s.request(method, "http://agent" + path, json={}) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.qemu
@pytest.mark.slow
def test_planned_failover_then_failback_keeps_every_write(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """Planned failover then planned failback: each site holds exactly the data written before
    each switch, and reverse replication ships at most 1.1x the bytes that changed."""
    vm = lab["vms"][0]
    d0, d1 = vm["disks"]
    commit = _cli(lab, "failover", "commit", "demo1")
    assert commit.returncode == 1
    assert "REPLICA" in commit.stderr
    assert "failover unplanned demo1" in commit.stderr

    _write_ok(d0["nbd_uris"]["primary"], 1 << 20, os.urandom(3 * BLOCK), tmp_path)
    _write_ok(d1["nbd_uris"]["primary"], 5 << 20, os.urandom(BLOCK), tmp_path)
    steps = _steps(_cli(lab, "failover", "planned", "demo1", "--json"))
    assert any(s["step"] == "final cut shipped and compared" and s["differing_blocks"] == 0
               for s in steps)  # fmt: skip
    assert _same(lab), "the recovery site lacks writes made before the switch"
    assert _roles(lab) == {"primary": "REPLICA", "recovery": "PRIMARY"}
    # The old primary serves nothing any more: no write can reach its image.
    assert _write(d0["nbd_uris"]["primary"], 0, b"x" * 4096, tmp_path).returncode != 0

    recovery_agent = lab["sites"]["recovery"]["agent_control_socket"]
    before = asyncio.run(_agent_shipped(recovery_agent))
    changed = 6 * BLOCK
    _write_ok(d0["nbd_uris"]["recovery"], 2 << 20, os.urandom(4 * BLOCK), tmp_path)
    _write_ok(d1["nbd_uris"]["recovery"], 0, os.urandom(2 * BLOCK), tmp_path)
    _wait("reverse replication into the primary site's images", lambda: _same(lab))
    _wait(
        "the recovery agent's counters",
        lambda: asyncio.run(_agent_shipped(recovery_agent)) - before >= changed,
        limit=10,
    )
    shipped = asyncio.run(_agent_shipped(recovery_agent)) - before
    assert shipped <= 1.1 * changed, (shipped, changed)

    _steps(_cli(lab, "failover", "planned", "demo1", "--json"))
    assert _same(lab), "the primary site lacks writes made at the recovery site"
    assert _roles(lab) == {"primary": "PRIMARY", "recovery": "REPLICA"}
    _write_ok(d0["nbd_uris"]["primary"], 3 << 20, os.urandom(BLOCK), tmp_path)
    _wait("replication from the primary site again", lambda: _same(lab))


@pytest.mark.qemu
@pytest.mark.slow
def test_unplanned_failover_fences_the_old_site_and_reverse_ships_only_differences(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """After kill -9 of the whole primary site and an unplanned failover, the restarted old site
    stays FENCED (its exports refuse writes), and `reverse` makes both sides byte-identical
    shipping at most 1.1x the bytes that differ, hashing only the regions the change maps name
    (the whole disk only where the old primary's map was deleted, saying so)."""
    d0, d1 = lab["vms"][0]["disks"]
    _write_ok(d0["nbd_uris"]["primary"], 1 << 20, os.urandom(2 * BLOCK), tmp_path)
    _wait("the first writes at the recovery site", lambda: _same(lab))
    _write_ok(d1["nbd_uris"]["primary"], 6 << 20, os.urandom(2 * BLOCK), tmp_path)  # may be lost
    _write_ok(d0["nbd_uris"]["primary"], 5 << 20, os.urandom(BLOCK), tmp_path)  # may be lost
    for pid in lab["pids"]["primary"]:
        os.kill(pid, signal.SIGKILL)

    reverse = _cli(lab, "reverse", "demo1")
    assert reverse.returncode == 1
    assert "cannot be reached" in reverse.stderr or "REPLICA" in reverse.stderr, reverse.stderr

    # Two failovers of one VM at once: exactly one wins, the other names the state.
    both = [
        subprocess.Popen([REPLIKANT, "--config", lab["config"], "failover", "unplanned", "demo1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(60), *p.communicate()) for p in both]
    assert sorted(r[0] for r in results) == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    # The loser may arrive after the winner's agent already serves the VM: PRIMARY there.
    named = ("FAILED-OVER", "in progress", "already", "is PRIMARY at site recovery")
    assert any(n in loser[2] for n in named), loser
    # Once the winner is done, a failover (or a test copy) of the VM that is no longer a replica
    # here is refused naming its state and the commands that end it.
    for again in (("unplanned", "demo1"), ("test", "demo1")):
        refused = _cli(lab, "failover", *again)
        assert refused.returncode == 1, refused
        said = refused.stdout + refused.stderr
        assert "is FAILED-OVER at site recovery" in said, said
        assert "failover commit demo1" in said, said

    _write_ok(d0["nbd_uris"]["recovery"], 3 << 20, os.urandom(3 * BLOCK), tmp_path)
    # The old site comes back with a guest configured for the VM: its start must be refused.
    _with_guest(Path(lab["root"]) / "agent.toml", guest_image(), op="read", off=0, len=4096)
    started = _run("lab", "start", "--dir", lab["root"], "--site", "primary")
    assert started.returncode == 0, started.stderr
    # The agent asked its broker before serving: fenced from its first request on, no window.
    refused = _write(d0["nbd_uris"]["primary"], 0, b"y" * 4096, tmp_path)
    assert "Operation not permitted" in refused.stdout + refused.stderr, refused
    assert _roles(lab).get("primary") == "FENCED"
    sock = lab["sites"]["primary"]["agent_control_socket"]
    status, body = asyncio.run(_guest_call(sock, "POST", "/v1/guests/demo1/start"))
    assert status == 409, body
    assert "FENCED" in body["message"], body
    assert "replikant reverse demo1" in body["fix"], body
    assert "Operation not permitted" in refused.stdout + refused.stderr, refused
    restarted = json.loads((Path(lab["root"]) / "lab.json").read_text())["pids"]["primary"]
    for pid in restarted:  # a restart keeps it fenced: the role is on disk
        os.kill(pid, signal.SIGKILL)
    # Disk 1 loses its change map at the old primary: reverse must compare it in full.
    state = Path(lab["root"]) / "primary" / "state" / lab["vms"][0]["uuid"]
    for name in (f"{d1['id']}.map", f"{d1['id']}.map.fine"):
        (state / name).unlink(missing_ok=True)
    assert _run("lab", "start", "--dir", lab["root"], "--site", "primary").returncode == 0
    assert _roles(lab).get("primary") == "FENCED"
    # Every role is on the control plane too, in each agent's retained host record; `status`
    # shows it from there to a machine that reaches no agent's control socket.
    fenced, promoted = _host_vm(lab, AGENT_HOST), _host_vm(lab, RECOVERY_AGENT_HOST)
    assert (fenced["role"], fenced["generation"]) == ("FENCED", 1), fenced
    assert (promoted["role"], promoted["generation"]) == ("PRIMARY", 2), promoted
    assert _roles(lab, agents=False).get("primary") == "FENCED"
    refused = _write(d0["nbd_uris"]["primary"], 0, b"y" * 4096, tmp_path)
    assert "Operation not permitted" in refused.stdout + refused.stderr, refused

    early = _cli(lab, "reverse", "demo1")
    assert early.returncode == 1
    assert "FAILED-OVER" in early.stderr
    assert "commit" in early.stderr
    # Named and by selector (the lab labels its VMs tier=demo) at once: a result per VM, and
    # one VM's failure makes the exit status 1 without stopping the others.
    both = _cli(lab, "failover", "commit", "nosuch", "--selector", "tier=demo", "--json")
    assert both.returncode == 1, both
    results = {v["vm"]: v for v in json.loads(both.stdout)["vms"]}
    assert {vm: r["result"] for vm, r in results.items()} == {"nosuch": "failed", "demo1": "ok"}
    assert "no reachable site holds vm nosuch" in results["nosuch"]["error"], results
    differing = sum(_differing_bytes(d["replica_image"], d["source_image"]) for d in (d0, d1))
    assert differing >= 3 * BLOCK
    steps = _steps(_cli(lab, "reverse", "--selector", "tier=demo", "--json"))
    assert _shipped(steps) > 0
    maps = next(s for s in steps if "mapped_bytes" in s)
    assert list(maps["full_compare"]) == [d1["id"]], maps
    assert "change map is missing" in maps["full_compare"][d1["id"]], maps
    _wait("both sites byte-identical", lambda: _same(lab))
    hashed = asyncio.run(_agent_disks(lab["sites"]["recovery"]["agent_control_socket"]))
    size = 8 << 20
    # Disk 0: only the old primary's mapped regions were read and hashed (the new primary's
    # own writes ship from its map unhashed); disk 1, without its map, in full.
    assert hashed[d0["id"]]["hashed_bytes"] <= min(2 * maps["mapped_bytes"], size // 2), hashed
    assert hashed[d1["id"]]["hashed_bytes"] == size, hashed
    # The promoted agent's replicators started at the promotion: all they shipped is the reverse.
    shipped = asyncio.run(_agent_shipped(lab["sites"]["recovery"]["agent_control_socket"]))
    # At least the random blocks written at the recovery site travel (blocks that differ only
    # because the old primary wrote over a hole go back as payload-free ZERO extents).
    assert 3 * BLOCK <= shipped <= 1.1 * differing, (shipped, differing)
    assert _roles(lab) == {"primary": "REPLICA", "recovery": "PRIMARY"}


def _points(lab: dict[str, Any]) -> list[dict[str, Any]]:
    res = _cli(lab, "points", "demo1", "--json")
    assert res.returncode == 0, res.stderr
    points: list[dict[str, Any]] = json.loads(res.stdout)["points"]
    return points


@pytest.mark.qemu
@pytest.mark.slow
def test_unplanned_failover_to_an_older_point_starts_from_that_points_data(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """`failover unplanned --point ID` starts the VM at the recovery site with exactly that
    point's data: a later write the replica already held is rolled back, and is in the new
    primary's change map."""
    d0 = lab["vms"][0]["disks"][0]
    first, later = os.urandom(2 * BLOCK), os.urandom(2 * BLOCK)
    _write_ok(d0["nbd_uris"]["primary"], 1 << 20, first, tmp_path)
    _wait("the first write at the recovery site", lambda: _same(lab))
    point = _points(lab)[0]["id"]
    before = Path(d0["replica_image"]).read_bytes()[2 << 20 : (2 << 20) + 2 * BLOCK]
    _write_ok(d0["nbd_uris"]["primary"], 2 << 20, later, tmp_path)
    _wait("the later write at the recovery site", lambda: _same(lab))
    assert _points(lab)[0]["id"] != point
    for pid in lab["pids"]["primary"]:
        os.kill(pid, signal.SIGKILL)

    steps = _steps(_cli(lab, "failover", "unplanned", "demo1", "--point", point, "--json"))
    rolled = next(s for s in steps if "rolled_back_bytes" in s)["rolled_back_bytes"]
    assert rolled == 2 * BLOCK
    image = Path(d0["replica_image"]).read_bytes()
    assert image[1 << 20 : (1 << 20) + 2 * BLOCK] == first
    assert image[2 << 20 : (2 << 20) + 2 * BLOCK] == before
    assert _roles(lab)["recovery"] == "FAILED-OVER"
    # The rolled-back blocks differ from the old primary's acked state: the new primary's change
    # map holds them, so the reverse ships them (decision 042).
    disks = asyncio.run(_agent_disks(lab["sites"]["recovery"]["agent_control_socket"]))
    assert disks[d0["id"]]["dirty_bytes"] == 2 * BLOCK, disks


@pytest.mark.qemu
@pytest.mark.slow
def test_cancel_gives_the_vm_back_to_the_old_primary_and_discards_the_recovery_writes(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """`failover cancel` needs the old primary's site; once it is back, the VM is PRIMARY there
    again, the recovery site's writes are discarded and replication resumes."""
    d0 = lab["vms"][0]["disks"][0]
    for pid in lab["pids"]["primary"]:
        os.kill(pid, signal.SIGKILL)
    _steps(_cli(lab, "failover", "unplanned", "demo1", "--json"))
    _write_ok(d0["nbd_uris"]["recovery"], 1 << 20, os.urandom(2 * BLOCK), tmp_path)
    early = _cli(lab, "failover", "cancel", "demo1")
    assert early.returncode == 1
    assert "cannot be reached" in early.stderr, early.stderr
    assert _run("lab", "start", "--dir", lab["root"], "--site", "primary").returncode == 0
    _steps(_cli(lab, "failover", "cancel", "demo1", "--json"))
    _wait("the replica resynced from the old primary", lambda: _same(lab))
    assert _roles(lab) == {"primary": "PRIMARY", "recovery": "REPLICA"}
    _write_ok(d0["nbd_uris"]["primary"], 2 << 20, os.urandom(BLOCK), tmp_path)
    _wait("replication from the primary site again", lambda: _same(lab))
