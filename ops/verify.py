"""`replikant verify`: compare source and replica at one cut, block by block, and repair."""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from common.config import AdminConfig
from ops.client import AdminClient, AdminError, admin_config, emit_json, refusal, run
from ops.render import size_text


def compare_hashes(local: bytes, remote: bytes, block_size: int, size: int) -> dict[str, Any]:
    """Matching and differing blocks as coalesced byte ranges."""
    if len(local) != len(remote):
        raise AdminError(
            f"hash lists differ in length ({len(local) // 8} vs {len(remote) // 8} blocks): "
            "the disks have different sizes"
        )
    ranges: list[list[int]] = []
    differing = 0
    for i in range(0, len(local), 8):
        if local[i : i + 8] != remote[i : i + 8]:
            differing += 1
            start = (i // 8) * block_size
            length = min(block_size, size - start)
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1][1] += length
            else:
                ranges.append([start, length])
    blocks = len(local) // 8
    return {
        "blocks": blocks,
        "matching_blocks": blocks - differing,
        "differing_blocks": differing,
        "differing_ranges": ranges,
    }


@click.command()
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--repair", is_flag=True, help="Ask the agent to re-ship the differing blocks.")
@click.option(
    "--source-image",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Compare with this local image (quiesced source) instead of asking the agent to cut.",
)
@click.option("--disk", default=None, help="With --source-image: which disk (default: first).")
@click.pass_context
def verify(
    ctx: click.Context,
    vm: str,
    as_json: bool,
    repair: bool,
    source_image: Path | None,
    disk: str | None,
) -> None:
    """Compare source and replica of VM at one cut, block by block (xxh3 hashes).

    The agent cuts, waits for the broker's ack, and hashes its frozen cut
    (``POST /v1/vms/VM/verify`` on the agent); the broker hashes the same point. Exit status 0
    when every block matches, 3 when some differ.
    """
    config = admin_config(ctx)

    async def go() -> dict[str, Any]:
        async with AdminClient(config) as client:
            if source_image is not None:
                return await _verify_image(client, vm, source_image, disk)
            return await _verify_agent(client, config, vm, repair)

    doc = run(go)
    if as_json:
        emit_json(doc)
    else:
        console = Console()
        for d in doc["disks"]:
            word = "MATCH" if d["differing_blocks"] == 0 else "DIFFER"
            style = "bold green" if word == "MATCH" else "bold red"
            console.print(
                f"{doc['vm']}/{d['disk']} at point {d['point']}: [{style}]{word}[/] "
                f"({d['matching_blocks']}/{d['blocks']} blocks of "
                f"{size_text(d['block_size'])} match)"
            )
            for off, n in d["differing_ranges"][:20]:
                console.print(f"  differs: offset {off} length {n}")
        if doc.get("repair"):
            console.print(_repair_line(doc["repair"]))
    if doc["result"] != "match":
        sys.exit(3)


def _repair_line(repair: dict[str, Any]) -> str:
    """``verify --repair``'s answer from the agent, as a sentence."""
    marked = repair.get("marked_bytes")
    amount = size_text(int(marked)) if isinstance(marked, int) else "the differing blocks"
    vm = repair.get("vm", "the VM")
    return (
        f"repair: {repair.get('agent', 'the agent')} marked {amount} of {vm} "
        f"({repair.get('ranges', '?')} ranges) to ship again in its next cycle; "
        f"run `replikant verify {vm}` afterwards to confirm"
    )


