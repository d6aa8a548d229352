"""The few QMP commands the qemu driver needs, over the guest's private unix socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agents.hypervisor.base import HypervisorError


async def qmp_execute(sock: Path, command: str, *, within: float = 5.0) -> dict[str, Any]:
    """Negotiate capabilities and run one QMP ``command``; its ``return`` object."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(sock))
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
