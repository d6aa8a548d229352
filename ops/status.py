"""`replikant status` and `replikant points`: what the brokers hold, as tables or JSON."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ops.client import AdminClient, admin_config, emit_json, run
from ops.render import HEALTH_STYLE, role_text, size_text, when
from ops.switchover import site_status


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every replicated VM: roles per site, generation, health, lag and last recovery point."""
    config = admin_config(ctx)

    async def go() -> dict[str, Any]:
        async with AdminClient(config) as client:
            return await site_status(client)

    doc = run(go)
    if as_json:
        emit_json(doc)
        return
    table = Table(title="Replikant VMs", show_lines=False)
    for col in ("VM", "UUID", "ROLES", "GEN", "HEALTH", "LAG", "LAST POINT", "SYNC"):
        table.add_column(col)
    for vm in doc["vms"]:
        roles = Text("\n").join(role_text(s, r) for s, r in sorted(vm["roles"].items()))
        health = Text(vm["health"].upper(), style=HEALTH_STYLE.get(vm["health"], ""))
        lag = "-" if vm["lag_seconds"] is None else f"{vm['lag_seconds']:.1f} s"
        point = vm.get("last_point") or {}
        last = f"{when(point.get('time'))} ({point.get('kind', '-')})" if point else "-"
        sync = ", ".join(sorted({d["initial_sync"] for d in vm.get("disks", [])}))
        table.add_row(
            vm["name"], vm["uuid"][:8], roles, str(vm["generation"]), health, lag, last, sync
        )
    console = Console()
    console.print(table)
    for where in doc["unreachable"]:
        console.print(f"[bold red]not reachable: {where}[/]")
    for b in doc["brokers"]:
        if b and b.get("conditions"):
            for c in b["conditions"]:
                console.print(f"[bold red]broker {b['node']}: {c['code']}[/]: {c['message']}")


# --------------------------------------------------------------------------------------------
# points


@click.command()
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def points(ctx: click.Context, vm: str, as_json: bool) -> None:
    """Recovery points of VM (name or UUID), newest first: time, kind, tier, size; then each
    disk's journal bytes against its bound and its oldest point."""
    config = admin_config(ctx)

    async def go() -> dict[str, Any]:
        async with AdminClient(config) as client:
            answers = await client.broker_json(f"/v1/vms/{vm}/points")
            doc: dict[str, Any] = answers[0]
            return doc

    doc = run(go)
    if as_json:
        emit_json(doc)
        return
    table = Table(title=f"Recovery points of {doc['vm']} ({doc.get('uuid', '')})")
    for col in ("ID", "TIME", "KIND", "TIER", "SIZE"):
        table.add_column(col)
    for p in doc["points"]:
        kind = Text(p["kind"], style="bold green" if p["kind"] == "app" else "")
        table.add_row(p["id"], when(p["time"]), kind, p.get("tier", ""), size_text(p["size_bytes"]))
    console = Console()
    console.print(table)
    for j in doc.get("journal", []):  # each disk's recovery-point data against its bound
        console.print(
            f"{j['disk']}: journal {size_text(j['bytes'])} of {size_text(j['bound_bytes'])} bound "
            f"(disk {size_text(j['disk_bytes'])}), oldest point {j['oldest_point'] or '-'} "
            f"{when(j['oldest_time'])}"
        )