async def _verify_image(
    client: AdminClient, vm: str, image: Path, disk: str | None
) -> dict[str, Any]:
    from common.blockhash import file_block_hashes  # noqa: PLC0415 - heavy only when used

    # Each member lists the VMs it serves: look in every answer.
    docs = await client.broker_json("/v1/status")
    vms = [v for doc in docs for v in doc["vms"] if vm in (v["name"], v["uuid"])]
    if not vms:
        raise AdminError(f"no VM {vm!r} on the brokers")
    disks = vms[0]["disks"]
    chosen = next((d for d in disks if disk in (None, d["disk_id"])), None)
    if chosen is None:
        raise AdminError(f"vm {vm} has no disk {disk!r}")
    bs = int(chosen["block_size"])
    local = await asyncio.to_thread(file_block_hashes, str(image), block_size=bs)
    base = client.config.admin.brokers[0].rstrip("/")
    status_code, remote, headers = await client.request(
        "GET",
        f"{base}/v1/vms/{vm}/hashes",
        params={"disk": chosen["disk_id"], "block_size": bs},
        expect="bytes",
    )
    if status_code >= 400:
        raise refusal(base, status_code, remote)
    result = compare_hashes(local, bytes(remote), bs, int(chosen["disk_size"]))
    point = f"{headers.get('X-Replikant-Generation')}-{headers.get('X-Replikant-Applied-Seq')}"
    entry = {"disk": chosen["disk_id"], "point": point, "block_size": bs, **result}
    return {
        "vm": vms[0]["name"],
        "disks": [entry],
        "result": "match" if result["differing_blocks"] == 0 else "differ",
    }


async def _verify_agent(
    client: AdminClient, config: AdminConfig, vm: str, repair: bool
) -> dict[str, Any]:
    if not config.admin.agents:
        raise AdminError(
            "verify needs the source side: the admin config lists no agents",
            fix="add the agents' control sockets to [admin] agents, or use --source-image",
        )
    answer: Any = None
    agent_url = ""
    for agent_url in config.admin.agents:
        status_code, body = await client.agent(agent_url, "POST", f"/v1/vms/{vm}/verify")
        if status_code == 404 and isinstance(body, dict) and body.get("error") == "unknown_vm":
            continue
        if status_code >= 400:
            raise refusal(agent_url, status_code, body)
        answer = body
        break
    if answer is None:
        raise AdminError(
            f"no agent protects vm {vm!r} (asked {', '.join(config.admin.agents)})",
            fix="`replikant status` lists VMs; check [admin] agents in the admin config",
        )
    out_disks = []
    broker = config.admin.brokers[0].rstrip("/")
    for d in answer["disks"]:
        bs = int(d["block_size"])
        # Every disk at the VM point of the agent's one cut: each replica's own state at that
        # cut, whatever its sequence numbers (they drift apart after a lost ack).
        point = f"{d['generation']}:{d['cut_id']}"
        status_code, remote, headers = await client.request(
            "GET",
            f"{broker}/v1/replicas/{answer['vm_uuid']}/{d['disk_id']}/hashes",
            params={"block_size": bs, "point": point, "wait": 120},
            expect="bytes",
        )
        if status_code >= 400:
            raise refusal(broker, status_code, remote)
        local = base64.b64decode(d["hashes"])
        result = compare_hashes(local, bytes(remote), bs, int(d["disk_size"]))
        state = f"{headers.get('X-Replikant-Generation')}-{headers.get('X-Replikant-Applied-Seq')}"
        out_disks.append(
            {"disk": d["disk_id"], "point": point, "disk_point": state, "block_size": bs, **result}
        )
    doc: dict[str, Any] = {
        "vm": answer.get("vm", vm),
        "disks": out_disks,
        "result": "match" if all(d["differing_blocks"] == 0 for d in out_disks) else "differ",
    }
    if repair and doc["result"] != "match":
        body = {
            "disks": [
                {"disk_id": d["disk"], "ranges": d["differing_ranges"]}
                for d in out_disks
                if d["differing_blocks"]
            ]
        }
        status_code, rep = await client.agent(agent_url, "POST", f"/v1/vms/{vm}/repair", json=body)
        if status_code >= 400:
            raise refusal(agent_url, status_code, rep)
        ranges = sum(len(d["ranges"]) for d in body["disks"])
        doc["repair"] = {
            "agent": agent_url,
            "ranges": ranges,
            **(rep if isinstance(rep, dict) else {}),
        }
    return doc
