"""`replikant agent attach-args` snippets, and attaching through them (unix and TLS over TCP)."""

from __future__ import annotations

import asyncio
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from agents.cli import agent as agent_cli
from agents.service import Agent
from common.config import AgentConfig, load_config
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    VMSpec,
    free_port,
    make_image,
    write_agent_config,
)

pytestmark = pytest.mark.timeout(60)


def _config(tmp_path: Path, *, tcp: str | None = None) -> Path:
    pki = make_pki(tmp_path / "pki")
    a = make_image(tmp_path / "a.img", 4 * MiB)
    b = make_image(tmp_path / "b.img", 4 * MiB)
    vm = VMSpec("web1", [DiskSpec("disk0", a), DiskSpec("data", b, export="web1-data")])
    return write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=["https://127.0.0.1:1"],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
        tcp_listen=tcp,
    )


def test_attach_args_prints_qemu_and_libvirt(tmp_path: Path) -> None:
    """One -drive per disk, a -blockdev form, and libvirt <disk> elements that parse."""
    cfg = _config(tmp_path)
    sock = tmp_path / "s"
    result = CliRunner().invoke(agent_cli, ["attach-args", "web1", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert (
        f"-drive file=nbd+unix:///web1-disk0?socket={sock}/web1-disk0.sock,"
        "format=raw,if=virtio,cache=none" in out
    )
    assert f"nbd+unix:///web1-data?socket={sock}/web1-data.sock" in out
    assert "-blockdev driver=nbd" in out
    xml = out[out.index("<disk") :]
    disks = ET.fromstring(f"<devices>{xml}</devices>").findall("disk")  # noqa: S314 - our output
    assert [d.find("source").get("name") for d in disks] == ["web1-disk0", "web1-data"]  # type: ignore[union-attr]
    host = disks[0].find("source/host")
    assert host is not None
    assert host.get("socket") == f"{sock}/web1-disk0.sock"


def test_attach_args_unknown_vm(tmp_path: Path) -> None:
    """Asking for a VM the config does not have names the ones it has."""
    cfg = _config(tmp_path)
    result = CliRunner().invoke(agent_cli, ["attach-args", "nope", "--config", str(cfg)])
    assert result.exit_code != 0
    assert "web1" in str(result.exception)


@pytest.mark.qemu
async def test_qemu_attaches_with_the_printed_uri_and_over_tls(tmp_path: Path) -> None:
    """qemu-io opens the printed unix URI, and the TCP export with TLS client certificates."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    port = free_port()
    cfg = _config(tmp_path, tcp=f"127.0.0.1:{port}")
    result = CliRunner().invoke(
        agent_cli, ["attach-args", "web1", "--config", str(cfg), "--format", "qemu"]
    )
    uri = result.output.split()[1].removeprefix("file=").split(",")[0]
    agent = Agent(load_config(cfg, AgentConfig))
    await agent.start()
    # qemu's TLS credentials directory layout.
    creds = tmp_path / "qemu-tls"
    creds.mkdir()
    pki = tmp_path / "pki"
    shutil.copy(pki / "ca.crt", creds / "ca-cert.pem")
    shutil.copy(pki / "agents" / "h1.crt", creds / "client-cert.pem")
    shutil.copy(pki / "agents" / "h1.key", creds / "client-key.pem")
    try:
        unix = await asyncio.create_subprocess_exec(
            "qemu-io",
            "-f",
            "raw",
            uri,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await unix.communicate()
        assert unix.returncode == 0, out.decode()
        tls = await asyncio.create_subprocess_exec(
            "qemu-io",
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
            "export=web1-data,tls-creds=tls0",
            "-c",
            "write -P 0x33 1M 4k",
            "-c",
            "read -P 0x33 1M 4k",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await tls.communicate()
        assert tls.returncode == 0, out.decode()
        assert "verification failed" not in out.decode()
        runs = [list(r.export.map.active.runs()) for r in agent.replicators]
    finally:
        await agent.stop()
    assert runs == [[(0, 1, 1)], [(16, 17, 1)]]
