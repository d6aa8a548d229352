"""`replikant seed export | import | cancel`: initial replication from offline media."""

from __future__ import annotations

import asyncio
import sys
import uuid as uuid_mod
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from common.config import AdminConfig
from ops.client import AdminClient, AdminError, admin_config, emit_json, refusal, run
from ops.render import size_text


@click.group()
def seed() -> None:
    """Initial replication from offline media."""


@seed.command("import")
@click.argument(
    "directory", required=False, type=click.Path(path_type=Path, file_okay=False, exists=True)
)
@click.option("--vm", default=None, help="Refuse unless the media holds this VM (name or UUID).")
@click.option(
    "--image",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A raw copy or backup of one enabled disk (with --vm and --disk) instead of media.",
)
@click.option("--disk", default="disk0", show_default=True, help="With --image: the disk id.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def seed_import(
    ctx: click.Context,
    directory: Path | None,
    vm: str | None,
    image: Path | None,
    disk: str,
    as_json: bool,
) -> None:
    """Load every VM on seed media DIR into the broker (run on the broker host: the broker
    reads DIR itself). Identities are checked before anything is written.

    With --image FILE --vm VM: load an existing copy of an enabled disk; the agent then compares
    block hashes and ships only the blocks that differ."""
    config = admin_config(ctx)
    if image is not None:
        if vm is None:
            raise click.UsageError("--image needs --vm (and --disk)")
        body: dict[str, Any] = {"image": str(image.resolve()), "vm": vm, "disk": disk}
    elif directory is not None:
        body = {"dir": str(directory.resolve()), "vm": vm}
    else:
        raise click.UsageError("give the media DIRECTORY, or --image with --vm")

    async def go() -> Any:
        async with AdminClient(config, timeout=24 * 3600) as client:
            answers = await client.broker_json("/v1/seed/import", method="POST", json=body)
            return answers[0]

    doc = run(go)
    if as_json:
        emit_json(doc)
        return
    for item in doc["imported"]:
        at = f"at seq {item['seq']}" if item["seq"] is not None else "as an existing copy"
        click.echo(
            f"imported {item['vm']}/{item['disk']} {at}: "
            f"{size_text(item['copied_bytes'])} copied, "
            f"{size_text(item['skipped_bytes'])} already there"
        )


def _parse_selector(items: tuple[str, ...]) -> dict[str, str]:
    selector: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="--selector")
        selector[key] = value
    return selector


def _agent_urls(config: AdminConfig, ctx: click.Context, what: str) -> list[str]:
    if not config.admin.agents:
        path = (ctx.find_root().obj or {}).get("config_path")
        raise AdminError(
            f"{what} runs on the agents, and the admin config {path} lists no agents",
            fix="add their control sockets to [admin] agents, e.g. agents = "
            '["/run/replikant/control/agent.sock"] (the agent\'s [agent] control_socket), and '
            "run this on that host",
        )
    return list(config.admin.agents)


async def _ask_agent(
    client: AdminClient, url: str, path: str, body: dict[str, Any], config_path: object
) -> tuple[int, Any]:
    """POST to an agent; an agent that does not answer is named with the fix."""
    try:
        return await client.agent(url, "POST", path, json=body)
    except AdminError as exc:
        raise AdminError(
            f"agent {url} does not answer ({exc.message})",
            fix=f"{exc.fix} (admin config {config_path})",
        ) from None


async def _seed_plan(
    client: AdminClient, urls: list[str], body: dict[str, Any], config_path: object
) -> list[tuple[str, list[str]]]:
    """Dry-run the export at every agent: every refusal comes before a byte is written."""
    owner: dict[str, str] = {}
    keys: set[str] = set()
    plan = []
    for url in urls:
        status_code, doc = await _ask_agent(
            client, url, "/v1/seed/export", {**body, "dry_run": True}, config_path
        )
        if status_code == 404 and isinstance(doc, dict) and doc.get("error") == "unknown_vm":
            continue  # nothing selected there
        if status_code >= 400:
            raise refusal(url, status_code, doc)
        names = []
        for vm in doc["vms"]:
            if vm["name"] in owner:
                raise AdminError(
                    f"vm {vm['name']} is protected by two agents ({owner[vm['name']]} and {url})",
                    fix="protect each VM on one agent only",
                )
            owner[vm["name"]] = url
            keys |= {vm["name"], vm["uuid"]}
            names.append(vm["name"])
        plan.append((url, names))
    missing = [v for v in body["vms"] if v not in keys]
    if missing:
        raise AdminError(
            f"no agent protects vm {', '.join(missing)} (asked {', '.join(urls)})",
            fix="check the names (`replikant agent status` on each host), or add the agent that "
            "protects it to [admin] agents",
        )
    if not plan:
        sel = ", ".join(f"{k}={v}" for k, v in body["selector"].items())
        raise AdminError(
            f"no VM carries the labels {sel} at any agent (asked {', '.join(urls)})",
            fix="check the VMs' labels in the agent config",
        )
    return plan


