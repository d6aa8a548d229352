"""Admin CLI commands: `replikant status | points | verify | seed` (admin certificate, HTTPS).

Each command reads the admin config (``replikant --config FILE``: brokers, agents, our admin
certificate), talks to the brokers' admin endpoints (docs/protocol/http.md) and prints a rich
table, or JSON with ``--json`` for scripts. Roles are printed so that PRIMARY, REPLICA and TEST
can never be confused: each has its own word, symbol and colour.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.config import AdminConfig, load_config
from common.errors import ConfigError, ReplikantError
from common.tls import client_context

T = TypeVar("T")

ROLE_STYLE: dict[str, tuple[str, str]] = {
    "PRIMARY": ("▲ PRIMARY", "bold green"),
    "REPLICA": ("▽ REPLICA", "bold cyan"),
    "TEST": ("◆ TEST", "bold magenta reverse"),
}
HEALTH_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red"}
_Q = struct.Struct(">Q")


class AdminError(ReplikantError):
    """A broker or agent refused, or could not be reached."""


def _config(ctx: click.Context) -> AdminConfig:
    obj = ctx.find_root().obj or {}
    path = obj.get("config_path")
    if path is None:
        raise ConfigError(
            "no admin config given",
            fix="pass `replikant --config admin.toml ...` or set REPLIKANT_CONFIG",
        )
    return load_config(Path(path), AdminConfig)


class AdminClient:
    """HTTPS with our admin certificate to brokers and agents."""

    def __init__(self, config: AdminConfig, timeout: float = 120.0) -> None:
        self.config = config
        self._ctx = client_context(config.tls)
        self._timeout = timeout
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ctx),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def request(
        self, method: str, url: str, *, expect: str = "json", **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        """One request; returns (status, body, headers). Network failures raise AdminError."""
        assert self.session is not None
        try:
            async with self.session.request(method, url, **kwargs) as resp:
                if expect == "json" or resp.status >= 400:
                    body: Any = await resp.json(content_type=None)
                else:
                    body = await resp.read()
                return resp.status, body, dict(resp.headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise AdminError(
                f"cannot talk to {url}: {type(exc).__name__}: {exc}",
                fix="check the URL in the admin config and that the service runs",
            ) from None

    async def broker_json(self, path: str, *, method: str = "GET", **kw: Any) -> list[Any]:
        """The answers of every broker that knows ``path`` (404s skipped)."""
        out = []
        errors = []
        for base in self.config.admin.brokers:
            status, body, _ = await self.request(method, base.rstrip("/") + path, **kw)
            if status == 404:
                errors.append(body)
                continue
            if status >= 400:
                raise _refusal(base, status, body)
            out.append(body)
        if not out and errors:
            raise _refusal(self.config.admin.brokers[0], 404, errors[0])
        return out


def _refusal(url: str, status: int, body: Any) -> AdminError:
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or json.dumps(body)
        return AdminError(
            f"{url} refused ({status} {body.get('error')}): {message}", fix=body.get("fix")
        )
    return AdminError(f"{url} refused ({status})")


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def role_text(site: str, role: str) -> Text:
    """``site: ▲ PRIMARY`` in the role's own colour."""
    label, style = ROLE_STYLE.get(role, (f"? {role}", "bold red"))
    text = Text(f"{site}: ")
    text.append(label, style=style)
    return text


