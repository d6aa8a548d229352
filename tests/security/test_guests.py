"""The guests' surfaces: a running guest's QMP socket and files, the operator's commands, and
the test copy's network (agents/hypervisor/, decision 040)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.hypervisor import GuestDisk, HypervisorError
from agents.hypervisor.command import CommandDriver
from agents.hypervisor.qemu import QemuDriver
from common.hypervisorconfig import CommandSettings, QemuSettings
from tests.security.rows import Door
from tests.security.test_agent_control import _CONNECT, _OPEN, as_nobody, expect_eacces
from tests.support_agent import make_image, wait_for
from tests.support_guest import GuestImage, wait_console

pytestmark = pytest.mark.timeout(120)
SURFACE = "guest (qemu driver)"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may traverse, so that only the run directory's own modes can be
    what stops another user."""
    path = Path(tempfile.mkdtemp(prefix="rk-guest-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_another_user_cannot_drive_or_read_a_running_guest(
    base: Path, guest: GuestImage, door: Door
) -> None:
    """uid 65534 can neither connect to the guest's QMP socket nor read its console or pid file;
    a test copy's command line carries no NIC but `-nic none`."""
    image = make_image(base / "d.img", 1 << 20)
    sock = base / "nbd.sock"
    server = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", "-f", "raw", "-x", "d", "--socket", str(sock), str(image)
    )
    settings = QemuSettings.model_validate(
        {
            **guest.settings(op="read", off=0, len=4096),
            "network_args": ["-nic", "user,model=virtio-net-pci"],
        }
    )
    driver = QemuDriver("sec1", settings, base / "run" / "sec1")
    try:
        await wait_for(sock.exists, "qemu-nbd's socket")
        status = await driver.start([GuestDisk("d", f"nbd+unix:///d?socket={sock}")], isolated=True)
        wait_console(driver.console, "RK-HASH")
        got = as_nobody(_CONNECT, str(driver.qmp))
        expect_eacces(door, SURFACE, "connects to the QMP socket", got, driver.qmp)
        for path in (driver.console, driver.pidfile):
            got = as_nobody(_OPEN, str(path), str(os.O_RDONLY))
            expect_eacces(door, SURFACE, f"reads {path.name}", got, path)
        raw = await asyncio.to_thread(Path(f"/proc/{status.pid}/cmdline").read_bytes)
        cmdline = raw.split(b"\0")
        nics = [cmdline[i + 1].decode() for i, a in enumerate(cmdline) if a == b"-nic"]
        door.attempt(
            SURFACE,
            "a test copy of a VM whose network_args attach a user-mode NIC",
            expected="-nic none only",
            observed=f"-nic {nics}",
            refused=nics == ["none"],
        )
    finally:
        await driver.stop(grace=0.1)
        server.kill()
        await server.wait()


async def test_operator_commands_never_reach_a_shell(base: Path, door: Door) -> None:
    """A disk URI carrying shell syntax reaches the operator's program as one literal argument."""
    planted = base / "pwned"
    settings = CommandSettings(
        driver="command",
        start=[
            sys.executable,
            "-c",
            "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
            str(base / "argv"),
            "{disk:d0}",
        ],
        stop=["true"],
        status=["true"],
    )
    driver = CommandDriver("vm1", "u", settings, base / "run")
    evil = f"nbd+unix:///d?socket=/x;touch {planted};$(touch {planted})`touch {planted}`"
    await driver.start([GuestDisk("d0", evil)], isolated=True)
    seen = (base / "argv").read_text()
    door.attempt(
        SURFACE,
        "a disk URI with `;`, `$( )` and backquotes in the command driver's argv",
        expected="passed literally, nothing run",
        observed=f"argument {'literal' if seen == evil else seen!r}, planted file "
        f"{'exists' if planted.exists() else 'absent'}",
        refused=seen == evil and not planted.exists(),
    )
    with pytest.raises(HypervisorError) as info:
        driver.expand(["{disk:d1}"], [GuestDisk("d0", evil)])
    door.attempt(
        SURFACE,
        "a placeholder naming a disk the VM does not have",
        expected="refused",
        observed=info.value.message,
        refused="names no disk" in info.value.message,
    )