async def _with_export_progress(
    client: AdminClient, url: str, job: Awaitable[tuple[int, Any]]
) -> tuple[int, Any]:
    """Show the agent's export progress (its status document) as rich bars on a terminal."""
    from rich.progress import (  # noqa: PLC0415 - only on a terminal
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    task = asyncio.ensure_future(job)
    bars: dict[str, Any] = {}
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("{task.description}", *columns, console=Console(stderr=True)) as progress:
        while not task.done():
            try:
                _, doc = await client.agent(url, "GET", "/v1/status")
            except AdminError:
                doc = {}
            for d in doc.get("disks", []) if isinstance(doc, dict) else []:
                seed_doc = d.get("seed") or {}
                key = f"{d['vm']}/{d['disk']}"
                if seed_doc.get("state") == "exporting":
                    if key not in bars:
                        total = seed_doc["total_bytes"]
                        bars[key] = progress.add_task(f"export {key}", total=total)
                    progress.update(bars[key], completed=seed_doc["done_bytes"])
                elif key in bars:
                    progress.update(bars[key], completed=progress.tasks[bars[key]].total)
            await asyncio.wait({task}, timeout=0.5)
        for bar in bars.values():
            progress.update(bar, completed=progress.tasks[bar].total)
    return task.result()


@seed.command("export")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Media directory on the agents' host: new or empty (or, with --resume, an earlier one).",
)
@click.option("--vm", "vms", multiple=True, help="VM name or UUID (repeatable).")
@click.option(
    "--selector",
    "--label",
    "selectors",
    multiple=True,
    metavar="KEY=VALUE",
    help="Export every VM with this label (repeatable: all must match).",
)
@click.option("--force", is_flag=True, help="Export even disks whose replica already holds data.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted export in DIR: a new cut, rewriting only blocks that differ.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def seed_export(
    ctx: click.Context,
    directory: Path,
    vms: tuple[str, ...],
    selectors: tuple[str, ...],
    force: bool,
    resume: bool,
    as_json: bool,
) -> None:
    """Have the agents write VMs (by name or label) to DIR for offline seeding.

    Each VM is cut at one instant (the guest keeps running) and written sparsely with block
    hashes. Its disks then wait (agent status: awaiting_seed) until `replikant seed import DIR`
    at the recovery site, and ship only what changed since the export. Every check (agents,
    names, the directory, replicas that already hold data) runs at every agent before anything
    is written.
    """
    config = admin_config(ctx)
    selector = _parse_selector(selectors)
    if not vms and not selector:
        raise click.UsageError("name VMs with --vm NAME or select them with --selector key=value")
    urls = _agent_urls(config, ctx, "seed export")
    config_path = (ctx.find_root().obj or {}).get("config_path")
    # The agents answer only on their unix sockets: DIR is on this host.
    body: dict[str, Any] = {
        "dir": str(directory.absolute()),
        "vms": list(vms),
        "selector": selector,
        "force": force,
        "resume": resume,
        "export_id": str(uuid_mod.uuid4()),
    }
    show = sys.stderr.isatty() and not as_json

    async def go() -> list[dict[str, Any]]:
        async with AdminClient(config, timeout=7 * 24 * 3600) as client:
            plan = await _seed_plan(client, urls, body, config_path)
            out = []
            for url, names in plan:
                job = _ask_agent(
                    client,
                    url,
                    "/v1/seed/export",
                    {**body, "vms": names, "selector": {}},
                    config_path,
                )
                status_code, doc = await (_with_export_progress(client, url, job) if show else job)
                if status_code >= 400:
                    raise refusal(url, status_code, doc)
                out.append({"agent": url, **doc})
            return out

    answers = run(go)
    if as_json:
        emit_json(
            {
                "dir": body["dir"],
                "export_id": body["export_id"],
                "agents": [{"url": a["agent"], "host": a["host"]} for a in answers],
                "vms": [vm for a in answers for vm in a["vms"]],
            }
        )
        return
    _print_exports(answers, body["dir"])


def _print_exports(answers: list[dict[str, Any]], directory: str) -> None:
    """What each agent wrote, and what the operator does next."""
    for a in answers:
        for vm in a["vms"]:
            for d in vm["disks"]:
                click.echo(
                    f"exported {vm['name']}/{d['id']} at seq {d['seq']}: "
                    f"{size_text(d['written_bytes'])} written, "
                    f"{size_text(d['zero_bytes'])} of zeros and "
                    f"{size_text(d['hole_bytes'])} of holes left sparse, "
                    f"{size_text(d['reused_bytes'])} already there -> {directory}/{d['image']}"
                )
    click.echo(
        f"next: carry {directory} to the recovery site and run `replikant seed import DIR` "
        "on the broker host; until then these disks wait (agent status: awaiting_seed) and "
        "afterwards ship only what changed since the export"
    )


@seed.command("cancel")
@click.option("--vm", "vms", multiple=True, required=True, help="VM name or UUID (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def seed_cancel(ctx: click.Context, vms: tuple[str, ...], as_json: bool) -> None:
    """Stop waiting for the import of VMs' last export (lost media): their disks replicate over
    the network again (a replica with data is compared by block hashes)."""
    config = admin_config(ctx)
    urls = _agent_urls(config, ctx, "seed cancel")
    config_path = (ctx.find_root().obj or {}).get("config_path")

    async def go() -> list[Any]:
        out = []
        async with AdminClient(config) as client:
            for url in urls:
                status_code, doc = await _ask_agent(
                    client, url, "/v1/seed/cancel", {"vms": list(vms)}, config_path
                )
                if status_code == 404 and isinstance(doc, dict):
                    continue
                if status_code >= 400:
                    raise refusal(url, status_code, doc)
                out.extend(doc["vms"])
        return out

    done = run(go)
    missing = [v for v in vms if not any(v in (d["name"], d["uuid"]) for d in done)]
    if missing:
        raise AdminError(
            f"no agent protects vm {', '.join(missing)}", fix="check the names in [admin] agents"
        )
    if as_json:
        emit_json({"vms": done})
        return
    for vm in done:
        for d in vm["disks"]:
            word = "no longer waits for media" if d["cancelled"] else "was not waiting for media"
            click.echo(f"{vm['name']}/{d['id']} {word}")