def merge_status(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One status document from every broker's (roles of a VM merged across sites)."""
    by_uuid: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for vm in doc.get("vms", []):
            seen = by_uuid.get(vm["uuid"])
            if seen is None:
                by_uuid[vm["uuid"]] = dict(vm)
            else:
                seen["roles"] = {**seen["roles"], **vm["roles"]}
    vms = sorted(by_uuid.values(), key=lambda v: v["name"])
    return {"vms": vms, "brokers": [d.get("broker") for d in docs]}


# --------------------------------------------------------------------------------------------
# status


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every replicated VM: roles per site, generation, health, lag and last recovery point."""
    config = _config(ctx)

    async def go() -> dict[str, Any]:
        async with AdminClient(config) as client:
            return merge_status(await client.broker_json("/v1/status"))

    doc = _run(go)
    if as_json:
        _emit_json(doc)
        return
    table = Table(title="Replikant VMs", show_lines=False)
    for col in ("VM", "UUID", "ROLES", "GEN", "HEALTH", "LAG", "LAST POINT", "SYNC"):
        table.add_column(col)
    for vm in doc["vms"]:
        roles = Text("\n").join(role_text(s, r) for s, r in sorted(vm["roles"].items()))
        health = Text(vm["health"].upper(), style=HEALTH_STYLE.get(vm["health"], ""))
        lag = "-" if vm["lag_seconds"] is None else f"{vm['lag_seconds']:.1f} s"
        point = vm.get("last_point") or {}
        last = f"{_when(point.get('time'))} ({point.get('kind', '-')})" if point else "-"
        sync = ", ".join(sorted({d["initial_sync"] for d in vm.get("disks", [])}))
        table.add_row(
            vm["name"], vm["uuid"][:8], roles, str(vm["generation"]), health, lag, last, sync
        )
    console = Console()
    console.print(table)
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
    """Recovery points of VM (name or UUID), newest first: time, kind, size."""
    config = _config(ctx)

    async def go() -> dict[str, Any]:
        async with AdminClient(config) as client:
            answers = await client.broker_json(f"/v1/vms/{vm}/points")
            doc: dict[str, Any] = answers[0]
            return doc

    doc = _run(go)
    if as_json:
        _emit_json(doc)
        return
    table = Table(title=f"Recovery points of {doc['vm']} ({doc.get('uuid', '')})")
    for col in ("ID", "TIME", "KIND", "SIZE"):
        table.add_column(col)
    for p in doc["points"]:
        kind = Text(p["kind"], style="bold green" if p["kind"] == "app" else "")
        table.add_row(p["id"], _when(p["time"]), kind, _size(p["size_bytes"]))
    Console().print(table)


# --------------------------------------------------------------------------------------------
# verify


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
    config = _config(ctx)

    async def go() -> dict[str, Any]:
        async with AdminClient(config) as client:
            if source_image is not None:
                return await _verify_image(client, vm, source_image, disk)
            return await _verify_agent(client, config, vm, repair)

    doc = _run(go)
    if as_json:
        _emit_json(doc)
    else:
        console = Console()
        for d in doc["disks"]:
            word = "MATCH" if d["differing_blocks"] == 0 else "DIFFER"
            style = "bold green" if word == "MATCH" else "bold red"
            console.print(
                f"{doc['vm']}/{d['disk']} at point {d['point']}: [{style}]{word}[/] "
                f"({d['matching_blocks']}/{d['blocks']} blocks of {_size(d['block_size'])} match)"
            )
            for off, n in d["differing_ranges"][:20]:
                console.print(f"  differs: offset {off} length {n}")
        if doc.get("repair"):
            console.print(f"repair: {doc['repair']}")
    if doc["result"] != "match":
        sys.exit(3)


async def _verify_image(
    client: AdminClient, vm: str, image: Path, disk: str | None
) -> dict[str, Any]:
    from broker.hashes import file_block_hashes  # noqa: PLC0415 - heavy only when used

    (doc,) = (await client.broker_json("/v1/status"))[:1]
    vms = [v for v in doc["vms"] if vm in (v["name"], v["uuid"])]
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
        raise _refusal(base, status_code, remote)
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
            fix="add the agents' status URLs to [admin] agents, or use --source-image",
        )
    answer: Any = None
    agent_url = ""
    for base in config.admin.agents:
        agent_url = base.rstrip("/")
        status_code, body, _ = await client.request("POST", f"{agent_url}/v1/vms/{vm}/verify")
        if status_code == 404 and isinstance(body, dict) and body.get("error") == "unknown_vm":
            continue
        if status_code >= 400:
            raise _refusal(agent_url, status_code, body)
        answer = body
        break
    if answer is None:
        raise AdminError(f"no agent protects vm {vm!r}")
    out_disks = []
    broker = config.admin.brokers[0].rstrip("/")
    for d in answer["disks"]:
        bs = int(d["block_size"])
        point = f"{d['generation']}-{d['seq']}"
        status_code, remote, _ = await client.request(
            "GET",
            f"{broker}/v1/replicas/{answer['vm_uuid']}/{d['disk_id']}/hashes",
            params={"block_size": bs, "point": point, "wait": 120},
            expect="bytes",
        )
        if status_code >= 400:
            raise _refusal(broker, status_code, remote)
        local = base64.b64decode(d["hashes"])
        result = compare_hashes(local, bytes(remote), bs, int(d["disk_size"]))
        out_disks.append({"disk": d["disk_id"], "point": point, "block_size": bs, **result})
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
        status_code, rep, _ = await client.request(
            "POST", f"{agent_url}/v1/vms/{vm}/repair", json=body
        )
        if status_code >= 400:
            raise _refusal(agent_url, status_code, rep)
        doc["repair"] = rep
    return doc


# --------------------------------------------------------------------------------------------
# seed


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
    config = _config(ctx)
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

    doc = _run(go)
    if as_json:
        _emit_json(doc)
        return
    for item in doc["imported"]:
        at = f"at seq {item['seq']}" if item["seq"] is not None else "as an existing copy"
        click.echo(
            f"imported {item['vm']}/{item['disk']} {at}: "
            f"{_size(item['copied_bytes'])} copied, {_size(item['skipped_bytes'])} already there"
        )


@seed.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--vm", "vms", multiple=True, help="VM name (repeatable).")
@click.option("--label", "labels", multiple=True, help="key=value selector (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def seed_export(
    ctx: click.Context,
    directory: Path,
    vms: tuple[str, ...],
    labels: tuple[str, ...],
    as_json: bool,
) -> None:
    """Have the agents write VMs (by name or label) to DIR on their host, for offline media."""
    config = _config(ctx)
    selector = dict(item.split("=", 1) for item in labels)
    if not config.admin.agents:
        raise AdminError("seed export runs on the agents: the admin config lists no agents")

    async def go() -> list[Any]:
        out = []
        async with AdminClient(config, timeout=24 * 3600) as client:
            for base in config.admin.agents:
                status_code, body, _ = await client.request(
                    "POST",
                    base.rstrip("/") + "/v1/seed/export",
                    json={"dir": str(directory), "vms": list(vms), "selector": selector},
                )
                if status_code >= 400:
                    raise _refusal(base, status_code, body)
                out.append(body)
        return out

    docs = _run(go)
    if as_json:
        _emit_json(docs)
        return
    for doc in docs:
        for vm in doc.get("vms", []):
            click.echo(f"exported {vm['name']} to {directory}")
