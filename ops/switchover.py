"""`replikant failover planned|unplanned|commit|cancel VM` and `replikant reverse VM` (added to
the ``failover`` group of :mod:`ops.failover`, which holds test failover).

Each command surveys both sites (every broker and agent of the admin config answers with its
site), works out the VM's role at each with :mod:`common.roles` (which refuses an illegal command
naming the state and the command that would fix it), then runs its steps, printing each with the
time elapsed (``--json``: one document at the end). Exit status 0 only on success.

The steps meet the daemons only over their APIs: the brokers' ``promote``, ``failover``
(commit/cancel) and ``adopt`` endpoints, and the agents' ``role`` acts (decision 041).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click

from common.errors import ReplikantError
from common.regions import change_map_summary
from common.roles import Command, Facts, RoleRefused, State, VMRole, plan
from ops.client import AdminClient, AdminError, admin_config, emit_json, refusal
from ops.failover import SELECTOR, VMS, failover, selected
from ops.render import merge_status
from ops.verify import compare_hashes

SURVEY_SECONDS = 5.0
NO_MAP = "the old primary's agent reported no change map for it (the disk was not open there)"
SYNC_SECONDS = 120.0


@dataclass
class Site:
    """One site as the survey saw it: its broker and agent, and what they hold of the VM."""

    name: str
    broker: str | None = None
    agent: str | None = None
    agent_host: str = ""
    broker_vm: dict[str, Any] | None = None
    agent_vm: dict[str, Any] | None = None
    agent_disks: list[dict[str, Any]] = field(default_factory=list)
    guest: bool = False  # the agent here runs the VM's guest (a [vms.hypervisor] section)

    def role(self, vm: str) -> VMRole | None:
        """The VM's role here, or None when this site holds nothing of it."""
        held = self.agent_vm.get("role") if self.agent_vm else None
        generation = max(
            int(self.agent_vm.get("generation", 1)) if self.agent_vm else 0,
            int(self.broker_vm.get("generation", 1)) if self.broker_vm else 0,
        )
        here = (self.broker_vm or {}).get("roles", {}).get(self.name)
        if held == "FENCED":
            state = State.FENCED
        elif held == "PRIMARY" and here == "FAILED-OVER":
            return VMRole(vm, self.name, State.FAILED_OVER, generation, None, generation - 1)
        elif held == "PRIMARY":
            state = State.PRIMARY
        elif held == "REPLICA" or here == "REPLICA":
            state = State.REPLICA
        else:
            return None
        return VMRole(vm, self.name, state, generation)


@dataclass
class Survey:
    """Every site reached, and the endpoints that did not answer."""

    vm: str
    sites: dict[str, Site]
    unreachable: list[str]

    def where(self, *states: State) -> Site | None:
        """The site holding the VM in one of ``states`` (None: no reachable site does)."""
        for site in self.sites.values():
            role = site.role(self.vm)
            if role is not None and role.state in states:
                return site
        return None

    def other(self, site: Site) -> Site | None:
        """The other site the VM lives at (reached), if any."""
        for other in self.sites.values():
            if other is not site and (other.agent_vm or other.broker_vm):
                return other
        return None

    def down(self) -> str:
        """The endpoints that did not answer, for messages."""
        return ", ".join(self.unreachable) or "none"


