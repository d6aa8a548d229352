"""The ``command`` driver: the operator's own start/stop/status programs run the guest.

Each program is an argv list from agent.toml, run without a shell; the VM and its disks reach it
through the environment and ``{vm}`` / ``{disk:ID}`` placeholders (common/hypervisorconfig.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from agents.hypervisor.base import (
    GuestDisk,
    GuestStatus,
    HypervisorError,
    StopResult,
    private_run_dir,
)
from common.hypervisorconfig import CommandSettings
from common.logs import get_logger

log = get_logger("agents.hypervisor.command")

_PLACEHOLDER = re.compile(r"\{(vm|disk:[A-Za-z0-9._-]+)\}")
_STOPPED = 3  # the LSB init-script code for "not running"


def _env_key(disk_id: str) -> str:
    return "REPLIKANT_DISK_" + re.sub(r"[^A-Za-z0-9]", "_", disk_id).upper()


class CommandDriver:
    """One guest instance run by the operator's programs."""

    def __init__(self, vm: str, vm_uuid: str, settings: CommandSettings, run_dir: Path) -> None:
        self.vm = vm
        self.vm_uuid = vm_uuid
        self.settings = settings
        self.run_dir = run_dir
        self._disks: list[GuestDisk] = []
        self._isolated = False

    def environment(self, disks: Sequence[GuestDisk], *, isolated: bool) -> dict[str, str]:
        """What the programs find in their environment, beside the agent's own."""
        env = {
            "REPLIKANT_VM": self.vm,
            "REPLIKANT_VM_UUID": self.vm_uuid,
            "REPLIKANT_ISOLATED": "1" if isolated else "0",
            "REPLIKANT_RUN_DIR": str(self.run_dir),
            "REPLIKANT_DISKS": " ".join(f"{d.id}={d.uri}" for d in disks),
        }
        env.update({_env_key(d.id): d.uri for d in disks})
        return env

    def expand(self, argv: Sequence[str], disks: Sequence[GuestDisk]) -> list[str]:
        """``argv`` with ``{vm}`` and ``{disk:ID}`` replaced; an unknown disk is an error."""
        uris = {d.id: d.uri for d in disks}

        def one(m: re.Match[str]) -> str:
            key = m.group(1)
            if key == "vm":
                return self.vm
            disk = key.removeprefix("disk:")
            if disk not in uris:
                raise HypervisorError(
                    f"vm {self.vm}: {{{key}}} names no disk of it (disks: {sorted(uris)})",
                    fix="use the disk ids of the VM's [[vms.disks]] in the command",
                )
            return uris[disk]

        return [_PLACEHOLDER.sub(one, arg) for arg in argv]

    async def _run(self, what: str, argv: Sequence[str]) -> tuple[int, str]:
        env = {**os.environ, **self.environment(self._disks, isolated=self._isolated)}
        private_run_dir(self.run_dir)
        # Output goes to a file, not a pipe: a start program that leaves a daemon behind holding
        # its stdout must not make us wait for that daemon's end.
        out_path = self.run_dir / f"{what}.out"
        fd = os.open(
            out_path,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.expand(argv, self._disks),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
            )
        except OSError as exc:
            raise HypervisorError(
                f"vm {self.vm}: the {what} command {argv[0]!r} cannot run: {exc.strerror}",
                fix=f"fix [hypervisor] {what} of the VM in agent.toml",
            ) from exc
        finally:
            os.close(fd)
        try:
            async with asyncio.timeout(self.settings.command_timeout_seconds):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HypervisorError(
                f"vm {self.vm}: the {what} command did not finish within "
                f"{self.settings.command_timeout_seconds} s",
                fix="make it return once the guest is started/stopped, or raise "
                "command_timeout_seconds",
            ) from None
        return code, out_path.read_text(errors="replace").strip()

    async def start(self, disks: Sequence[GuestDisk], *, isolated: bool) -> GuestStatus:
        """Run ``start``; a non-zero exit is an error carrying its output."""
        self._disks, self._isolated = list(disks), isolated
        code, out = await self._run("start", self.settings.start)
        if code != 0:
            log.warning("guest_start_failed", vm=self.vm, code=code, error=out)
            raise HypervisorError(
                f"vm {self.vm}: the start command failed (exit {code}): {out}",
                fix="run it by hand with the same REPLIKANT_* environment to see why",
            )
        status = await self.status()
        log.info("guest_started", vm=self.vm, pid=status.pid, isolated=isolated)
        return status

    async def status(self) -> GuestStatus:
        """Exit 0: running (first word of the output: the pid, if numeric); 3: stopped."""
        code, out = await self._run("status", self.settings.status)
        if code == 0:
            first = out.split()[0] if out.split() else ""
            return GuestStatus("running", int(first) if first.isdigit() else None, out)
        if code == _STOPPED:
            return GuestStatus("stopped", None, out)
        return GuestStatus("unknown", None, f"status exited {code}: {out}")

    async def stop(self, *, grace: float | None = None) -> StopResult:
        """Run ``stop``, wait for ``status`` to say stopped, then ``kill`` if configured."""
        limit = self.settings.stop_timeout_seconds if grace is None else grace
        started = time.monotonic()
        if (await self.status()).state == "stopped":
            return StopResult("already-stopped", 0.0)
        code, out = await self._run("stop", self.settings.stop)
        if code != 0:
            log.warning("guest_stop_command_failed", vm=self.vm, code=code, error=out)
        while time.monotonic() - started < limit:
            if (await self.status()).state == "stopped":
                return StopResult("powerdown", time.monotonic() - started)
            await asyncio.sleep(0.2)
        if self.settings.kill is None:
            raise HypervisorError(
                f"vm {self.vm}: still running {limit} s after the stop command",
                fix="configure [hypervisor] kill, or stop the guest by hand",
            )
        await self._run("kill", self.settings.kill)
        if (await self.status()).state != "stopped":
            raise HypervisorError(
                f"vm {self.vm}: still running after the kill command",
                fix="check the kill command; stop the guest by hand",
            )
        return StopResult("killed", time.monotonic() - started)
