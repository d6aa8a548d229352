"""`replikant failover test | stop-test`: boot an isolated copy of a VM from a recovery point, and
remove it again (docs/failover.md, decision 040).

`test` asks the recovery site's broker to make the VM TEST and serve its disks as of the point
(private overlays), then asks the agent that lists the VM as a guest to boot them with no NIC.
`stop-test` stops that guest, removes its run directory, the exports and their overlays, and
returns the role to REPLICA. Each step prints with its elapsed time; `--json` prints the steps as
one document; the exit status is 0 only when every VM succeeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import click

from common.config import AdminConfig
from common.errors import ReplikantError
from ops.client import AdminClient, AdminError, admin_config, emit_json, refusal, run


@dataclass
class Run:
    """One VM's command: its steps with elapsed times, and how it ended."""

    vm: str
    started: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    quiet: bool = False

    def step(self, name: str, text: str, **facts: Any) -> None:
        """Record (and unless ``--json``, print) one finished step."""
        seconds = round(time.monotonic() - self.started, 3)
        self.steps.append({"step": name, "seconds": seconds, "text": text, **facts})
        if not self.quiet:
            click.echo(f"[{seconds:7.2f}s] {self.vm}: {text}")

    def fail(self, exc: ReplikantError) -> None:
        """The command failed for this VM: say why and what to do."""
        self.error = str(exc)
        if not self.quiet:
            click.echo(f"[{time.monotonic() - self.started:7.2f}s] {self.vm}: FAILED: {exc}")

    def json(self) -> dict[str, Any]:
        """The VM's part of the ``--json`` document."""
        return {"vm": self.vm, "ok": self.error is None, "steps": self.steps, "error": self.error}


@click.group()
def failover() -> None:
    """Failover: isolated test copies of VMs at the recovery site (docs/failover.md)."""


async def _broker(client: AdminClient, method: str, path: str, **kw: Any) -> tuple[str, Any]:
    """The first broker that knows ``path``'s VM: (its URL, its answer); refusals raise."""
    last: tuple[str, int, Any] | None = None
    for base in client.config.admin.brokers:
        url = base.rstrip("/")
        status, body, _ = await client.request(method, url + path, **kw)
        if status == 404:
            last = (url, status, body)
            continue
        if status >= 400:
            raise refusal(url, status, body)
        return url, body
    assert last is not None, "[admin] brokers is never empty"
    raise refusal(*last)


async def _guest_agent(client: AdminClient, vm: str) -> str:
    """The control socket of the agent that runs ``vm``'s test copy: the one whose copy runs,
    else one that lists the VM as standby (never its own primary's agent)."""
    standby = []
    for sock in client.config.admin.agents:
        status, body = await client.agent(sock, "GET", "/v1/guests")
        for g in body.get("guests", []) if status == 200 else []:
            if g["name"] == vm and g["instances"]["test"]["state"] == "running":
                return sock
            if g["name"] == vm and g["standby"]:
                standby.append(sock)
    if standby:
        return standby[0]
    raise AdminError(
        f"no agent in [admin] agents can run a guest of vm {vm}",
        fix="give the recovery site's agent a [[standby]] entry for it (name, uuid, "
        "[standby.hypervisor]) and list its control socket in [admin] agents",
    )


async def _agent_call(client: AdminClient, sock: str, method: str, path: str, **kw: Any) -> Any:
    status, body = await client.agent(sock, method, path, **kw)
    if status >= 400:
        raise refusal(f"agent {sock}", status, body)
    return body


async def _known_vms(client: AdminClient) -> list[dict[str, Any]]:
    """Every VM of every broker that answers (a failover runs while a site is down)."""
    vms: list[dict[str, Any]] = []
    for base in client.config.admin.brokers:
        try:
            status, doc, _ = await client.request("GET", base.rstrip("/") + "/v1/status")
        except AdminError:
            continue
        vms += doc["vms"] if status == 200 else []
    return vms


async def selected(client: AdminClient, names: tuple[str, ...], selector: str | None) -> list[str]:
    """The VMs named, plus those whose labels match ``k=v[,k=v]``."""
    chosen = list(names)
    if selector:
        want = dict(pair.split("=", 1) for pair in selector.split(",") if "=" in pair)
        for vm in await _known_vms(client):
            labels = vm["disks"][0].get("labels", {}) if vm.get("disks") else {}
            if all(labels.get(k) == v for k, v in want.items()) and vm["name"] not in chosen:
                chosen.append(vm["name"])
    if not chosen:
        raise AdminError(
            "no VM selected", fix="name VMs or pass --selector KEY=VALUE matching their labels"
        )
    return chosen


