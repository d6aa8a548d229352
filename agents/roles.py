"""A VM's role at this agent's site, persisted so that a restart keeps it (decision 041).

``<state_dir>/<vm_uuid>/_role.json`` holds the role (``PRIMARY``: the agent serves and tracks the
VM's disks; ``REPLICA``: the images belong to this site's broker, nothing is served; ``FENCED``:
the VM was failed over elsewhere, its exports are served read-only and refuse writes until the
operator reverses replication), the generation and why. Without the file the VM has the role its
configuration gives (``initial_role``), at generation 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from agents.state import _load
from common.config import VMConfig
from common.fsio import atomic_write

AgentRole = Literal["PRIMARY", "REPLICA", "FENCED"]
ROLE_FILE = "_role.json"  # disk ids cannot start with "_": never a disk's file


@dataclass
class RoleRecord:
    """The VM's role here, its generation, why (for FENCED), and whether it replicates now."""

    role: AgentRole
    generation: int = 1
    reason: str = ""
    # A VM promoted here serves its disks at once but replicates only once `reverse` gave it
    # a replica at the old primary's site.
    replicating: bool = True

    @classmethod
    def load(cls, state_dir: Path, vm: VMConfig) -> RoleRecord:
        """The persisted role, or the configured initial one."""
        raw = _load(
            state_dir / str(vm.uuid) / ROLE_FILE,
            "the VM's role",
            "restore it from backup; removing it gives the VM its configured initial_role",
        )
        if raw is None:
            return cls(role=vm.initial_role)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def save(self, state_dir: Path, vm: VMConfig) -> None:
        """Write atomically and durably."""
        path = state_dir / str(vm.uuid) / ROLE_FILE
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self), sort_keys=True).encode())


class RoleTable(dict[str, RoleRecord]):
    """The agent's roles by VM uuid; every watcher hears of each change (the MQTT host record
    says a new role, FENCED above all, as soon as the agent holds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: list[Callable[[], None]] = []

    def __setitem__(self, key: str, value: RoleRecord) -> None:
        super().__setitem__(key, value)
        for watch in self.watchers:
            watch()


def fence_reason(vm: str, why: str) -> str:
    """What a fenced export answers and logs: why, and what the operator runs."""
    return (
        f"vm {vm} is FENCED at this site ({why}); it runs at the other site now: "
        f"run `replikant reverse {vm}` to make this site its replica"
    )
