"""Run a daemon the way its systemd unit would, on a machine where systemd is not PID 1.

`systemd-run` needs a running systemd manager, which test machines and CI containers lack, so
this module reads the unit file and applies what it says itself, in the order systemd's exec
step does: a private mount namespace (``ProtectSystem=strict`` with the unit's writable paths,
``PrivateTmp``, ``ProtectProc=``/``ProcSubset=`` as procfs options), the unit's
``User=``/``Group=`` with the user's groups, ``UMask=``, an empty ``CapabilityBoundingSet=``,
``NoNewPrivileges=``, ``MemoryDenyWriteExecute=`` (``PR_SET_MDWE``) and ``SystemCallFilter=``
(a seccomp filter built with libseccomp from `systemd-analyze syscall-filter`'s sets). The mount
namespace needs CAP_SYS_ADMIN, which some containers withhold; there the rest still applies and
the test says what it left out. The options that need systemd's own machinery
(``PrivateDevices``, ``ProtectHome``, user and other namespaces, cgroup device rules) are not
emulated; `systemd-analyze security` still scores them.

Because the test follows the unit file, tightening the unit beyond what a daemon needs turns the
test red.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import grp
import os
import pwd
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SYSUSERS = DEPLOY / "replikant.sysusers"

# <sys/mount.h>, <linux/sched.h>, <linux/prctl.h>, <seccomp.h>
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 16384, 1 << 18, 1 << 21
_MOUNT_FLAGS = {
    "nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME,
}  # fmt: skip
_CLONE_NEWNS = 0x00020000
_PR_SET_KEEPCAPS, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 8, 24, 38
_LINUX_CAPABILITY_VERSION_3, _CAP_DAC_READ_SEARCH = 0x20080522, 2
_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
_SCMP_ACT_ALLOW = 0x7FFF0000
# systemd always lets these through, whatever the filter says (systemd.exec(5)).
_ALWAYS_ALLOWED = ("execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn")
_API_MOUNTS = ("/proc", "/sys", "/dev")
"""ProtectSystem=strict leaves these to ProtectKernel*/PrivateDevices."""


@dataclass(frozen=True)
class UnitFile:
    """The ``[Service]`` section of a unit file: every key with its values in file order."""

    path: Path
    service: Mapping[str, Sequence[str]]

    @classmethod
    def read(cls, path: Path) -> UnitFile:
        """Parse ``path`` (no drop-ins: the test runs the unit as shipped)."""
        section = ""
        service: dict[str, list[str]] = {}
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                key, _, value = line.partition("=")
                service.setdefault(key.strip(), []).append(value.strip())
        return cls(path, service)

    def value(self, key: str) -> str | None:
        """The last assignment of ``key`` (what systemd uses for single-valued keys)."""
        values = self.service.get(key)
        return values[-1] if values else None

    def yes(self, key: str) -> bool:
        """Whether a boolean key is set to true."""
        return (self.value(key) or "no").lower() in ("yes", "true", "1", "on")

    @property
    def user(self) -> str:
        """``User=``; the test refuses a unit that would run as root."""
        user = self.value("User")
        assert user, f"{self.path.name} sets no User="
        assert user != "root", f"{self.path.name} runs as root"
        return user

    @property
    def group(self) -> str:
        """``Group=`` (the user's primary group when unset)."""
        return self.value("Group") or grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name

    @property
    def umask(self) -> int:
        """``UMask=`` (systemd's default is 0022)."""
        return int(self.value("UMask") or "0022", 8)

    @property
    def writable(self) -> list[str]:
        """The unit keys whose directories stay writable under ``ProtectSystem=strict``."""
        keys = ("StateDirectory", "RuntimeDirectory", "ReadWritePaths")
        return [key for key in keys if key in self.service]


def exposure(unit: Path) -> tuple[float, str]:
    """`systemd-analyze security --offline=true` on the unit file: (score, the whole report)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    report = result.stdout + result.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", report)
    assert found, f"systemd-analyze gave no exposure level for {unit}:\n{report}"
    return float(found.group(1)), report


def ensure_users() -> None:
    """Create the units' users and group from deploy/replikant.sysusers (idempotent)."""
    subprocess.run(
        ["systemd-sysusers", "-"], input=SYSUSERS.read_bytes(), capture_output=True,
        timeout=60, check=True,
    )  # fmt: skip


@cache
def _syscall_sets() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    sets: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in out.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw.startswith(" "):
            current = sets.setdefault(line, [])
        else:
            current.append(line)
    return sets


def _expand(names: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= _expand(_syscall_sets()[name])
        else:
            out.add(name)
    return out


def allowed_syscalls(unit: UnitFile) -> set[str] | None:
    """The system calls the unit's ``SystemCallFilter=`` lines allow (``None``: no filter)."""
    lines = unit.service.get("SystemCallFilter", [])
    if not lines:
        return None
    allowed: set[str] = set()
    for i, line in enumerate(lines):
        deny = line.startswith("~")
        names = _expand(line.removeprefix("~").split())
        assert not (deny and i == 0), "the test only models allow-list filters"
        allowed = allowed - names if deny else allowed | names
    return allowed | set(_ALWAYS_ALLOWED)


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _seccomp_filter(unit: UnitFile) -> Callable[[], int] | None:
    """Build the unit's seccomp filter now (in the parent); return the call that loads it."""
    allowed = allowed_syscalls(unit)
    if allowed is None:
        return None
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    err = (unit.value("SystemCallErrorNumber") or "").upper()
    # Without SystemCallErrorNumber= systemd kills the process on a forbidden call.
    default = 0x00050000 | getattr(errno, err) if err else 0x80000000
    ctx = lib.seccomp_init(default)
    for name in sorted(allowed):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr == -1:
            continue  # not a system call of this architecture (systemd skips them too)
        lib.seccomp_rule_add(ctx, _SCMP_ACT_ALLOW, nr, 0)
    return lambda: int(lib.seccomp_load(ctx))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        os.write(2, f"sandbox: {what} failed: {os.strerror(code)}\n".encode())
        raise OSError(code, what)


@cache
def mount_namespaces() -> bool:
    """Whether this machine lets us build a private mount namespace (a container without
    CAP_SYS_ADMIN does not); without one, ProtectSystem and PrivateTmp are not emulated."""
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return probe.returncode == 0


def _search_only_until_exec() -> None:
    """Keep CAP_DAC_READ_SEARCH (and nothing else) until execve, which drops it.

    The test's interpreter may live where the daemon's user cannot search (a pyenv under /root);
    setpriv does the same. A program run by a non-root user without file capabilities gets an
    empty capability set at execve, so the daemon itself starts without any capability.
    """
    bit = 1 << _CAP_DAC_READ_SEARCH
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    # Two __user_cap_data_struct {effective, permitted, inheritable}: capabilities 0-31, 32-63.
    data = (ctypes.c_uint32 * 6)(bit, bit, 0, 0, 0, 0)
    _check(_libc().capset(header, data), "capset")


def _proc_options(unit: UnitFile) -> str | None:
    """procfs mount options for ``ProtectProc=`` and ``ProcSubset=`` (``None``: leave /proc)."""
    options = []
    if unit.value("ProtectProc") in ("invisible", "noaccess", "ptraceable"):
        options.append(f"hidepid={unit.value('ProtectProc')}")
    if unit.value("ProcSubset") == "pid":
        options.append("subset=pid")
    return ",".join(options) or None


def _private_mounts(writable: Sequence[Path], proc: str | None) -> None:
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    if proc is not None:
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _check(libc.mount(b"proc", b"/proc", b"proc", flags, proc.encode()), f"/proc {proc}")
    for path in writable:
        p = bytes(path)
        _check(libc.mount(p, p, None, _MS_BIND | _MS_REC, None), f"bind {path}")
    keep = {str(p) for p in writable}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, options = fields[4], fields[5].split(",")
        if point in keep or any(point == a or point.startswith(a + "/") for a in _API_MOUNTS):
            continue
        if any(point.startswith(k + "/") for k in keep):
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= _MOUNT_FLAGS.get(option, 0)
        _check(libc.mount(None, point.encode(), None, flags, None), f"read-only {point}")


_CHECKOUT = Path(__file__).resolve().parents[2]


def _private_tmp(libc: ctypes.CDLL) -> None:
    """Mount an empty /tmp, as PrivateTmp does. A checkout that itself lies under /tmp (a CI
    clone) is bound back in at its own path first: under systemd the code lives in /usr or /opt,
    never in the private /tmp, so hiding it would test a layout no unit has."""
    keep = _CHECKOUT if _CHECKOUT.is_relative_to("/tmp") else None
    fd = os.open(keep, os.O_PATH | os.O_DIRECTORY) if keep is not None else None
    _check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=1777"),
           "PrivateTmp")  # fmt: skip
    if keep is not None and fd is not None:
        keep.mkdir(parents=True)
        source = f"/proc/self/fd/{fd}".encode()
        _check(libc.mount(source, bytes(keep), None, _MS_BIND | _MS_REC, None), f"bind {keep}")
        os.close(fd)


def _hidden_interpreter() -> tuple[Path, Path] | None:
    """``(folder, its child on the way)`` for the first folder on the way to the test's
    interpreter that other users may not search (a pyenv under /root), else None."""
    real = Path(sys.executable).resolve()
    for folder in reversed(real.parents[:-1]):  # from the top, / excluded
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder, folder / real.relative_to(folder).parts[0]
    return None


def _reachable_interpreter(libc: ctypes.CDLL, hidden: tuple[Path, Path]) -> None:
    """Mount an open copy of the closed folder holding only the interpreter's subtree. A unit's
    interpreter lives where its user may run it (/usr, /opt): the agent runs it again for its
    shipping process (decision 029), which CAP_DAC_READ_SEARCH, kept only until the first exec,
    cannot cover."""
    folder, child = hidden
    fd = os.open(child, os.O_PATH | os.O_DIRECTORY)
    _check(libc.mount(b"tmpfs", bytes(folder), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755"),
           f"open {folder}")  # fmt: skip
    child.mkdir()
    _check(libc.mount(f"/proc/self/fd/{fd}".encode(), bytes(child), None, _MS_BIND | _MS_REC,
                      None), f"bind {child}")  # fmt: skip
    os.close(fd)


def sandboxed(
    unit: UnitFile, argv: Sequence[str], *, paths: Mapping[str, Sequence[Path]], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` under ``unit``'s user, umask and sandbox; ``paths`` maps each of the unit's
    writable-directory keys (``StateDirectory``...) to the directories it stands for here, as an
    operator's drop-in would. Output goes to ``log``."""
    user = pwd.getpwnam(unit.user)
    gid = grp.getgrnam(unit.group).gr_gid
    groups = os.getgrouplist(unit.user, gid)
    writable = [p for key in unit.writable for p in paths.get(key, ())]
    load_filter = _seccomp_filter(unit)
    libc = _libc()
    strict = unit.value("ProtectSystem") == "strict" and mount_namespaces()
    private_tmp = unit.yes("PrivateTmp") and mount_namespaces()
    proc = _proc_options(unit) if mount_namespaces() else None
    # Read now: the child's /proc may be a subset=pid one without /proc/sys.
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    drop_all_capabilities = unit.service.get("CapabilityBoundingSet") == [""]
    hidden = _hidden_interpreter() if mount_namespaces() else None

    def enter() -> None:
        # Runs in the child between fork and exec, as root, in systemd's order: mounts, then
        # credentials, then the restrictions that would forbid switching credentials.
        if strict or private_tmp or proc:
            _private_mounts(writable if strict else [], proc)
        if private_tmp:
            _private_tmp(libc)
        if hidden is not None:
            if not (strict or private_tmp or proc):
                _private_mounts([], None)  # a mount namespace of its own, nothing read-only
            _reachable_interpreter(libc, hidden)
        if drop_all_capabilities:
            for cap in range(last_cap + 1):
                _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
        os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
        _search_only_until_exec()
        os.umask(unit.umask)
        if unit.yes("NoNewPrivileges") or load_filter is not None:
            _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "NoNewPrivileges")
        if unit.yes("MemoryDenyWriteExecute"):
            _check(libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "MDWE")
        if load_filter is not None and load_filter() != 0:
            raise OSError(errno.EPERM, "seccomp_load")

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["HOME"] = user.pw_dir
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        # Only a preexec function can switch namespace, credentials and filters in systemd's
        # order; the test that calls this runs no other thread that could hold a lock.
        preexec_fn=enter,  # noqa: PLW1509
        cwd="/", env=env, start_new_session=True,
    )  # fmt: skip
