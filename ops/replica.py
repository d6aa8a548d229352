"""`replikant replica rebind | set-generation`: the operator's acts on a VM's replicas (an
agent's PUT can do neither)."""

from __future__ import annotations

from typing import Any

import click

from common.config import AdminConfig
from ops.client import AdminClient, admin_config, emit_json, run


@click.group()
def replica() -> None:
    """Operator acts on a VM's replicas: rebind to another source host, raise the generation."""


async def _change_source(config: AdminConfig, vm: str, body: dict[str, Any]) -> list[Any]:
    async with AdminClient(config) as client:
        return await client.broker_json(f"/v1/vms/{vm}/source", method="POST", json=body)


def _print_source(answers: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json(answers)
        return
    for doc in answers:
        for d in doc["disks"]:
            click.echo(
                f"{doc['vm']} {d['disk_id']}: source host {d['source_host']}, "
                f"generation {d['generation']}"
            )


@replica.command("rebind")
@click.argument("vm")
@click.option("--host", required=True, help="The agent host the VM now replicates from.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def replica_rebind(ctx: click.Context, vm: str, host: str, as_json: bool) -> None:
    """Bind VM's replicas to agent HOST (after the VM moved there); the old host is refused."""
    config = admin_config(ctx)
    _print_source(run(lambda: _change_source(config, vm, {"host": host})), as_json)


@replica.command("set-generation")
@click.argument("vm")
@click.argument("generation", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def replica_set_generation(ctx: click.Context, vm: str, generation: int, as_json: bool) -> None:
    """Raise VM's generation to GENERATION (a failover act: the old primary is fenced)."""
    config = admin_config(ctx)
    _print_source(run(lambda: _change_source(config, vm, {"generation": generation})), as_json)
