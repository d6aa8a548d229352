"""What every hypervisor driver offers, and the pieces the drivers share.

A driver runs one guest instance of one VM: ``start`` with the NBD URIs of its disks, ``stop``
gracefully within a timeout and then hard, ``status`` running/stopped/unknown with the pid. Its
files (QMP socket, pid file, console log) live in a run directory of its own, mode 0700, under
the agent's state directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from agents.errors import AgentError

GuestState = Literal["running", "stopped", "unknown"]
_EXPORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$")


class HypervisorError(AgentError):
    """A guest could not be started, stopped or queried."""


@dataclass(frozen=True)
class GuestDisk:
    """One disk of a guest: its id in agent.toml and the NBD URI it is served at."""

    id: str
    uri: str


@dataclass(frozen=True)
class GuestStatus:
    """What a driver knows of its guest."""

    state: GuestState
    pid: int | None = None
    detail: str = ""

    def json(self) -> dict[str, object]:
        """The status as the control API returns it."""
        return {"state": self.state, "pid": self.pid, "detail": self.detail}


@dataclass(frozen=True)
class StopResult:
    """How a stop ended: ``already-stopped``, ``powerdown`` (the guest shut itself down) or
    ``killed`` (it did not within the timeout); ``seconds`` it took."""

    how: Literal["already-stopped", "powerdown", "killed"]
    seconds: float

    def json(self) -> dict[str, object]:
        """The result as the control API returns it."""
        return {"how": self.how, "seconds": round(self.seconds, 3)}


class Hypervisor(Protocol):
    """A driver for one guest instance of one VM."""

    run_dir: Path

    async def start(self, disks: Sequence[GuestDisk], *, isolated: bool) -> GuestStatus:
        """Start the guest on ``disks``; ``isolated`` gives it no NIC that reaches any network."""
        ...

    async def stop(self, *, grace: float | None = None) -> StopResult:
        """Ask the guest to shut down, wait up to ``grace`` seconds, then end it hard."""
        ...

    async def status(self) -> GuestStatus:
        """Whether the guest runs, with its pid."""
        ...


def unix_nbd(uri: str) -> tuple[str, str]:
    """``(socket path, export)`` of an ``nbd+unix:///EXPORT?socket=PATH`` URI, or a
    :class:`HypervisorError` naming what is wrong with it."""
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query)
    export = parts.path.lstrip("/")
    sockets = query.get("socket", [])
    if parts.scheme != "nbd+unix" or parts.netloc or len(sockets) != 1 or not _EXPORT.match(export):
        raise HypervisorError(
            f"disk URI {uri!r} is not nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH",
            fix="serve the disk on a unix socket (the agent's exports and the broker's "
            "point-in-time exports are) and pass that URI",
        )
    if not sockets[0].startswith("/"):
        raise HypervisorError(
            f"disk URI {uri!r}: the socket path must be absolute", fix="give an absolute path"
        )
    return sockets[0], export


def private_run_dir(path: Path) -> Path:
    """Create (or accept) ``path`` as a directory only this user can enter: 0700, ours, not a
    link. Anything else there is refused, never repaired: someone else put it there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise HypervisorError(
            f"guest run directory {path} is not a private directory of this user "
            f"(mode {stat.filemode(st.st_mode)}, uid {st.st_uid})",
            fix=f"remove {path}; the agent recreates it with mode 0700",
        )
    if "," in str(path):
        # qemu's option syntax splits on commas; such a path would change the arguments' meaning.
        raise HypervisorError(
            f"guest run directory {path} contains a comma", fix="choose a state_dir without commas"
        )
    return path


def process_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (a pid reused by another
    program is not our guest)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z" and marker.encode() in cmdline
