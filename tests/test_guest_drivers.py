"""Real guests under the hypervisor drivers (agents/hypervisor/): boot, write, stop, query."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agents.hypervisor import GuestDisk, HypervisorError
from agents.hypervisor.base import process_alive
from agents.hypervisor.command import CommandDriver
from agents.hypervisor.qemu import QemuDriver, kvm_usable
from agents.hypervisor.qmp import UNIX_PATH_MAX, reachable
from common.hypervisorconfig import CommandSettings, QemuSettings
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    ReplikantProc,
    VMSpec,
    agent_process,
    broker_config,
    control_request,
    free_port,
    make_image,
    wait_for,
)
from tests.support_guest import (
    GuestImage,
    console_value,
    pattern,
    sha256,
    wait_console,
)

pytestmark = [pytest.mark.timeout(120)]

OFF = 1 * MiB
LEN = 256 * 1024


def qemu_settings(guest: GuestImage, **ops: str | int) -> QemuSettings:
    """A test guest's settings as the driver takes them."""
    return QemuSettings.model_validate(guest.settings(**ops))


async def test_agent_starts_its_guest_which_writes_and_the_replica_gets_its_bytes(
    tmp_path: Path, guest: GuestImage
) -> None:
    """Through the agent's control socket a guest boots on the tracked export and writes; the
    broker's replica holds its bytes; stop powers it down; a standby VM may not start."""
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    broker = ReplikantProc(
        ["broker", "run", "--config", str(broker_config(tmp_path / "b.toml", pki, store, bport))],
        tmp_path / "broker.log",
    )
    image = make_image(tmp_path / "d.img", 8 * MiB)
    vm = VMSpec("web1", [DiskSpec("disk0", image)])
    ctl = tmp_path / "ctl" / "agent.sock"
    agent = agent_process(
        tmp_path,
        pki=pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[vm],
        interval=0.5,
        control_socket=ctl,
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        cfg.read_text()
        + guest.toml("vms.hypervisor", op="write", off=OFF, len=LEN, seed="guest")
        + f'\n[[standby]]\nname = "db1"\nuuid = "{uuid.uuid4()}"\n'
        + guest.toml("standby.hypervisor", op="read", off=0, len=4096)
    )
    replica = store / str(vm.uuid) / "disk0" / "replica.img"
    console = tmp_path / "state" / "guests" / "web1" / "main" / "console.log"
    broker.start()
    agent.start()
    try:
        await wait_for(ctl.exists, "the agent's control socket")
        code, started = await control_request(ctl, "POST", "/v1/guests/web1/start", {})
        assert code == 200, started
        assert started["state"] == "running"
        assert started["role"] == "PRIMARY"
        await wait_for(lambda: "RK-DONE" in _text(console), "the guest's write")
        want = pattern("guest", LEN)
        assert image.read_bytes()[OFF : OFF + LEN] == want

        def replicated() -> bool:
            return replica.exists() and replica.read_bytes()[OFF : OFF + LEN] == want

        await wait_for(replicated, "the guest's bytes at the replica")
        await wait_for(lambda: "RK-READY" in _text(console), "the guest's power button")
        code, stopped = await control_request(ctl, "POST", "/v1/guests/web1/stop", {})
        assert code == 200, stopped
        assert stopped["how"] == "powerdown"
        assert "RK-BYE" in _text(console)
        code, listing = await control_request(ctl, "GET", "/v1/guests")
        states = {g["name"]: g["instances"]["main"]["state"] for g in listing["guests"]}
        assert states == {"web1": "stopped", "db1": "stopped"}
        code, refused = await control_request(ctl, "POST", "/v1/guests/db1/start", {})
        assert code == 409
        assert refused["error"] == "wrong_role"
        assert "vm db1 is REPLICA at site primary" in refused["message"]
        assert "replikant failover test db1" in refused["fix"]
    finally:
        await control_request(ctl, "POST", "/v1/guests/web1/stop", {"grace_seconds": 0})
        agent.stop()
        broker.stop()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def test_stop_kills_a_guest_that_ignores_powerdown_and_files_are_private(
    tmp_path: Path, guest: GuestImage
) -> None:
    """A guest that does not shut down in time is killed; its run files are 0700/0600."""
    image = make_image(tmp_path / "d.img", 4 * MiB)
    sock = tmp_path / "nbd.sock"
    # A plain qemu-nbd serves the disk: this test is about the driver, not the agent.
    server = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", "-f", "raw", "-x", "d", "--socket", str(sock), str(image)
    )
    driver = QemuDriver(
        "t1", qemu_settings(guest, op="read", off=0, len=4096), tmp_path / "run" / "t1"
    )
    try:
        await wait_for(sock.exists, "qemu-nbd's socket")
        status = await driver.start([GuestDisk("d", f"nbd+unix:///d?socket={sock}")], isolated=True)
        text = wait_console(driver.console, "RK-HASH")
        assert console_value(text, "RK-HASH") == sha256(bytes(4096))
        assert stat.S_IMODE(os.stat(driver.run_dir).st_mode) == 0o700
        for f in (driver.qmp, driver.pidfile, driver.console):
            assert stat.S_IMODE(os.lstat(f).st_mode) & 0o077 == 0, f
        with pytest.raises(HypervisorError, match="already runs here"):
            await driver.start([GuestDisk("d", f"nbd+unix:///d?socket={sock}")], isolated=True)
        # The guest's init waits for the power button, but 10 ms is too short to act on it.
        result = await driver.stop(grace=0.01)
        assert result.how == "killed"
        assert status.pid is not None
        assert not process_alive(status.pid, "")
        assert (await driver.stop()).how == "already-stopped"
    finally:
        await driver.stop(grace=0.1)
        server.kill()
        await server.wait()