async def _test_one(client: AdminClient, r: Run, point: str) -> None:
    url, doc = await _broker(client, "POST", f"/v1/vms/{r.vm}/test", json={"point": point})
    r.step(
        "broker",
        f"broker {url} at site {doc['site']}: REPLICA -> {doc['role']} from point {doc['point']}, "
        f"{len(doc['exports'])} disk(s) exported with private overlays",
        broker=url,
        site=doc["site"],
        role=doc["role"],
        point=doc["point"],
        exports=[e["name"] for e in doc["exports"]],
    )
    try:
        sock = await _guest_agent(client, r.vm)
        disks = {e["disk"]: e["nbd_uri"] for e in doc["exports"]}
        guest = await _agent_call(
            client, sock, "POST", f"/v1/guests/{r.vm}/test", json={"disks": disks}
        )
    except ReplikantError:
        await _broker(client, "DELETE", f"/v1/vms/{r.vm}/test")
        r.step("rollback", f"test role and exports at {url} removed again")
        raise
    r.step(
        "guest",
        f"test copy running on agent {sock} (pid {guest['pid']}, no NIC: isolated)",
        agent=sock,
        pid=guest["pid"],
        isolated=True,
    )


async def _stop_one(client: AdminClient, r: Run) -> None:
    _, tests = await _broker(client, "GET", "/v1/tests")
    if any(t["vm"] == r.vm for t in tests["tests"]):
        sock = await _guest_agent(client, r.vm)
        stopped = await _agent_call(client, sock, "DELETE", f"/v1/guests/{r.vm}/test")
        r.step(
            "guest",
            f"test copy stopped on agent {sock} ({stopped['how']}), run directory removed",
            agent=sock,
            how=stopped["how"],
        )
    # Without a test copy the broker refuses, naming the VM's role and what to run instead.
    url, doc = await _broker(client, "DELETE", f"/v1/vms/{r.vm}/test")
    r.step(
        "broker",
        f"broker {url} at site {doc['site']}: TEST -> {doc['role']}, "
        f"{len(doc['removed'])} export(s) and their overlays removed",
        broker=url,
        role=doc["role"],
        removed=doc["removed"],
    )


async def _each(
    config: AdminConfig, vms: tuple[str, ...], selector: str | None, quiet: bool, action: Any
) -> list[Run]:
    async with AdminClient(config) as client:
        runs = [Run(vm, quiet=quiet) for vm in await selected(client, vms, selector)]
        for r in runs:
            try:
                await action(client, r)
            except ReplikantError as exc:
                r.fail(exc)
        return runs


def _finish(runs: list[Run], as_json: bool) -> None:
    ok = all(r.error is None for r in runs)
    if as_json:
        emit_json({"ok": ok, "vms": [r.json() for r in runs]})
    if not ok:
        raise SystemExit(1)


VMS = click.argument("vms", nargs=-1)
SELECTOR = click.option("--selector", help="Also every VM whose labels match KEY=VALUE[,...].")
_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@failover.command("test")
@VMS
@click.option("--point", default="latest", show_default=True, help="Recovery point id (G:C).")
@SELECTOR
@_JSON
@click.pass_context
def failover_test(
    ctx: click.Context, vms: tuple[str, ...], point: str, selector: str | None, as_json: bool
) -> None:
    """Boot an isolated copy of each VM from POINT at the recovery site; replication goes on."""
    config = admin_config(ctx)

    async def action(client: AdminClient, r: Run) -> None:
        await _test_one(client, r, point)

    _finish(run(lambda: _each(config, vms, selector, as_json, action)), as_json)


@failover.command("stop-test")
@VMS
@SELECTOR
@_JSON
@click.pass_context
def failover_stop_test(
    ctx: click.Context, vms: tuple[str, ...], selector: str | None, as_json: bool
) -> None:
    """Stop each VM's test copy and remove its exports, overlays and run files."""
    config = admin_config(ctx)
    _finish(run(lambda: _each(config, vms, selector, as_json, _stop_one)), as_json)
