"""What the agent checks before it starts, and the names it derives from its config.

Every problem of an agent config is found here, before anything is opened, and reported one
line each (:func:`validate`); the export names and socket paths checked here are the ones the
daemon then serves.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from agents.control import control_gid, control_socket_path
from agents.disk import IN_USE_FIX, image_in_use, in_use_message
from agents.errors import AgentError
from agents.hypervisor.qmp import UNIX_PATH_MAX
from certs.service import startup_problems
from common.config import (
    AgentConfig,
    DiskConfig,
    Policy,
    VMConfig,
    access_problem,
    parse_listen,
    path_problem,
    writable_dir_problems,
)
from common.errors import refuse_to_start
from common.hypervisorconfig import QemuSettings
from common.tls import Identity, TLSError, client_context

NBD_DEFAULT_HOST = "127.0.0.1"  # `nbd.tcp_listen = ":10809"` listens on loopback only


def export_name(vm: VMConfig, disk: DiskConfig) -> str:
    """The NBD export name of a disk: ``disk.export`` or ``<vm>-<disk>``."""
    return disk.export or f"{vm.name}-{disk.id}"


def socket_path(config: AgentConfig, name: str) -> Path:
    """The unix socket that serves export ``name``."""
    return config.nbd.socket_dir / f"{name}.sock"


def policy_for(config: AgentConfig, vm: VMConfig) -> Policy | None:
    """The VM's policy: named, else the first whose selector matches its labels, else default.

    Returns None only for a named policy that does not exist.
    """
    if vm.policy is not None:
        return config.policies.get(vm.policy)
    for policy in config.policies.values():
        if policy.selector and all(vm.labels.get(k) == v for k, v in policy.selector.items()):
            return policy
    return config.policies.get("default", Policy())


_PATH_FIX = "give an absolute path without '..' components (e.g. /var/lib/replikant)"


def _check_path(key: str, path: Path, problems: list[str]) -> bool:
    """Whether ``path`` is absolute and normalised; if not, one problem naming ``key``."""
    problem = path_problem(path)
    if problem is not None:
        problems.append(f"{key}: {str(path)!r} {problem}; fix: {_PATH_FIX}")
    return problem is None


def check_config(config: AgentConfig) -> list[str]:
    """Every problem that would stop the agent from working, one message each (empty: fine)."""
    problems: list[str] = []
    for label, path in (
        ("CA certificate", config.tls.ca),
        ("certificate", config.tls.cert),
        ("private key", config.tls.key),
    ):
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            problems.append(f"tls: {label} {path} is unreadable: {exc.strerror}")
    if not any(p.startswith("tls:") for p in problems):
        try:
            client_context(config.tls)
        except TLSError as exc:
            problems.append(f"tls: {exc}")
        else:
            problems += startup_problems(config.tls, Identity.agent(config.agent.host))
    for url in config.broker.urls:
        if not url.startswith("https://"):
            problems.append(f"broker.urls: {url!r} must be an https:// URL (mutual TLS)")
    if config.nbd.tcp_listen is not None:
        try:
            parse_listen(config.nbd.tcp_listen, default_host=NBD_DEFAULT_HOST)
        except ValueError as exc:
            problems.append(f"nbd.tcp_listen: {exc}")
    if _check_path("agent.state_dir", config.agent.state_dir, problems):
        problems += writable_dir_problems(config.agent.state_dir, "agent.state_dir", mode=0o700)
    if _check_path("nbd.socket_dir", config.nbd.socket_dir, problems):
        # NBD clients (QEMU, of the agent's group) must reach the sockets inside.
        problems += writable_dir_problems(config.nbd.socket_dir, "nbd.socket_dir", mode=0o750)
    control = control_socket_path(config)
    if _check_path("agent.control_socket", control, problems) and (
        len(os.fsencode(control)) > UNIX_PATH_MAX
    ):
        problems.append(
            f"agent.control_socket: {control} is longer than {UNIX_PATH_MAX} bytes; "
            "fix: set a shorter control_socket"
        )
    try:
        control_gid(config)
    except AgentError as exc:
        problems.append(str(exc))

    exports: dict[str, str] = {}
    names: dict[str, int] = {}
    uuids: dict[str, int] = {}
    for i, vm in enumerate(config.vms):
        where = f"vms[{i}] ({vm.name})"
        if vm.name in names:
            problems.append(f"{where}: VM name {vm.name!r} is also used by vms[{names[vm.name]}]")
        names.setdefault(vm.name, i)
        if str(vm.uuid) in uuids:
            problems.append(f"{where}: uuid {vm.uuid} is also used by vms[{uuids[str(vm.uuid)]}]")
        uuids.setdefault(str(vm.uuid), i)
        policy = policy_for(config, vm)
        if policy is None:
            known = ", ".join(sorted(config.policies)) or "none"
            problems.append(f"{where}: unknown policy {vm.policy!r} (defined: {known})")
        else:
            problems.extend(f"{where}: {p}" for p in _check_policy(policy))
        disk_ids: set[str] = set()
        for j, disk in enumerate(vm.disks):
            dwhere = f"vms[{i}].disks[{j}] ({vm.name}/{disk.id})"
            if disk.id in disk_ids:
                problems.append(f"{dwhere}: disk id {disk.id!r} appears twice in VM {vm.name}")
            disk_ids.add(disk.id)
            name = export_name(vm, disk)
            if name in exports:
                problems.append(
                    f"{dwhere}: export name {name!r} is already used by {exports[name]}"
                )
            exports.setdefault(name, f"{vm.name}/{disk.id}")
            sock = socket_path(config, name)
            if len(os.fsencode(sock)) > UNIX_PATH_MAX:
                problems.append(
                    f"{dwhere}: socket path {sock} is longer than {UNIX_PATH_MAX} bytes"
                )
            if vm.initial_role == "REPLICA":
                continue  # the broker creates the replica image; it is checked at promotion
            if _check_path(f"vms[{i}].disks[{j}].image", disk.image, problems):
                problems.extend(f"{dwhere}: {p}" for p in _check_image(disk.image, disk.exclude))
    return problems + _check_guests(config)


def _check_guests(config: AgentConfig) -> list[str]:
    """[[standby]] names and uuids are unique and unlike [[vms]]; every hypervisor's programs
    and boot files exist (a failover must not be the first to find out they do not)."""
    problems: list[str] = []
    taken = {vm.name: f"vms ({vm.name})" for vm in config.vms}
    taken.update({str(vm.uuid): f"vms ({vm.name})" for vm in config.vms})
    guests = [(f"vms[{i}].hypervisor", vm.hypervisor) for i, vm in enumerate(config.vms)]
    for i, sb in enumerate(config.standby):
        where = f"standby[{i}] ({sb.name})"
        for key in (sb.name, str(sb.uuid)):
            if key in taken:
                problems.append(f"{where}: {key} is already used by {taken[key]}")
            taken[key] = where
        guests.append((f"standby[{i}].hypervisor", sb.hypervisor))
    for where, hv in guests:
        if hv is None:
            continue
        programs = (
            [hv.binary] if isinstance(hv, QemuSettings) else [hv.start[0], hv.stop[0], hv.status[0]]
        )
        problems += [
            f"{where}: program {prog!r} is not found or not executable"
            for prog in programs
            if shutil.which(prog) is None
        ]
        if isinstance(hv, QemuSettings):
            problems += [
                f"{where}: {path} does not exist"
                for path in (hv.kernel, hv.initrd)
                if path is not None and not path.is_file()
            ]
    return problems


def _check_policy(policy: Policy) -> list[str]:
    out = []
    if (
        policy.app_consistent_every
        and policy.freeze_command is None
        and (policy.guest_agent_socket is None)
    ):
        out.append(
            "app_consistent_every is set but neither freeze_command nor "
            "guest_agent_socket says how to freeze"
        )
    if (policy.freeze_command is None) != (policy.thaw_command is None):
        out.append("freeze_command and thaw_command must be given together")
    return out


def _check_image(path: Path, exclude: bool) -> list[str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"image {path} does not exist"]
    except OSError as exc:
        return [f"image {path} cannot be examined: {exc.strerror}"]
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return [f"image {path} is neither a regular file nor a block device"]
    problem = access_problem(
        path,
        "image",
        mode=os.R_OK | os.W_OK,
        fix="`chown {user} {path}` for an image file, group `disk` for a block device",
    )
    if problem is not None:
        return [problem]
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return [f"image {path} is empty (size 0)"]
    if stat.S_ISREG(st.st_mode) and st.st_size % 512:
        return [f"image {path} size {st.st_size} is not a multiple of 512"]
    if not exclude and image_in_use(path):
        return [f"{in_use_message(path)}; fix: {IN_USE_FIX}"]
    return []


def validate(config: AgentConfig, source: str = "agent config") -> None:
    """Raise :class:`ConfigError` listing every problem of ``config``."""
    refuse_to_start(check_config(config), source=source, service="agent")