def test_kvm_probe_matches_the_cpu() -> None:
    """KVM is chosen only when the CPU offers vmx/svm, so a broken nested /dev/kvm means TCG."""
    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" not in flags and " svm" not in flags:
        assert not kvm_usable()
    settings = QemuSettings(driver="qemu")
    accel = QemuDriver("x", settings, Path("/nonexistent")).accel()
    assert accel == ("kvm" if kvm_usable() else "tcg")


def test_qemu_argv_isolated_drops_every_nic_and_json_quotes_disks() -> None:
    """A test copy gets `-nic none` and none of the VM's NICs; disk paths cannot inject options."""
    settings = QemuSettings(
        driver="qemu", network_args=["-nic", "bridge,br=br0"], extra_args=["-vga", "std"]
    )
    driver = QemuDriver("web1", settings, Path("/run/x"))
    disks = [GuestDisk("d", "nbd+unix:///d?socket=/tmp/a,file=/etc/shadow")]
    isolated = driver.argv(disks, isolated=True)
    assert "bridge,br=br0" not in isolated
    assert isolated[isolated.index("-nic") + 1] == "none"
    blockdev = isolated[isolated.index("-blockdev") + 1]
    assert '"path": "/tmp/a,file=/etc/shadow"' in blockdev
    assert "bridge,br=br0" in driver.argv(disks, isolated=False)
    with pytest.raises(HypervisorError, match="not nbd\\+unix"):
        driver.argv([GuestDisk("d", "nbd://10.0.0.1/d")], isolated=True)
    with pytest.raises(ValueError, match="network_args"):
        QemuSettings(driver="qemu", extra_args=["-netdev", "user,id=n"])