class Run:
    """One command's steps: each printed with the time since the start, and kept for --json."""

    def __init__(self, client: AdminClient, vm: str, command: str, as_json: bool) -> None:
        self.client = client
        self.vm = vm
        self.command = command
        self.as_json = as_json
        self.started = time.monotonic()
        self.steps: list[dict[str, Any]] = []

    def step(self, what: str, **detail: Any) -> None:
        """Record a finished step."""
        elapsed = round(time.monotonic() - self.started, 3)
        self.steps.append({"step": what, "elapsed_seconds": elapsed, **detail})
        if not self.as_json:
            extra = "".join(f" {k}={v}" for k, v in detail.items())
            click.echo(f"[{elapsed:7.2f} s] {self.vm}: {what}{extra}")

    async def agent(self, site: Site, act: str, generation: int = 0, **more: Any) -> dict[str, Any]:
        """One role act at ``site``'s agent; a refusal raises."""
        assert site.agent is not None
        status, body = await self.client.agent(
            site.agent,
            "POST",
            f"/v1/vms/{self.vm}/role",
            json={"act": act, "generation": generation, **more},
        )
        if status >= 400:
            raise refusal(site.agent, status, body)
        doc: dict[str, Any] = body
        return doc

    async def guest(self, site: Site, act: str) -> None:
        """Start or stop the VM's guest at ``site`` through its hypervisor driver, if it has one
        there (without one, the VM's writers are whatever uses its NBD exports)."""
        if not site.guest:
            return
        assert site.agent is not None
        status, body = await self.client.agent(site.agent, "POST", f"/v1/guests/{self.vm}/{act}")
        if status >= 400:
            raise refusal(site.agent, status, body)
        shown = {k: body[k] for k in ("state", "how", "seconds") if k in body}
        self.step(
            f"site {site.name}: guest {'started' if act == 'start' else 'shut down'}", **shown
        )

    async def broker(self, site: Site, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One POST to ``site``'s broker; a refusal raises."""
        assert site.broker is not None
        status, answer, _ = await self.client.request("POST", site.broker + path, json=body)
        if status >= 400:
            raise refusal(site.broker, status, answer)
        doc: dict[str, Any] = answer
        return doc


async def _reach(coro: Awaitable[Any]) -> Any:
    try:
        async with asyncio.timeout(SURVEY_SECONDS):
            return await coro
    except (AdminError, TimeoutError):
        return None


async def survey(client: AdminClient, vm: str) -> Survey:
    """Ask every broker and agent of the admin config what it holds of ``vm``."""
    sites: dict[str, Site] = {}
    down: list[str] = []
    for url in client.config.admin.brokers:
        base = url.rstrip("/")
        got = await _reach(client.request("GET", base + "/v1/status"))
        if got is None or got[0] != 200:
            down.append(base)
            continue
        doc = got[1]
        site = sites.setdefault(doc["broker"]["site"], Site(doc["broker"]["site"]))
        found = next((v for v in doc["vms"] if vm in (v["name"], v["uuid"])), None)
        # Of a cluster's members, the one that reports the VM serves it (its owner); a standby
        # reports no VMs.
        if found is not None or site.broker is None:
            site.broker, site.broker_vm = base, found
    for sock in client.config.admin.agents:
        got = await _reach(client.agent(sock, "GET", "/v1/status"))
        if got is None or got[0] != 200:
            down.append(sock)
            continue
        doc = got[1]
        site = sites.setdefault(doc["site"], Site(doc["site"]))
        site.agent, site.agent_host = sock, doc["host"]
        site.agent_vm = next((v for v in doc.get("vms", []) if vm in (v["name"], v["uuid"])), None)
        site.agent_disks = [d for d in doc["disks"] if vm in (d["vm"], d["vm_uuid"])]
        guests = await _reach(client.agent(sock, "GET", "/v1/guests"))
        if guests is not None and guests[0] == 200:
            site.guest = any(
                g["name"] == vm and not g["standby"] for g in guests[1].get("guests", [])
            )
    return Survey(vm, sites, down)


async def site_status(client: AdminClient) -> dict[str, Any]:
    """``status``'s document across sites: every broker that answers (one that does not is listed
    in ``unreachable``; none answering is an error), with each agent's own role of its VMs laid
    over what the brokers say (an old primary knows best that it is FENCED)."""
    docs, down, first_error = [], [], None
    for url in client.config.admin.brokers:
        try:
            status, body, _ = await client.request("GET", url.rstrip("/") + "/v1/status")
        except AdminError as exc:
            first_error = first_error or exc
            down.append(url)
            continue
        if status >= 400:
            raise refusal(url, status, body)
        docs.append(body)
    if not docs:
        assert first_error is not None
        raise first_error
    doc = merge_status(docs)
    by_uuid = {vm["uuid"]: vm for vm in doc["vms"]}

    def lay_over(site: str, held: dict[str, Any]) -> None:
        vm = by_uuid.get(held["uuid"])
        if vm is not None and vm["roles"].get(site) not in ("FAILED-OVER", "TEST"):
            vm["roles"] = {**vm["roles"], site: held["role"]}

    # The agents' host records on MQTT, as the brokers heard them: the roles of agents whose
    # control sockets this machine cannot reach (an offline agent's last word is not a role).
    for host in {h["host"]: h for d in docs for h in d.get("hosts", [])}.values():
        for held in host["vms"] if host["online"] else []:
            lay_over(host["site"], held)
    for sock in client.config.admin.agents:
        got = await _reach(client.agent(sock, "GET", "/v1/status"))
        if got is None or got[0] != 200:
            down.append(sock)
            continue
        for held in got[1].get("vms", []):
            lay_over(got[1]["site"], held)
    doc["unreachable"] = down
    return doc


def _refused(exc: RoleRefused) -> AdminError:
    return AdminError(str(exc).split("; ")[0], fix=exc.fix)


def _need(survey: Survey, site: Site | None, what: str) -> Site:
    if site is None or site.agent is None or site.broker is None:
        raise AdminError(
            f"vm {survey.vm}: {what} cannot be reached (did not answer: {survey.down()})",
            fix="bring that site's broker and agent back (`replikant lab start --site SITE` in "
            "the lab), then retry",
        )
    return site


def _uuid(site: Site) -> str:
    vm = site.agent_vm or site.broker_vm
    assert vm is not None
    return str(vm["uuid"])


async def _final_cut_matches(run: Run, src: Site, dst: Site) -> bool:
    """Cut and ship at the source, then compare block hashes of both sides at that cut."""
    assert src.agent is not None
    assert dst.broker is not None
    status, answer = await run.client.agent(src.agent, "POST", f"/v1/vms/{run.vm}/verify")
    if status >= 400:
        raise refusal(src.agent, status, answer)
    differing = 0
    for d in answer["disks"]:
        bs = int(d["block_size"])
        code, remote, _ = await run.client.request(
            "GET",
            f"{dst.broker}/v1/replicas/{answer['vm_uuid']}/{d['disk_id']}/hashes",
            params={"block_size": bs, "point": f"{d['generation']}:{d['cut_id']}", "wait": 120},
            expect="bytes",
        )
        if code >= 400:
            raise refusal(dst.broker, code, remote)
        local = base64.b64decode(d["hashes"])
        differing += compare_hashes(local, bytes(remote), bs, int(d["disk_size"]))[
            "differing_blocks"
        ]
    run.step("final cut shipped and compared", differing_blocks=differing)
    return differing == 0


async def _hand_images_back(run: Run, old: Site, new: Site, generation: int) -> None:
    """The old primary's agent releases its images; its site's broker adopts them as the
    replicas of the VM at ``generation``, bound to the new primary; the new one replicates."""
    released = await run.agent(old, "demote", generation)
    run.step(f"site {old.name}: agent released the images (REPLICA)", generation=generation)
    sizes = {d["disk"]: (d["size"], 65536) for d in old.agent_disks}
    disks = []
    for d in released["disks"]:
        size, block = sizes.get(d["disk_id"], (0, 65536))
        disks.append({"disk_id": d["disk_id"], "image": d["image"], "disk_size": size,
                      "block_size": block})  # fmt: skip
    body = {
        "vm_uuid": _uuid(new),
        "generation": generation,
        "source_host": new.agent_host,
        "source_site": new.name,
        "disks": disks,
    }
    await run.broker(old, f"/v1/vms/{run.vm}/adopt", body)
    run.step(f"site {old.name}: broker adopted the images as replicas")
    maps = [{"disk_id": d["disk_id"], **d.get("change_map", {"regions": None, "why": NO_MAP})}
            for d in released["disks"]]  # fmt: skip
    run.step(f"site {old.name}: change maps handed over", **change_map_summary(maps))
    await run.agent(new, "replicate", disks=maps)
    run.step(f"site {new.name}: replication towards site {old.name} started")
    shipped = await _wait_synced(run, new)
    run.step("reverse replication in step", bytes_shipped=shipped)


async def _wait_synced(run: Run, site: Site) -> int:
    """Wait until every disk of the VM at ``site`` ships deltas; the bytes its agent shipped."""
    assert site.agent is not None
    deadline = time.monotonic() + SYNC_SECONDS
    while True:
        _, doc = await run.client.agent(site.agent, "GET", "/v1/status")
        disks = [d for d in doc["disks"] if run.vm in (d["vm"], d["vm_uuid"])]
        if disks and all(d["ready"] and d["mode"] == "delta" and d["batches"] for d in disks):
            return sum(int(d["bytes_shipped"]) for d in disks)
        if time.monotonic() > deadline:
            errors = {d["disk"]: d["last_error"] for d in disks}
            raise AdminError(
                f"vm {run.vm}: replication from site {site.name} did not settle in "
                f"{SYNC_SECONDS:.0f} s ({errors})",
                fix=f"`replikant agent status` at site {site.name} shows why",
            )
        await asyncio.sleep(0.2)


async def planned(run: Run, s: Survey) -> None:
    """Stop the source, ship the final cut, prove zero lag, promote, hand the images back."""
    src = _need(s, s.where(State.PRIMARY), "the VM's PRIMARY site")
    dst = s.other(src)
    if dst is None or dst.role(run.vm) is None:
        raise AdminError(f"vm {run.vm}: no site holds its replica (did not answer: {s.down()})",
                         fix="bring the recovery site back, then retry")  # fmt: skip
    dst_role = dst.role(run.vm)
    assert dst_role is not None
    plan(dst_role, Command.PLANNED, Facts(source_stopped=True, lag_zero=True))  # state check
    _need(s, dst, f"site {dst.name}")
    await run.agent(dst, "begin")
    try:
        await run.guest(src, "stop")
        await run.agent(src, "quiesce")
        run.step(f"site {src.name}: writers stopped (exports refuse writes)")
        try:
            zero = await _final_cut_matches(run, src, dst)
            plan(dst_role, Command.PLANNED, Facts(source_stopped=True, lag_zero=zero))
        except (ReplikantError, RoleRefused):
            await run.agent(src, "resume")
            run.step(f"site {src.name}: writers resumed (failover abandoned)")
            raise
        generation = dst_role.generation + 1
        await run.broker(dst, f"/v1/vms/{run.vm}/promote", {"generation": generation})
        run.step(f"site {dst.name}: broker handed the replica over", generation=generation)
        await run.agent(dst, "promote", generation)
        run.step(f"site {dst.name}: agent serves the VM's disks (PRIMARY)")
        await run.guest(dst, "start")
        await run.broker(dst, f"/v1/vms/{run.vm}/failover", {"action": "commit"})
        await _hand_images_back(run, src, dst, generation)
    finally:
        await run.agent(dst, "end")


async def _point_id(run: Run, site: Site, point: str) -> str:
    """``latest``, a point id ``G:C`` as given, or the newest point at or before a time (unix
    seconds or ISO 8601) among those ``site``'s broker retains."""
    if point == "latest" or (":" in point and point.replace(":", "").isdigit()):
        return point
    try:
        when = float(point)
    except ValueError:
        try:
            when = datetime.fromisoformat(point).timestamp()
        except ValueError:
            raise AdminError(
                f"--point {point!r} is neither latest, a point id G:C nor a time",
                fix="`replikant points VM` lists the point ids and times",
            ) from None
    assert site.broker is not None
    status, doc, _ = await run.client.request("GET", f"{site.broker}/v1/vms/{run.vm}/points")
    if status >= 400:
        raise refusal(site.broker, status, doc)
    older = [p for p in doc["points"] if p["time"] <= when]
    if not older:
        raise AdminError(
            f"vm {run.vm} has no retained point at or before {point}",
            fix=f"`replikant points {run.vm}` lists the retained points",
        )
    chosen = max(older, key=lambda p: p["time"])
    run.step("point chosen", point=chosen["id"], time=chosen["time"])
    return str(chosen["id"])


async def unplanned(run: Run, s: Survey, point: str) -> None:
    """The primary is gone: promote the replica at the latest point."""
    dst = s.where(State.REPLICA)
    src = s.where(State.PRIMARY)
    if src is not None and src.agent is not None and dst is not None:
        raise AdminError(
            f"vm {run.vm} is PRIMARY at site {src.name}, which answers: an unplanned failover "
            "would leave two primaries",
            fix=f"`replikant failover planned {run.vm}` moves it without losing a write",
        )
    if dst is None:
        roles = [r for r in (site.role(run.vm) for site in s.sites.values()) if r is not None]
        if roles:
            plan(roles[0], Command.UNPLANNED)
        raise AdminError(f"vm {run.vm}: no reachable site holds its replica ({s.down()})")
    role = dst.role(run.vm)
    assert role is not None
    point = await _point_id(run, dst, point)
    after = plan(role, Command.UNPLANNED, Facts(point=point)).after
    await run.agent(dst, "begin")
    try:
        body = {"generation": after.generation, "point": point}
        done = await run.broker(dst, f"/v1/vms/{run.vm}/promote", body)
        back = "" if point == "latest" else f", rolled back to {point}"
        run.step(f"site {dst.name}: broker applied its journal{back} and handed the replica over",
                 generation=after.generation,
                 rolled_back_bytes=sum(done.get("rolled_back_bytes", {}).values()))  # fmt: skip
        rolled = done.get("rolled_back_regions", {})  # the new primary's map must hold them
        await run.agent(dst, "promote", after.generation, point=point, rolled_back=rolled)
        run.step(f"site {dst.name}: agent serves the VM's disks (FAILED-OVER, uncommitted)")
        await run.guest(dst, "start")
    finally:
        await run.agent(dst, "end")


async def settle(run: Run, s: Survey, action: str) -> None:
    """Commit or cancel an uncommitted failover."""
    site = s.where(State.FAILED_OVER)
    if site is None:
        roles = [r for r in (x.role(run.vm) for x in s.sites.values()) if r is not None]
        if not roles:
            raise AdminError(f"no reachable site holds vm {run.vm} (did not answer: {s.down()})")
        plan(roles[0], Command.COMMIT if action == "commit" else Command.CANCEL)
        raise AdminError(f"vm {run.vm} has no uncommitted failover")
    role = site.role(run.vm)
    assert role is not None
    plan(role, Command.COMMIT if action == "commit" else Command.CANCEL)
    if action == "commit":
        await run.broker(site, f"/v1/vms/{run.vm}/failover", {"action": "commit"})
        run.step(f"site {site.name}: failover committed (PRIMARY)")
        return
    old = _need(s, s.other(site), "the old primary site (cancel gives the VM back to it)")
    await run.guest(site, "stop")
    await run.agent(site, "demote", role.generation)
    run.step(f"site {site.name}: agent stopped serving the VM (REPLICA)")
    await run.broker(site, f"/v1/vms/{run.vm}/failover", {"action": "cancel"})
    run.step(f"site {site.name}: broker holds the replica again")
    await run.agent(old, "resume", role.generation)
    run.step(f"site {old.name}: the VM is PRIMARY again and resyncs the replica by hashes")


async def reverse(run: Run, s: Survey) -> None:
    """Make the fenced old primary the replica of the new one, shipping only what differs."""
    new = s.where(State.PRIMARY, State.FAILED_OVER)
    old = s.where(State.FENCED)
    if old is None:
        roles = [r for r in (x.role(run.vm) for x in s.sites.values()) if r is not None]
        if new is not None and s.other(new) is None:
            raise AdminError(
                f"vm {run.vm} is PRIMARY at site {new.name}, but the old primary site cannot "
                f"be reached (did not answer: {s.down()}): reverse replication cannot start",
                fix="bring that site's broker and agent back (`replikant lab start --site "
                f"SITE` in the lab), then retry `replikant reverse {run.vm}`",
            )
        if roles:
            plan(roles[0], Command.REVERSE)
        raise AdminError(f"vm {run.vm}: no site holds it FENCED ({s.down()})")
    old_role = old.role(run.vm)
    assert old_role is not None
    new_role = new.role(run.vm) if new is not None else None
    plan(
        old_role,
        Command.REVERSE,
        Facts(
            peer_state=new_role.state if new_role else None,
            peer_generation=new_role.generation if new_role else None,
        ),
    )
    assert new is not None
    assert new_role is not None
    _need(s, old, f"site {old.name}")
    _need(s, new, f"site {new.name}")
    await run.agent(new, "begin")
    try:
        await _hand_images_back(run, old, new, new_role.generation)
    finally:
        await run.agent(new, "end")


PARALLEL = 8
"""VMs run at once by one command (``--parallel``): each holds two sites' daemons busy."""


async def _one(
    client: AdminClient,
    vm: str,
    name: str,
    as_json: bool,
    body: Callable[[Run, Survey], Awaitable[None]],
) -> dict[str, Any]:
    """One VM's command: its JSON part; a failure is caught, printed and recorded there."""
    run = Run(client, vm, name, as_json)
    try:
        s = await survey(client, vm)
        run.step("sites surveyed", sites=",".join(sorted(s.sites)), unreachable=len(s.unreachable))
        try:
            await body(run, s)
        except RoleRefused as exc:
            raise _refused(exc) from None
    except ReplikantError as exc:
        if not as_json:
            elapsed = time.monotonic() - run.started
            click.echo(f"[{elapsed:7.2f} s] {vm}: FAILED: {exc}", err=True)
        return {"vm": vm, "command": name, "result": "failed", "error": exc.message,
                "fix": exc.fix, "steps": run.steps}  # fmt: skip
    return {"vm": vm, "command": name, "result": "ok", "error": None, "fix": None,
            "steps": run.steps}  # fmt: skip


def _command(
    ctx: click.Context,
    name: str,
    body: Callable[[Run, Survey], Awaitable[None]],
    *,
    vms: tuple[str, ...],
    selector: str | None,
    parallel: int,
    as_json: bool,
) -> None:
    """Run ``body`` for every VM named or selected, at most ``parallel`` at once; exit status 0
    only when every VM succeeded."""
    config = admin_config(ctx)

    async def go() -> list[dict[str, Any]]:
        async with AdminClient(config) as client:
            chosen = await selected(client, vms, selector)
            bound = asyncio.Semaphore(parallel)

            async def bounded(vm: str) -> dict[str, Any]:
                async with bound:
                    return await _one(client, vm, name, as_json, body)

            return list(await asyncio.gather(*(bounded(vm) for vm in chosen)))

    results = asyncio.run(go())
    ok = all(r["result"] == "ok" for r in results)
    if as_json:
        emit_json({"ok": ok, "command": name, "vms": results})
    if not ok:
        ctx.exit(1)


_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_parallel = click.option(
    "--parallel",
    default=PARALLEL,
    show_default=True,
    type=click.IntRange(1, 64),
    help="VMs worked on at once.",
)


def _targets(f: Callable[..., None]) -> Callable[..., None]:
    """The options every failover command shares: VMs, ``--selector``, ``--parallel``,
    ``--json``."""
    for option in (click.pass_context, _json, _parallel, SELECTOR, VMS):
        f = option(f)
    return f


@failover.command("planned")
@_targets
def planned_cmd(ctx: click.Context, **opts: Any) -> None:
    """Shut each VM's writers down, ship the final cut, prove zero lag, promote it at the
    recovery site with generation + 1, and reverse replication at once."""
    _command(ctx, "planned", planned, **opts)


@failover.command("unplanned")
@click.option(
    "--point",
    default="latest",
    show_default=True,
    help="latest, a point id G:C, or a time (unix seconds or ISO 8601): the newest point then.",
)
@_targets
def unplanned_cmd(ctx: click.Context, point: str, **opts: Any) -> None:
    """The primary site is gone: start each VM from its replica (FAILED-OVER until commit or
    cancel)."""
    _command(ctx, "unplanned", lambda run, s: unplanned(run, s, point), **opts)


@failover.command("commit")
@_targets
def commit_cmd(ctx: click.Context, **opts: Any) -> None:
    """Keep an unplanned failover of each VM: the recovery site is its PRIMARY."""
    _command(ctx, "commit", lambda run, s: settle(run, s, "commit"), **opts)


@failover.command("cancel")
@_targets
def cancel_cmd(ctx: click.Context, **opts: Any) -> None:
    """Undo an unplanned failover of each VM: the old primary takes it back and resyncs the
    replica."""
    _command(ctx, "cancel", lambda run, s: settle(run, s, "cancel"), **opts)


@click.command("reverse")
@_targets
def reverse_cmd(ctx: click.Context, **opts: Any) -> None:
    """Make each VM's fenced old primary its replica, shipping only the blocks that differ."""
    _command(ctx, "reverse", reverse, **opts)
