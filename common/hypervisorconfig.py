"""`[vms.hypervisor]` / `[standby.hypervisor]` of agent.toml: how this host runs a VM's guest.

Two drivers (agents/hypervisor/): ``qemu`` runs ``qemu-system-x86_64`` itself, each disk attached
over NBD; ``command`` runs the operator's own start/stop/status programs with the disks' NBD URIs
passed in. Every program is an argv list, never a shell line, so a VM or disk name can never
become shell syntax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Networking must stay in network_args: a test copy drops them to boot isolated, so a NIC hidden
# in extra_args would reach the production network from a test.
_NET_FLAGS = frozenset({"-nic", "-netdev", "-net"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QemuSettings(_Strict):
    """``driver = "qemu"``: the guest runs under ``qemu-system-x86_64`` started by the agent."""

    driver: Literal["qemu"]
    binary: str = "qemu-system-x86_64"
    accel: Literal["auto", "kvm", "tcg"] = Field(
        default="auto",
        description="auto: KVM when /dev/kvm opens and the CPU offers vmx/svm, TCG otherwise",
    )
    machine: str = "q35"
    memory_mib: int = Field(default=512, ge=64, le=1024 * 1024)
    cpus: int = Field(default=1, ge=1, le=256)
    disk_bus: Literal["virtio", "nvme"] = "virtio"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    network_args: list[str] = Field(
        default_factory=list,
        description="qemu arguments of the guest's NICs; dropped for an isolated (test) copy",
    )
    extra_args: list[str] = Field(default_factory=list)
    stop_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("extra_args")
    @classmethod
    def _no_network(cls, value: list[str]) -> list[str]:
        for arg in value:
            if arg in _NET_FLAGS:
                raise ValueError(
                    f"{arg} belongs in network_args, not extra_args: a test copy must be able "
                    "to drop every NIC"
                )
        return value


class CommandSettings(_Strict):
    """``driver = "command"``: the operator's programs (argv lists) start, stop and query it.

    Each runs with ``REPLIKANT_VM``, ``REPLIKANT_VM_UUID``, ``REPLIKANT_ISOLATED`` (1 for a test
    copy), ``REPLIKANT_DISKS`` (``id=uri`` words) and ``REPLIKANT_DISK_<ID>`` (upper-cased, ``-``
    and ``.`` as ``_``) in its environment; ``{vm}`` and ``{disk:ID}`` in an argument are
    replaced by the VM's name and that disk's NBD URI. ``status`` exits 0 when the guest runs
    (printing its pid first if it knows it), 3 when it is stopped, anything else for unknown.
    """

    driver: Literal["command"]
    start: list[str] = Field(min_length=1)
    stop: list[str] = Field(min_length=1)
    status: list[str] = Field(min_length=1)
    kill: list[str] | None = Field(
        default=None, description="run when stop did not end the guest within the timeout"
    )
    stop_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    command_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)


HypervisorConfig = Annotated[QemuSettings | CommandSettings, Field(discriminator="driver")]
