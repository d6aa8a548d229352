"""``replikant agent ...``: run the agent, print attach snippets, show status."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import click

from agents.control import control_socket_path, read_status
from agents.disk import COW_MEMORY_LIMIT
from agents.errors import AgentError
from agents.service import run_agent
from agents.startup import export_name, socket_path
from common.config import AgentConfig, load_config
from common.heap import keep_freed_memory, settle_heap
from common.stacks import dump_on_sigusr1

_config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="REPLIKANT_AGENT_CONFIG",
    help="agent.toml (env: REPLIKANT_AGENT_CONFIG)",
)


def _load(path: Path) -> AgentConfig:
    return load_config(path, AgentConfig)


@click.group()
def agent() -> None:
    """The source-side agent: NBD disk exports, change tracking, shipping."""


@agent.command()
@_config_option
@click.option("--no-uvloop", is_flag=True, help="Use the standard library's event loop.")
def run(config_path: Path, no_uvloop: bool) -> None:
    """Serve the disks of this host and replicate them until SIGTERM."""
    dump_on_sigusr1()
    config = _load(config_path)
    coro = run_agent(config, source=str(config_path))
    settle_heap()
    keep_freed_memory(COW_MEMORY_LIMIT)  # one disk's copies, freed at each cut's end
    if no_uvloop:
        asyncio.run(coro)
        return
    import uvloop  # noqa: PLC0415 - the event loop is chosen at the entry point only

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


@agent.command("attach-args")
@click.argument("vm")
@_config_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["all", "qemu", "blockdev", "libvirt"]),
    default="all",
    show_default=True,
)
def attach_args(vm: str, config_path: Path, fmt: str) -> None:
    """Print the QEMU arguments and libvirt XML that attach VM to its exports."""
    config = _load(config_path)
    found = [v for v in config.vms if v.name == vm or str(v.uuid) == vm]
    if not found:
        names = ", ".join(v.name for v in config.vms) or "none"
        raise AgentError(f"no VM {vm!r} in {config_path} (VMs: {names})")
    target = found[0]
    drives: list[str] = []
    blockdevs: list[str] = []
    xml: list[str] = []
    for i, disk in enumerate(target.disks):
        name = export_name(target, disk)
        sock = socket_path(config, name)
        drives.append(
            f"-drive file=nbd+unix:///{name}?socket={sock},format=raw,if=virtio,cache=none"
        )
        node = f"{disk.id}-nbd"
        blockdevs.append(
            f"-blockdev driver=nbd,node-name={node},export={name},"
            f"server.type=unix,server.path={sock},cache.direct=on "
            f"-device virtio-blk-pci,drive={node}"
        )
        dev = "vd" + chr(ord("a") + i) if i < 26 else f"vd{i}"
        xml.append(
            "<disk type='network' device='disk'>\n"
            "  <driver name='qemu' type='raw' cache='none'/>\n"
            f"  <source protocol='nbd' name={quoteattr(name)}>\n"
            f"    <host transport='unix' socket={quoteattr(str(sock))}/>\n"
            "  </source>\n"
            f"  <target dev='{dev}' bus='virtio'/>\n"
            "</disk>"
        )
    if fmt in ("all", "qemu"):
        if fmt == "all":
            click.echo("# QEMU (-drive)")
        click.echo(" ".join(drives))
    if fmt in ("all", "blockdev"):
        if fmt == "all":
            click.echo("# QEMU (-blockdev)")
        click.echo(" ".join(blockdevs))
    if fmt in ("all", "libvirt"):
        if fmt == "all":
            click.echo("# libvirt (inside <devices>)")
        click.echo("\n".join(xml))


@agent.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document.")
def status(config_path: Path, as_json: bool) -> None:
    """Show per-disk replication status from the running agent."""
    config = _load(config_path)
    sock = control_socket_path(config)
    try:
        doc = read_status(sock)
    except (OSError, ValueError) as exc:
        if isinstance(exc, PermissionError):
            raise AgentError(
                f"no permission to use the agent's control socket {sock}",
                fix="run as the agent's user or as a member of its [agent] control_group",
            ) from None
        raise AgentError(
            f"the agent's control socket {sock} does not answer ({exc})",
            fix="is the agent running? (systemctl status replikant-agent)",
        ) from None
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        click.echo()
        return
    _print_status(doc)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _print_status(doc: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415 - only the status view needs rich
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"agent {doc['host']} → {doc.get('broker')}")
    for col in ("VM", "disk", "mode", "dirty", "last seq", "lag", "throughput", "errors"):
        table.add_column(col)
    for d in doc["disks"]:
        lag = d["lag_seconds"]
        mode = d["mode"] if d["fenced"] is None else "FENCED"
        if d["fenced"] is None and d.get("refused"):
            mode = "REFUSED"
        if d["mode"] == "initial":
            mode += f" {100 * d['initial_sync']['cursor'] / max(d['size'], 1):.0f}%"
        seed = d.get("seed")
        if seed:
            mode += f" ({seed['state'].replace('_', ' ')}"
            if seed.get("seq"):
                mode += f" seq {seed['seq']}"
            if seed.get("total_bytes"):
                mode += f" {100 * seed['done_bytes'] / seed['total_bytes']:.0f}%"
            mode += ")"
        table.add_row(
            d["vm"],
            d["disk"],
            mode,
            _fmt_bytes(d["dirty_bytes"]),
            str(d["last_acked_seq"]),
            "-" if lag is None else f"{lag:.1f} s",
            _fmt_bytes(d["throughput_bytes_per_second"]) + "/s",
            str(d["errors"]) + (f" ({d['last_error'][:60]})" if d["last_error"] else ""),
        )
    Console().print(table)
