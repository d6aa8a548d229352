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
import errno
import json
import struct
import sys
import uuid as uuid_mod
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
from common.tls import IdentityCheckingConnector, client_context, describe_client_failure

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
    """HTTPS with our admin certificate to brokers; HTTP on their control sockets to agents."""

    def __init__(self, config: AdminConfig, timeout: float = 120.0) -> None:
        self.config = config
        self._ctx = client_context(config.tls)
        self._timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self._agents: dict[str, aiohttp.ClientSession] = {}

    async def __aenter__(self) -> AdminClient:
        self.session = aiohttp.ClientSession(
            # Every https:// peer must be a broker (agents answer only on their unix sockets).
            connector=IdentityCheckingConnector(role="broker", ssl=self._ctx),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        for session in self._agents.values():
            await session.close()

    async def agent(self, sock: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """One JSON request to the agent whose control socket is ``sock``: (status, body).

        State-changing requests go as JSON (the agent refuses anything else). A socket that is
        missing, silent or not ours to use raises :class:`AdminError` naming it and the fix.
        """
        session = self._agents.get(sock)
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=sock),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
            self._agents[sock] = session
        if method != "GET":
            kwargs.setdefault("json", {})
        try:
            async with session.request(method, "http://agent" + path, **kwargs) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise _agent_error(sock, exc) from None

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
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, ReplikantError) as exc:
            raise self._network_error(url, exc) from None

    def _network_error(self, url: str, exc: BaseException) -> AdminError:
        """Name what went wrong talking to ``url``, with the fix: TLS first, then the rest."""
        rejection = describe_client_failure(exc, url=url, role="admin", cert=self.config.tls.cert)
        if rejection is not None:
            return AdminError(f"cannot talk to {url}: {rejection.detail}", fix=rejection.fix)
        if isinstance(exc, ValueError | aiohttp.ContentTypeError):
            return AdminError(
                f"{url} did not answer like a Replikant broker (the reply is not JSON)",
                fix="check [admin] brokers in the admin config: it must list the brokers' "
                "https:// listen addresses",
            )
        if isinstance(exc, ReplikantError):
            return AdminError(f"cannot talk to {url}: {exc.message}", fix=exc.fix)
        return AdminError(
            f"cannot talk to {url}: {type(exc).__name__}: {exc}",
            fix="check the URL in the admin config and that the service runs",
        )

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


def _agent_error(sock: str, exc: BaseException) -> AdminError:
    """Name what went wrong on an agent's control socket, with the fix."""
    code = getattr(exc, "errno", None)
    if code == errno.EACCES:
        return AdminError(
            f"no permission to use the agent's control socket {sock}",
            fix="run this as a member of the agent's [agent] control_group (or as its user)",
        )
    if code in (errno.ENOENT, errno.ECONNREFUSED):
        return AdminError(
            f"no agent listens on {sock}",
            fix="start that agent (systemctl start replikant-agent) or correct [admin] agents: "
            "each entry is an agent's [agent] control_socket, and this runs on the agent's host",
        )
    if isinstance(exc, ValueError):
        return AdminError(
            f"{sock} did not answer like a Replikant agent (the reply is not JSON)",
            fix="check [admin] agents: each entry must be an agent's [agent] control_socket",
        )
    return AdminError(
        f"cannot talk to the agent on {sock}: {type(exc).__name__}: {exc}",
        fix="check that the agent runs (replikant agent status)",
    )


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
    for col in ("ID", "TIME", "KIND", "TIER", "SIZE"):
        table.add_column(col)
    for p in doc["points"]:
        kind = Text(p["kind"], style="bold green" if p["kind"] == "app" else "")
        table.add_row(p["id"], _when(p["time"]), kind, p.get("tier", ""), _size(p["size_bytes"]))
    console = Console()
    console.print(table)
    for j in doc.get("journal", []):  # each disk's recovery-point data against its bound
        console.print(
            f"{j['disk']}: journal {_size(j['bytes'])} of {_size(j['bound_bytes'])} bound "
            f"(disk {_size(j['disk_bytes'])}), oldest point {j['oldest_point'] or '-'} "
            f"{_when(j['oldest_time'])}"
        )


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
            console.print(_repair_line(doc["repair"]))
    if doc["result"] != "match":
        sys.exit(3)