async def test_command_driver_passes_disks_without_a_shell(tmp_path: Path) -> None:
    """The operator's programs get the disks' URIs in argv and environment, never via a shell."""
    script = tmp_path / "hv.py"
    script.write_text(
        "import json, os, sys, subprocess, signal\n"
        "run = os.environ['REPLIKANT_RUN_DIR']\n"
        "pidf = os.path.join(run, 'pid')\n"
        "cmd = sys.argv[1]\n"
        "if cmd == 'start':\n"
        "    env = {k: v for k, v in os.environ.items() if k.startswith('REPLIKANT_')}\n"
        "    json.dump({'argv': sys.argv[2:], 'env': env}, open(os.path.join(run, 'seen'), 'w'))\n"
        "    p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "    open(pidf, 'w').write(str(p.pid))\n"
        "elif cmd == 'status':\n"
        "    try: pid = int(open(pidf).read())\n"
        "    except OSError: sys.exit(3)\n"
        "    try: os.kill(pid, 0)\n"
        "    except OSError: sys.exit(3)\n"
        "    st = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]\n"
        "    sys.exit(3) if st == 'Z' else print(pid)\n"
        "elif cmd == 'stop':\n"
        "    pass\n"  # an operator's stop that does nothing: the kill command must follow
        "elif cmd == 'kill':\n"
        "    pid = int(open(pidf).read()); os.kill(pid, signal.SIGKILL)\n"
        "    os.unlink(pidf)\n"
    )
    py = sys.executable
    settings = CommandSettings(
        driver="command",
        start=[py, str(script), "start", "{vm}", "{disk:os-disk.0}"],
        stop=[py, str(script), "stop"],
        status=[py, str(script), "status"],
        kill=[py, str(script), "kill"],
        stop_timeout_seconds=0.5,
    )
    run = tmp_path / "run"
    driver = CommandDriver("web1", "u-1", settings, run)
    evil = f"nbd+unix:///d?socket=/tmp/s;touch {tmp_path}/pwned"
    status = await driver.start([GuestDisk("os-disk.0", evil)], isolated=True)
    assert status.state == "running"
    seen = json.loads((run / "seen").read_text())
    assert seen["argv"] == ["web1", evil]
    assert seen["env"]["REPLIKANT_DISK_OS_DISK_0"] == evil
    assert seen["env"]["REPLIKANT_ISOLATED"] == "1"
    assert seen["env"]["REPLIKANT_DISKS"] == f"os-disk.0={evil}"
    assert not await asyncio.to_thread((tmp_path / "pwned").exists)
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run / "start.out").st_mode) == 0o600
    result = await driver.stop()
    assert result.how == "killed"
    assert (await driver.status()).state == "stopped"
    with pytest.raises(HypervisorError, match="names no disk"):
        driver.expand(["{disk:nope}"], [])


async def test_unreadable_pid_file_is_unknown_and_blocks_a_second_start(tmp_path: Path) -> None:
    """A pid file that cannot be read makes the state unknown, and start refuses rather than
    booting a second guest on the same disks."""
    driver = QemuDriver("web1", QemuSettings(driver="qemu"), tmp_path / "run")
    assert (await driver.status()).state == "stopped"
    driver.run_dir.mkdir(mode=0o700)
    driver.pidfile.write_text("garbage")
    status = await driver.status()
    assert status.state == "unknown"
    assert "garbage" in status.detail
    with pytest.raises(HypervisorError, match="cannot tell whether its guest runs"):
        await driver.start([GuestDisk("d", "nbd+unix:///d?socket=/nonexistent")], isolated=True)
    with pytest.raises(HypervisorError, match="cannot tell"):
        await driver.stop()


def test_a_socket_deeper_than_sun_path_is_bound_and_reached_through_its_directory(
    tmp_path: Path,
) -> None:
    """A guest's QMP socket under a state directory deeper than 107 bytes (a CI run failed on
    one): another process binds it through the directory's descriptor, as qemu does with
    ``pass_fds``, and the agent connects to it the same way."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "qmp.sock"
    assert len(os.fsencode(sock)) > UNIX_PATH_MAX
    bind = "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])"
    with reachable(sock) as (path, keep):
        assert len(path) <= UNIX_PATH_MAX
        assert keep
        subprocess.run([sys.executable, "-c", bind, path], pass_fds=keep, check=True)
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    sock.unlink()
    with reachable(sock) as (path, _), socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with reachable(sock) as (again, _), socket.socket(socket.AF_UNIX) as client:
            client.connect(again)
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"qmp")
                assert client.recv(3) == b"qmp"
