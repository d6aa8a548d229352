"""The few QMP commands the qemu driver needs, over the guest's private unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from agents.hypervisor.base import HypervisorError

UNIX_PATH_MAX: Final = 107
"""Bytes of a unix socket's path (``sun_path`` is 108 with its terminating NUL)."""


@contextlib.contextmanager
def reachable(sock: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """A path to the unix socket ``sock`` that fits ``sun_path``, and the descriptors it needs.

    ``sock`` itself when it fits; under a deep state directory (a guest's run directory can be
    over 107 bytes deep), ``/proc/self/fd/N/NAME`` through a descriptor ``N`` of its directory,
    open while the context lasts: pass it to a child (``pass_fds``) that binds the path there.
    """
    if len(os.fsencode(sock)) <= UNIX_PATH_MAX:
        yield str(sock), ()
        return
    fd = os.open(sock.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{sock.name}", (fd,)
    finally:
        os.close(fd)


async def qmp_execute(sock: Path, command: str, *, within: float = 5.0) -> dict[str, Any]:
    """Negotiate capabilities and run one QMP ``command``; its ``return`` object."""
    try:
        async with asyncio.timeout(within):
            with reachable(sock) as (path, _):
                reader, writer = await asyncio.open_unix_connection(path)
            try:
                await _read(reader)  # the greeting
                for cmd in ("qmp_capabilities", command):
                    writer.write(json.dumps({"execute": cmd}).encode() + b"\n")
                    await writer.drain()
                    reply = await _read(reader)
                    if "error" in reply:
                        raise HypervisorError(
                            f"qemu refused {cmd}: {reply['error'].get('desc', reply['error'])}",
                            fix="see the guest's console.log in its run directory",
                        )
                result: dict[str, Any] = reply.get("return", {})
                return result
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        raise HypervisorError(
            f"QMP socket {sock}: {exc or type(exc).__name__}",
            fix="check that the guest's qemu still runs (`status`)",
        ) from exc


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    # Asynchronous events (POWERDOWN, SHUTDOWN...) may arrive before the reply we wait for.
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("qemu closed the QMP socket")
        msg: dict[str, Any] = json.loads(line)
        if "event" not in msg:
            return msg
