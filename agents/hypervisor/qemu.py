"""The ``qemu`` driver: ``qemu-system-x86_64`` with each disk attached over NBD.

qemu daemonizes once it is initialised (``-daemonize``), so a start that fails (a disk that does
not open, a bad argument) fails here with qemu's own words, and a guest outlives an agent restart.
The pid file and the command line (which names the private QMP socket) identify our process; a
stop asks the guest to power down over QMP and ends it with SIGKILL after the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from agents.hypervisor.base import (
    GuestDisk,
    GuestStatus,
    HypervisorError,
    StopResult,
    private_run_dir,
    process_alive,
    unix_nbd,
)
from agents.hypervisor.qmp import qmp_execute, reachable
from common.hypervisorconfig import QemuSettings
from common.logs import get_logger

log = get_logger("agents.hypervisor.qemu")

_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


def kvm_usable() -> bool:
    """KVM works here: /dev/kvm opens read-write, speaks API 12, and the CPU offers hardware
    virtualisation. The last check matters: a nested sandbox may expose /dev/kvm without
    vmx/svm, and qemu then hangs in the kernel instead of failing."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != _KVM_API_VERSION:
            return False
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


class QemuDriver:
    """One guest instance under qemu, its files in ``run_dir``."""

    def __init__(self, vm: str, settings: QemuSettings, run_dir: Path) -> None:
        self.vm = vm
        self.settings = settings
        self.run_dir = run_dir
        self.qmp = run_dir / "qmp.sock"
        self.pidfile = run_dir / "qemu.pid"
        self.console = run_dir / "console.log"
        # What tells our qemu from a process that reused its pid: the pid file's path is in
        # every command line we start (the QMP socket's may be a /proc/self/fd alias).
        self.marker = str(self.pidfile)

    def accel(self) -> str:
        """The accelerator this start uses."""
        if self.settings.accel == "auto":
            return "kvm" if kvm_usable() else "tcg"
        return self.settings.accel

    def argv(
        self, disks: Sequence[GuestDisk], *, isolated: bool, qmp: str | None = None
    ) -> list[str]:
        """qemu's command line for ``disks``; every value is one argv item, never shell text.
        ``qmp``: the path qemu binds its QMP socket at (default: :attr:`qmp`)."""
        s = self.settings
        args = [
            s.binary,
            "-name",
            f"guest={self.vm},process=replikant-{self.vm}",
            "-machine",
            s.machine,
            "-accel",
            self.accel(),
            "-m",
            str(s.memory_mib),
            "-smp",
            str(s.cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            f"file:{self.console}",
            "-qmp",
            f"unix:{qmp or self.qmp},server=on,wait=off",
            "-pidfile",
            str(self.pidfile),
            "-daemonize",
        ]
        if s.kernel is not None:
            args += ["-kernel", str(s.kernel)]
        if s.initrd is not None:
            args += ["-initrd", str(s.initrd)]
        if s.append is not None:
            args += ["-append", s.append]
        for i, disk in enumerate(disks):
            path, export = unix_nbd(disk.uri)
            node = f"disk{i}"
            spec = {
                "driver": "nbd",
                "node-name": node,
                "server": {"type": "unix", "path": path},
                "export": export,
            }
            # JSON, not key=value: a path or export name can then never inject another option.
            args += ["-blockdev", json.dumps(spec)]
            if s.disk_bus == "nvme":
                args += ["-device", f"nvme,drive={node},serial=rk{i}"]
            else:
                args += ["-device", f"virtio-blk-pci,drive={node}"]
        args += ["-nic", "none"] if isolated else list(s.network_args)
        return args + list(s.extra_args)

    async def start(self, disks: Sequence[GuestDisk], *, isolated: bool) -> GuestStatus:
        """Start qemu; returns once it runs (or raises with qemu's message)."""
        current = await self.status()
        if current.state != "stopped":
            raise HypervisorError(
                f"vm {self.vm}: its guest already runs here (pid {current.pid})"
                if current.state == "running"
                else f"vm {self.vm}: cannot tell whether its guest runs ({current.detail})",
                fix="stop it first (POST /v1/guests/VM/stop on the agent's control socket; "
                "`replikant failover stop-test VM` for a test copy)",
            )
        private_run_dir(self.run_dir)
        for stale in (self.qmp, self.pidfile, self.console, self.run_dir / "start.log"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        started = time.monotonic()
        # qemu's messages go to a file, not a pipe: the daemonized qemu inherits the pipe until
        # it redirects its stdio, and uvloop (the agent's loop) then waits on it for good.
        log_path = self.run_dir / "start.log"
        fd = os.open(
            log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with reachable(self.qmp) as (qmp, keep):
                argv = self.argv(disks, isolated=isolated, qmp=qmp)
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, pass_fds=keep
                )
                code = await proc.wait()  # -daemonize: qemu's socket exists once this returns
        finally:
            os.close(fd)
        if code != 0:
            text = log_path.read_text(errors="replace").strip()
            log.warning("guest_start_failed", vm=self.vm, code=code, error=text)
            raise HypervisorError(
                f"vm {self.vm}: qemu did not start (exit {code}): {text}",
                fix="check the VM's [hypervisor] settings and that its disks are served",
            )
        # qemu's -daemonize sets umask 027 itself; the 0700 directory kept the files private
        # meanwhile, and they are 0600 from here on.
        for made in (self.qmp, self.pidfile, self.console):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(made, 0o600, follow_symlinks=False)
        status = await self.status()
        log.info(
            "guest_started",
            vm=self.vm,
            pid=status.pid,
            accel=argv[argv.index("-accel") + 1],
            isolated=isolated,
            seconds=round(time.monotonic() - started, 3),
        )
        return status

    async def status(self) -> GuestStatus:
        """running (with the pid) or stopped; unknown when the pid file cannot be read (so
        nobody may conclude the guest is down and start a second one on the same disks)."""
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return GuestStatus("stopped")
        except OSError as exc:
            return GuestStatus("unknown", None, f"pid file {self.pidfile}: {exc.strerror}")
        if not text.isdigit():
            return GuestStatus("unknown", None, f"pid file {self.pidfile} holds {text[:20]!r}")
        pid = int(text)
        if process_alive(pid, self.marker):
            return GuestStatus("running", pid)
        return GuestStatus("stopped", None, f"pid {pid} of the last run has ended")

    async def stop(self, *, grace: float | None = None) -> StopResult:
        """system_powerdown over QMP, wait up to ``grace`` (default: the VM's
        stop_timeout_seconds), then SIGKILL."""
        limit = self.settings.stop_timeout_seconds if grace is None else grace
        started = time.monotonic()
        current = await self.status()
        if current.state == "unknown":
            raise HypervisorError(
                f"vm {self.vm}: cannot tell whether its guest runs ({current.detail})",
                fix=f"check {self.run_dir} and the qemu processes by hand",
            )
        pid = current.pid
        if pid is None:
            return StopResult("already-stopped", 0.0)
        try:
            await qmp_execute(self.qmp, "system_powerdown")
        except HypervisorError as exc:
            log.warning("guest_powerdown_failed", vm=self.vm, error=str(exc))
        if await _wait_gone(pid, self.marker, limit):
            result = StopResult("powerdown", time.monotonic() - started)
        else:
            _kill(pid, self.marker)
            if not await _wait_gone(pid, self.marker, 10.0):
                raise HypervisorError(
                    f"vm {self.vm}: qemu pid {pid} survived SIGKILL",
                    fix="look for an uninterruptible I/O wait (a hung NBD socket)",
                )
            result = StopResult("killed", time.monotonic() - started)
        log.info("guest_stopped", vm=self.vm, pid=pid, how=result.how, seconds=result.seconds)
        return result


def _kill(pid: int, marker: str) -> None:
    # A pidfd pins the process we checked, so the signal cannot reach a recycled pid.
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_alive(pid, marker):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


async def _wait_gone(pid: int, marker: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while process_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
