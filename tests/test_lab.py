"""The one-command lab: up, write through a demo disk's NBD URI, see it in the replica, down."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from common.signedrecord import Verifier
from common.tls import client_context
from ops.lab import _stop

REPLIKANT = str(Path(sys.executable).with_name("replikant"))


def _digest(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


async def _retained(url: str, pki: Path, topic: str, wanted: set[str]) -> dict[str, bytes]:
    """Collect retained records under ``topic`` until every ``wanted`` topic was seen, reading
    as the lab's admin (the lab's MQTT broker accepts only its CA's certificates)."""
    host, port = url.removeprefix("mqtts://").rsplit(":", 1)
    tls = client_context((pki / "ca.crt", pki / "admins/lab.crt", pki / "admins/lab.key"))
    seen: dict[str, bytes] = {}
    async with (
        asyncio.timeout(20),
        aiomqtt.Client(host, int(port), identifier="lab-test", tls_context=tls) as c,
    ):
        await c.subscribe(topic, qos=1)
        async for message in c.messages:
            assert isinstance(message.payload, bytes)
            # The daemons sign what they publish: keep the verified record.
            seen[str(message.topic)] = (
                Verifier.from_file(pki / "ca.crt").open(str(message.topic), message.payload).record
            )
            if wanted <= seen.keys():
                return seen
    return seen


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REPLIKANT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.qemu
@pytest.mark.slow
def test_lab_replicates_writes_byte_for_byte_and_cleans_up(tmp_path: Path) -> None:
    """`lab up --detach` replicates demo disks; a qemu-io write shows up in the replica; `down`
    stops every process and removes the directory."""
    lab_dir = tmp_path / "lab"
    up = _run("lab", "up", "--dir", str(lab_dir), "--detach", "--vms", "2", "--disk-mib", "16")
    assert up.returncode == 0, up.stderr
    try:
        lab = json.loads((lab_dir / "lab.json").read_text())
        assert lab["mqtt"].startswith("mqtts://127.0.0.1:")
        assert Path(lab["config"]).is_file()
        assert len(lab["vms"]) == 2
        disk = lab["vms"][0]["disks"][0]
        # Initial replication already done: replica equals source.
        size = os.path.getsize(disk["source_image"])
        assert _digest(disk["replica_image"], 0, size) == _digest(disk["source_image"], 0, size)

        offset, length = 5 << 20, 256 << 10
        write = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} {length}", disk["nbd_uri"]],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert write.returncode == 0, write.stderr + write.stdout
        expected = hashlib.sha256(b"\x5a" * length).hexdigest()
        assert _digest(disk["source_image"], offset, length) == expected
        deadline = time.monotonic() + 30
        while _digest(disk["replica_image"], offset, length) != expected:
            assert time.monotonic() < deadline, "the write never reached the replica"
            time.sleep(0.2)
        assert _digest(disk["replica_image"], 0, size) == _digest(disk["source_image"], 0, size)

        # nbdcopy streams a whole random image into the other VM's disk: byte for byte too.
        other = lab["vms"][1]["disks"][0]
        payload = tmp_path / "payload.img"
        payload.write_bytes(os.urandom(size))
        copy = subprocess.run(
            ["nbdcopy", str(payload), other["nbd_uri"]],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert copy.returncode == 0, copy.stderr
        want = _digest(str(payload), 0, size)
        assert _digest(other["source_image"], 0, size) == want
        deadline = time.monotonic() + 30
        while _digest(other["replica_image"], 0, size) != want:
            assert time.monotonic() < deadline, "the nbdcopy never reached the replica"
            time.sleep(0.2)

        status = _run("--config", lab["config"], "status", "--json", timeout=30)
        assert status.returncode == 0, status.stderr
        vms = {vm["uuid"]: vm for vm in json.loads(status.stdout)["vms"]}
        first = vms[lab["vms"][0]["uuid"]]
        assert first["roles"] == {"primary": "PRIMARY", "recovery": "REPLICA"}
        assert first["name"] == lab["vms"][0]["name"]
        assert lab["vms"][0]["primary_site"] == "primary"
        assert first["generation"] >= 1
        assert first["health"] in {"ok", "warning"}
        assert isinstance(first["lag_seconds"], float)
        assert first["last_point"] is not None

        points = _run("--config", lab["config"], "points", first["name"], "--json", timeout=30)
        assert points.returncode == 0, points.stderr
        assert json.loads(points.stdout)["points"], "the lab keeps recovery points"
        verify = _run("--config", lab["config"], "verify", first["name"], "--json", timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # lab.json names the agent's control socket, and the agent answers on it.
        assert Path(lab["agent_control_socket"]).is_socket()
        agent = _run("agent", "status", "--config", str(lab_dir / "agent.toml"), "--json")
        assert agent.returncode == 0, agent.stderr
        assert len(json.loads(agent.stdout)["disks"]) == 3

        # The control plane carries the same roles, the owner and its epoch, retained.
        vm_topic = f"replikant/v1/vms/{lab['vms'][0]['uuid']}/sites"
        owner_topic = "replikant/v1/clusters/dr/owner"
        member_topic = "replikant/v1/clusters/dr/members/b1"
        host_topic = "replikant/v1/hosts/" + json.loads(agent.stdout)["host"]
        wanted = {
            f"{vm_topic}/recovery", f"{vm_topic}/primary", owner_topic, member_topic, host_topic,
        }  # fmt: skip
        records = asyncio.run(_retained(lab["mqtt"], Path(lab["pki"]), "replikant/v1/#", wanted))
        site = json.loads(records[f"{vm_topic}/recovery"])
        assert (site["role"], site["name"]) == ("REPLICA", lab["vms"][0]["name"])
        assert json.loads(records[f"{vm_topic}/primary"])["role"] == "PRIMARY"
        owner = json.loads(records[owner_topic])
        assert owner["node"] == "b1"
        assert owner["epoch"] >= 1
        member = json.loads(records[member_topic])
        assert member["online"] is True
        assert json.loads(records[host_topic])["online"] is True  # the agent's [mqtt] presence

        # A recovery cluster of two members (the default) on one store; the agent lists both.
        assert [(b["node"], b["cluster"]) for b in lab["brokers"]] == [("b1", "dr"), ("b2", "dr")]
        assert all(
            b["url"].startswith("https://127.0.0.1:") and b["pid"] > 0 for b in lab["brokers"]
        )
        agent_toml = (lab_dir / "agent.toml").read_text()
        assert all(b["url"] in agent_toml for b in lab["brokers"])
        cluster = _run("--config", lab["config"], "cluster", "status", "--json", timeout=30)
        assert cluster.returncode == 0, cluster.stderr
        clusters = {c["name"]: c for c in json.loads(cluster.stdout)["clusters"]}
        assert sorted(clusters) == ["dr", "dr-primary"]  # the primary site's broker: its own
        dr = clusters["dr"]
        assert (dr["name"], dr["owner"], dr["epoch"]) == ("dr", "b1", owner["epoch"])
        assert [(m["node"], m["online"]) for m in dr["members"]] == [("b1", True), ("b2", True)]
    finally:
        pids = json.loads((lab_dir / "pids.json").read_text())
        down = _run("lab", "down", "--dir", str(lab_dir), timeout=60)
    assert down.returncode == 0, down.stderr
    assert not lab_dir.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_lab_down_refuses_a_directory_without_a_lab(tmp_path: Path) -> None:
    """`lab down` on a directory that holds no lab says so and names the fix."""
    result = _run("lab", "down", "--dir", str(tmp_path), timeout=30)
    assert result.returncode == 1
    assert "holds no lab" in result.stderr
    assert "--dir that `replikant lab up` was given" in result.stderr


def test_a_failed_lab_up_can_be_brought_down(tmp_path: Path) -> None:
    """A `lab up` that times out stops its processes, says where the logs are, and `lab down`
    removes what is left."""
    lab_dir = tmp_path / "lab"
    up = _run("lab", "up", "--dir", str(lab_dir), "--detach", "--timeout", "0.01", timeout=60)
    assert up.returncode == 1
    assert "timed out" in up.stderr
    assert "lab down --dir" in up.stderr
    pids = json.loads((lab_dir / "pids.json").read_text())
    again = _run("lab", "up", "--dir", str(lab_dir), "--detach", timeout=60)
    assert again.returncode == 1
    assert "what is left of a failed `lab up`" in again.stderr
    down = _run("lab", "down", "--dir", str(lab_dir), timeout=60)
    assert down.returncode == 0, down.stderr
    assert not lab_dir.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_lab_down_stops_the_daemons_before_their_mqtt_server(tmp_path: Path) -> None:
    """The daemons stop while the MQTT server, the first process started, still runs: their
    clean stop (an owner's leave) reaches it instead of waiting out reconnects. Real processes:
    a stand-in for the server and a daemon that looks, a moment into its stop, whether the
    server is still there."""
    server = subprocess.Popen(["sleep", "60"], start_new_session=True)
    seen = tmp_path / "seen"
    daemon_code = f"""
import os, signal, sys, time
def stop(*_):
    time.sleep(0.3)
    try:
        state = open("/proc/{server.pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    open({str(seen)!r}, "w").write("gone" if state in ("Z", "gone") else "running")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open({str(seen)!r} + ".ready", "w").close()
while True:
    time.sleep(1)
"""
    daemon = subprocess.Popen([sys.executable, "-c", daemon_code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{seen}.ready").exists():
            assert time.monotonic() < deadline, "the daemon stand-in never started"
            time.sleep(0.05)
        _stop([server.pid, daemon.pid])
        assert seen.read_text() == "running"
        assert server.poll() is not None
        assert daemon.poll() is not None
    finally:
        for proc in (server, daemon):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
