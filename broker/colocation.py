"""Agents and brokers on the same hosts (issue 12 point 7): the store must be separate storage.

Replication inside one site works like replication across sites; what it must not do is keep a
replica on the storage its source lives on, where one failure takes both. A broker started on a
host whose agent config (``[broker] host_agent_config``, default ``/etc/replikant/agent.toml``)
it can read refuses to start when its store shares a file system, or a block device under one
(a partition's disk, the physical volumes under LVM or md), with a disk that agent protects.

What can be told honestly from this host: the file system (``st_dev``) and, for local block
devices, the devices under it (``/sys/dev/block/MAJ:MIN``, following ``slaves/`` and partitions).
A network file system has no local block device, so for NFS or CephFS only "same file system"
is detected: two exports of one server's disk look apart from here (docs/operations.md).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.config import AgentConfig, BrokerConfig, load_config
from common.errors import ConfigError
from common.logs import get_logger

_log = get_logger("broker.colocation")

SYS_BLOCK = Path("/sys/dev/block")


def backing_disks(dev: int, sys_block: Path = SYS_BLOCK) -> set[str]:
    """The whole block devices under device number ``dev`` (a partition counts as its disk,
    a device-mapper or md device as the devices under it); empty when there is none (tmpfs,
    NFS, CephFS: device major 0 or not in sysfs)."""
    found: set[str] = set()
    start = sys_block / f"{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0 or not start.exists():
        return found
    todo = [start.resolve()]
    seen: set[Path] = set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        slaves = node / "slaves"
        under = sorted(slaves.iterdir()) if slaves.is_dir() else []
        if under:
            todo += [p.resolve() for p in under]
        elif (node / "partition").exists():
            found.add(node.parent.name)
        else:
            found.add(node.name)
    return found


def _device_of(path: Path) -> tuple[int, bool]:
    """``(device, is_block_device)``: a block device stands for itself, a file for its file
    system."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return st.st_rdev, True
    return st.st_dev, False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def colocation_problems(config: BrokerConfig) -> list[str]:
    """One line per protected disk of this host's agent that shares storage with the store."""
    b = config.broker
    agent_path = b.host_agent_config
    if agent_path is None or b.allow_shared_storage or not agent_path.exists():
        return []
    try:
        agent = load_config(agent_path, AgentConfig)
    except ConfigError as exc:
        _log.warning(
            "colocation_check_skipped",
            agent_config=str(agent_path),
            error=exc.message,
            fix="make the agent config readable by the broker's user, or set "
            "[broker] host_agent_config to where it is",
        )
        return []
    store_dev, _ = _device_of(_existing(b.store))
    store_disks = backing_disks(store_dev)
    problems = []
    for vm in agent.vms:
        for disk in vm.disks:
            try:
                dev, is_block = _device_of(disk.image)
            except OSError:
                continue  # the agent reports a missing image itself
            shared = store_disks & backing_disks(dev)
            if dev == store_dev and not is_block:
                where = f"the same file system (device {os.major(dev)}:{os.minor(dev)})"
            elif shared:
                where = f"the same block device ({', '.join(sorted(shared))})"
            else:
                continue
            problems.append(
                f"broker.store {b.store} is on {where} as disk {disk.id} of vm {vm.name} "
                f"({disk.image}) that the agent on this host protects ({agent_path}): one "
                "failure would lose the VM and its replica together; put the store on separate "
                "storage (docs/operations.md, 'Agents and brokers on the same hosts')"
            )
    return problems


__all__ = ["backing_disks", "colocation_problems"]
