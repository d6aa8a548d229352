"""The agent's control surface: a unix socket whose file permissions decide who may use it.

``[agent] control_socket`` (default ``<nbd.socket_dir>/control/agent.sock``) serves the control
API (status, verify, repair, seed export/cancel; docs/protocol/http.md). Its directory is the
agent's own, mode 0750, and the socket 0660, both of group ``control_group`` (default: the
agent's group): only the agent's user and that group can connect. A planted link or a
directory someone else owns or may write to is refused, never followed or repaired.

Nothing a browser can forge changes state here: a unix socket is out of a web page's reach, and
as defence in depth a request that carries ``Origin`` or ``Sec-Fetch-Site`` (a browser's
marks) is refused with 403, and a state-changing request that is not ``application/json`` (a
"simple" cross-site POST) with 415. Every state-changing request is logged once with who asked
(the caller's pid, uid and gid from ``SO_PEERCRED``), and so is every refusal.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from agents.errors import AgentError
from common.config import AgentConfig
from common.logs import get_logger

log = get_logger("agents.control")

SOCKET_NAME = "agent.sock"
_UCRED = struct.Struct("3i")
_READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})
_BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def control_socket_path(config: AgentConfig) -> Path:
    """Where the control API listens: ``[agent] control_socket`` or the default."""
    return config.agent.control_socket or config.nbd.socket_dir / "control" / SOCKET_NAME


def control_gid(config: AgentConfig) -> int:
    """The group of the control socket; raises :class:`AgentError` for an unknown group."""
    name = config.agent.control_group
    if name is None:
        return os.getegid()
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AgentError(
            f"agent.control_group: no group {name!r} on this host",
            fix="create the group (groupadd NAME) or name an existing one",
        ) from None


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    def fields(self) -> dict[str, int]:
        """The peer as log fields."""
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid}


def peer_of(request: web.Request) -> Peer | None:
    """The credentials of the process that sent ``request`` (None off a unix socket)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid)


def refusal(status: int, code: str, message: str, fix: str, **details: Any) -> web.Response:
    """A JSON refusal in the shape every Replikant endpoint uses."""
    body = {"error": code, "message": message, "fix": fix, "details": details}
    return web.json_response(body, status=status)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what a browser could send; log every state-changing request with who asked."""
    peer = peer_of(request)
    who = peer.fields() if peer is not None else {}
    where = {"method": request.method, "path": request.path}
    vm = request.match_info.get("vm")
    if vm is not None:
        where["vm"] = vm
    marks = [h for h in _BROWSER_HEADERS if h in request.headers]
    if marks:
        log.warning(
            "control_request_refused", reason="browser_request", headers=marks, **where, **who
        )
        return refusal(
            403,
            "browser_request",
            f"the agent's control API refuses requests that carry {', '.join(marks)}: "
            "a browser sent it, and no web page may drive the agent",
            "use `replikant` (or any client that is not a browser) on the agent's host",
            headers=marks,
        )
    if request.method not in _READ_ONLY and request.content_type != "application/json":
        log.warning(
            "control_request_refused",
            reason="unsupported_media_type",
            content_type=request.content_type,
            **where,
            **who,
        )
        return refusal(
            415,
            "unsupported_media_type",
            f"{request.method} {request.path} needs a JSON body (Content-Type: application/json), "
            f"got {request.content_type!r}",
            "send the request body as JSON with Content-Type: application/json",
            content_type=request.content_type,
        )
    if request.method not in _READ_ONLY:
        log.info("control_request", **where, **who)
    return await handler(request)


def _refuse_dir(directory: Path, why: str, fix: str) -> AgentError:
    return AgentError(f"control socket directory {directory} {why}", fix=fix)


def open_control_socket(path: Path, gid: int) -> socket.socket:
    """Bind the listening control socket at ``path`` (directory 0750, socket 0660, group ``gid``).

    The directory is created if missing and opened without following a link; it must belong to
    the agent's user and be writable by nobody else. The socket is bound through that directory's
    descriptor, so a directory swapped in after the check is never bound into.
    """
    directory = path.parent
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o750)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(directory):
            raise _refuse_dir(
                directory,
                "is a symbolic link",
                "remove the link; the agent creates the directory itself",
            ) from None
        raise _refuse_dir(
            directory, f"cannot be opened: {exc.strerror}", "check the path"
        ) from None
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid():
            raise _refuse_dir(
                directory,
                f"belongs to user id {st.st_uid}, not to the agent's user ({os.geteuid()})",
                "remove it or give it to the agent's user; the agent creates it itself",
            )
        if st.st_mode & 0o022:
            raise _refuse_dir(
                directory,
                f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod 0750 {directory} (anyone who may write there could replace the socket)",
            )
        # chown only when needed: the unit's system-call filter (~@privileged) refuses chown
        # outright, and a directory the agent made already carries its own group.
        if st.st_gid != gid:
            try:
                os.fchown(dfd, -1, gid)
            except PermissionError:
                raise AgentError(
                    f"agent.control_group: the agent's user may not give {directory} to group "
                    f"id {gid}",
                    fix="add the agent's user to that group, or run the agent as root",
                ) from None
        os.fchmod(dfd, 0o750)
        _remove_stale(dfd, directory, path.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{dfd}/{path.name}")
            if os.stat(path.name, dir_fd=dfd, follow_symlinks=False).st_gid != gid:
                os.chown(path.name, -1, gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(path.name, 0o660, dir_fd=dfd)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(dfd)


def _remove_stale(dfd: int, directory: Path, name: str) -> None:
    """Remove a socket a previous run left behind; anything else there is refused."""
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise _refuse_dir(
            directory,
            f"holds {name}, which is not a socket",
            "remove it; only the agent's socket belongs there",
        )
    os.unlink(name, dir_fd=dfd)


def read_status(sock: Path, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /v1/status`` over the control socket ``sock`` (the client of ``agent status``).

    Raises ``OSError`` (``PermissionError`` when the caller may not use the socket) or
    ``ValueError`` when the answer is not JSON.
    """
    conn = http.client.HTTPConnection("agent", timeout=timeout)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.settimeout(timeout)
    try:
        unix.connect(str(sock))
        conn.sock = unix
        conn.request("GET", "/v1/status")
        doc: dict[str, Any] = json.loads(conn.getresponse().read())
    finally:
        conn.close()
        unix.close()
    return doc


def remove_control_socket(path: Path) -> None:
    """Remove the socket file at stop (a stale one would only be removed at the next start)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