def _repair_line(repair: dict[str, Any]) -> str:
    """``verify --repair``'s answer from the agent, as a sentence."""
    marked = repair.get("marked_bytes")
    amount = _size(int(marked)) if isinstance(marked, int) else "the differing blocks"
    vm = repair.get("vm", "the VM")
    return (
        f"repair: {repair.get('agent', 'the agent')} marked {amount} of {vm} "
        f"({repair.get('ranges', '?')} ranges) to ship again in its next cycle; "
        f"run `replikant verify {vm}` afterwards to confirm"
    )


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
            fix="add the agents' control sockets to [admin] agents, or use --source-image",
        )
    answer: Any = None
    agent_url = ""
    for agent_url in config.admin.agents:
        status_code, body = await client.agent(agent_url, "POST", f"/v1/vms/{vm}/verify")
        if status_code == 404 and isinstance(body, dict) and body.get("error") == "unknown_vm":
            continue
        if status_code >= 400:
            raise _refusal(agent_url, status_code, body)
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
            raise _refusal(broker, status_code, remote)
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
            raise _refusal(agent_url, status_code, rep)
        ranges = sum(len(d["ranges"]) for d in body["disks"])
        doc["repair"] = {
            "agent": agent_url,
            "ranges": ranges,
            **(rep if isinstance(rep, dict) else {}),
        }
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
    client: AdminClient, url: str, path: str, body: dict[str, Any], config_path: Any
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
    client: AdminClient, urls: list[str], body: dict[str, Any], config_path: Any
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
            raise _refusal(url, status_code, doc)
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
    config = _config(ctx)
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
                    raise _refusal(url, status_code, doc)
                out.append({"agent": url, **doc})
            return out

    answers = _run(go)
    if as_json:
        _emit_json(
            {
                "dir": body["dir"],
                "export_id": body["export_id"],
                "agents": [{"url": a["agent"], "host": a["host"]} for a in answers],
                "vms": [vm for a in answers for vm in a["vms"]],
            }
        )
        return
    for a in answers:
        for vm in a["vms"]:
            for d in vm["disks"]:
                click.echo(
                    f"exported {vm['name']}/{d['id']} at seq {d['seq']}: "
                    f"{_size(d['written_bytes'])} written, {_size(d['zero_bytes'])} of zeros and "
                    f"{_size(d['hole_bytes'])} of holes left sparse, "
                    f"{_size(d['reused_bytes'])} already there -> {body['dir']}/{d['image']}"
                )
    click.echo(
        f"next: carry {body['dir']} to the recovery site and run `replikant seed import DIR` "
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
    config = _config(ctx)
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
                    raise _refusal(url, status_code, doc)
                out.extend(doc["vms"])
        return out

    done = _run(go)
    missing = [v for v in vms if not any(v in (d["name"], d["uuid"]) for d in done)]
    if missing:
        raise AdminError(
            f"no agent protects vm {', '.join(missing)}", fix="check the names in [admin] agents"
        )
    if as_json:
        _emit_json({"vms": done})
        return
    for vm in done:
        for d in vm["disks"]:
            word = "no longer waits for media" if d["cancelled"] else "was not waiting for media"
            click.echo(f"{vm['name']}/{d['id']} {word}")


# --------------------------------------------------------------------------------------------
# replica: the operator's rebind and generation raise (an agent's PUT can do neither)


@click.group()
def replica() -> None:
    """Operator acts on a VM's replicas: rebind to another source host, raise the generation."""


async def _change_source(config: AdminConfig, vm: str, body: dict[str, Any]) -> list[Any]:
    async with AdminClient(config) as client:
        return await client.broker_json(f"/v1/vms/{vm}/source", method="POST", json=body)


def _print_source(answers: list[Any], as_json: bool) -> None:
    if as_json:
        _emit_json(answers)
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
    config = _config(ctx)
    _print_source(_run(lambda: _change_source(config, vm, {"host": host})), as_json)


@replica.command("set-generation")
@click.argument("vm")
@click.argument("generation", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def replica_set_generation(ctx: click.Context, vm: str, generation: int, as_json: bool) -> None:
    """Raise VM's generation to GENERATION (a failover act: the old primary is fenced)."""
    config = _config(ctx)
    _print_source(_run(lambda: _change_source(config, vm, {"generation": generation})), as_json)
