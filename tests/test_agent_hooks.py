"""Application-consistent points: freeze/thaw hooks by command or guest agent, and fallbacks."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.service import Agent
from common.config import AgentConfig, load_config
from common.hrl import Consistency
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    Receiver,
    VMSpec,
    local_agent_config,
    make_image,
)

pytestmark = pytest.mark.timeout(60)


async def _cycles(tmp_path: Path, policy_extra: str, n: int = 4) -> tuple[list[Consistency], Agent]:
    """Run ``n`` cycles with ``policy_extra``; return each batch's consistency."""
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    image = make_image(tmp_path / "d.img", 4 * MiB, fill=lambda i: os.urandom(MiB))
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    cfg = local_agent_config(tmp_path, pki, url, [vm], policy_extra=policy_extra)
    agent = Agent(load_config(cfg, AgentConfig))
    await agent.start()
    try:
        worker = agent.workers[0]
        rep = agent.replicators[0]
        await rep.prepare()
        for _ in range(n):
            assert await worker.cycle([rep])
    finally:
        await agent.stop()
        await rx.stop()
    return [b.header.consistency for b in rx.replica(vm.uuid, "disk0").batches], agent


async def test_command_hooks_make_every_nth_point_app_consistent(tmp_path: Path) -> None:
    """freeze, cut, thaw: every second batch is APP and the hooks ran in that order."""
    log = tmp_path / "hooks.log"
    extra = (
        "app_consistent_every = 2\n"
        f'freeze_command = ["sh", "-c", "echo freeze >> {log}"]\n'
        f'thaw_command = ["sh", "-c", "echo thaw >> {log}"]\n'
    )
    kinds, _agent = await _cycles(tmp_path, extra)
    assert kinds == [Consistency.CRASH, Consistency.APP, Consistency.CRASH, Consistency.APP]
    assert log.read_text().split() == ["freeze", "thaw", "freeze", "thaw"]


async def test_failing_freeze_thaws_and_falls_back(tmp_path: Path) -> None:
    """A freeze hook that fails is followed by a thaw; the point is crash-consistent."""
    log = tmp_path / "hooks.log"
    extra = (
        "app_consistent_every = 1\n"
        f'freeze_command = ["sh", "-c", "echo freeze >> {log}; exit 3"]\n'
        f'thaw_command = ["sh", "-c", "echo thaw >> {log}"]\n'
    )
    kinds, agent = await _cycles(tmp_path, extra, n=2)
    assert kinds == [Consistency.CRASH, Consistency.CRASH]
    assert log.read_text().split() == ["freeze", "thaw", "freeze", "thaw"]
    assert agent.workers[0].hooks.failures == 2


async def test_hanging_freeze_times_out_thaws_and_falls_back(tmp_path: Path) -> None:
    """A freeze hook that hangs is killed at the timeout, thawed, and the cut still happens."""
    log = tmp_path / "hooks.log"
    extra = (
        "app_consistent_every = 1\n"
        "hook_timeout_seconds = 0.3\n"
        'freeze_command = ["sleep", "30"]\n'
        f'thaw_command = ["sh", "-c", "echo thaw >> {log}"]\n'
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    kinds, _agent = await _cycles(tmp_path, extra, n=1)
    assert kinds == [Consistency.CRASH]
    assert log.read_text().split() == ["thaw"]
    assert loop.time() - started < 10


@pytest.fixture
async def guest_agent(tmp_path: Path) -> AsyncIterator[tuple[Path, list[str]]]:
    """A fake qemu-guest-agent on a unix socket that records the commands it gets."""
    path = tmp_path / "qga.sock"
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            msg = json.loads(line.lstrip(b"\xff"))
            seen.append(msg["execute"])
            if msg["execute"] == "guest-sync-delimited":
                reply = {"return": msg["arguments"]["id"]}
                writer.write(b"\xff" + json.dumps(reply).encode() + b"\n")
            else:
                writer.write(json.dumps({"return": 1}).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield path, seen
    finally:
        server.close()
        await server.wait_closed()


async def test_guest_agent_freeze_and_thaw(
    tmp_path: Path, guest_agent: tuple[Path, list[str]]
) -> None:
    """guest-fsfreeze-freeze / -thaw go through the guest agent socket; the batch is APP."""
    path, seen = guest_agent
    extra = f'app_consistent_every = 1\nguest_agent_socket = "{path}"\n'
    kinds, _agent = await _cycles(tmp_path, extra, n=1)
    assert kinds == [Consistency.APP]
    assert [c for c in seen if c.startswith("guest-fsfreeze")] == [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]
