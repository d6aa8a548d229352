"""Application-consistent points: freeze the guest's file systems around a cut, then thaw.

Two mechanisms, per policy: commands (``freeze_command`` / ``thaw_command``, run without a shell)
or the QEMU guest agent's ``guest-fsfreeze-freeze`` / ``guest-fsfreeze-thaw`` over its unix
socket (``guest_agent_socket``). Whatever happens, a failed or timed-out freeze is followed by a
thaw, and the cut falls back to crash-consistent: a hook can delay a point, never lose one, and
never leave a guest frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path

from agents.errors import HookError
from common.config import Policy
from common.logs import get_logger

log = get_logger("agents.hooks")


class FreezeHooks:
    """Freeze/thaw for one VM according to its policy."""

    def __init__(self, policy: Policy, *, vm: str) -> None:
        self.policy = policy
        self.timeout = policy.hook_timeout_seconds
        self.log = log.bind(vm=vm)
        self.failures = 0

    @property
    def configured(self) -> bool:
        """Whether the policy asks for app-consistent points and says how to freeze."""
        p = self.policy
        return p.app_consistent_every > 0 and (
            p.freeze_command is not None or p.guest_agent_socket is not None
        )

    def due(self, cycle: int) -> bool:
        """Whether cut number ``cycle`` (1-based) should be application-consistent."""
        return self.configured and cycle % self.policy.app_consistent_every == 0

    async def freeze(self) -> bool:
        """Freeze the guest; True if it is frozen. On failure it has been thawed again."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._freeze()
        except (HookError, TimeoutError, OSError) as exc:
            self.failures += 1
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            self.log.warning("freeze_failed_falling_back_to_crash_consistent", error=reason)
            await self.thaw()
            return False
        self.log.info("guest_frozen")
        return True

    async def thaw(self) -> bool:
        """Thaw the guest; never raises (a failure is logged)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._thaw()
        except (HookError, TimeoutError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            self.log.error("thaw_failed", error=reason)
            return False
        self.log.info("guest_thawed")
        return True

    async def _freeze(self) -> None:
        if self.policy.guest_agent_socket is not None:
            await _qga(self.policy.guest_agent_socket, "guest-fsfreeze-freeze")
        if self.policy.freeze_command is not None:
            await _run(self.policy.freeze_command)

    async def _thaw(self) -> None:
        if self.policy.thaw_command is not None:
            await _run(self.policy.thaw_command)
        if self.policy.guest_agent_socket is not None:
            await _qga(self.policy.guest_agent_socket, "guest-fsfreeze-thaw")


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        # Timed out: do not leave the hook running behind our back.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        tail = out.decode("utf-8", "replace").strip()[-300:]
        raise HookError(f"hook {argv[0]} exited with status {proc.returncode}: {tail}")


async def _qga(socket: Path, command: str) -> None:
    """Run one guest-agent command, after a guest-sync that discards stale replies."""
    reader, writer = await asyncio.open_unix_connection(str(socket))
    try:
        token = random.randrange(1, 2**31)
        # The delimiter byte makes the agent drop any half-read input from a previous client.
        writer.write(
            b"\xff"
            + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
            + b"\n"
        )
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise HookError(f"guest agent {socket} closed the connection")
            reply = json.loads(line.lstrip(b"\xff") or b"{}")
            if reply.get("return") == token:
                break
        writer.write(json.dumps({"execute": command}).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise HookError(f"guest agent {socket} closed the connection during {command}")
        reply = json.loads(line)
        if "error" in reply:
            err = reply["error"]
            raise HookError(f"guest agent refused {command}: {err.get('desc', err)}")
    except ValueError as exc:
        raise HookError(
            f"guest agent {socket} answered something that is not JSON: {exc}"
        ) from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
