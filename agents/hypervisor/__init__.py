"""Hypervisor drivers: start, stop and query a VM's guest (docs/agent.md, "Guests").

``qemu`` runs qemu-system-x86_64 itself; ``command`` runs the operator's programs. libvirt is not
offered: it cannot be tested for real on the machines this project is built on.
"""

from __future__ import annotations

from pathlib import Path

from agents.hypervisor.base import (
    GuestDisk,
    GuestStatus,
    Hypervisor,
    HypervisorError,
    StopResult,
)
from agents.hypervisor.command import CommandDriver
from agents.hypervisor.qemu import QemuDriver
from common.hypervisorconfig import CommandSettings, QemuSettings

__all__ = [
    "GuestDisk",
    "GuestStatus",
    "Hypervisor",
    "HypervisorError",
    "StopResult",
    "driver_for",
]


def driver_for(
    vm: str, vm_uuid: str, settings: QemuSettings | CommandSettings, run_dir: Path
) -> Hypervisor:
    """The driver ``settings`` name, for one guest instance whose files live in ``run_dir``."""
    if isinstance(settings, QemuSettings):
        return QemuDriver(vm, settings, run_dir)
    return CommandDriver(vm, vm_uuid, settings, run_dir)
