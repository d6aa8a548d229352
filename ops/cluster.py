"""`replikant cluster status`: who owns each recovery cluster, at which epoch, and its members.

Where it comes from (decision 031): every broker in ``[admin] brokers`` is asked over HTTPS for
its status; each answers with its own role and its view of the cluster, which it builds from the
retained MQTT records it subscribes to (membership, owner). The owner shown is the member that
*itself* answers that it owns and serves, at the highest epoch: the retained owner record is
only believed when the member it names confirms it. Members come from the retained records as
the members see them; one that answered us is online whatever its record says.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ops.client import AdminClient, AdminError, admin_config, emit_json, run


def cluster_doc(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"clusters": [{"name", "owner", "epoch", "members": [{"node", "online", "url"}]}]}``
    from the brokers' status answers (``broker`` part of ``GET /v1/status``)."""
    by_name: dict[str, dict[str, Any]] = {}
    for b in answers:
        name = b["cluster"]
        c = by_name.setdefault(name, {"owner": None, "epoch": 0, "members": {}, "claimed": None})
        view = b.get("cluster_view") or {}
        for m in view.get("members", []):
            seen = c["members"].setdefault(m["node"], dict(m))
            seen["online"] = seen["online"] or m["online"]
        c["members"][b["node"]] = {
            **c["members"].get(b["node"], {"url": ""}),
            "node": b["node"],
            "online": True,
        }
        if view.get("role") == "owner" and view.get("serving") and b["epoch"] >= c["epoch"]:
            c["owner"], c["epoch"] = b["node"], b["epoch"]
        elif view.get("owner") and c["claimed"] is None:
            c["claimed"] = view["owner"]
        if view.get("role") is None and b.get("epoch", 0) >= 1:  # a broker without MQTT owns
            c["owner"], c["epoch"] = b["node"], b["epoch"]
    clusters = []
    for name, c in sorted(by_name.items()):
        if c["owner"] is None and c["claimed"] is not None:
            c["epoch"] = c["claimed"]["epoch"]  # named by the records, confirmed by nobody
        clusters.append(
            {
                "name": name,
                "owner": c["owner"],
                "epoch": c["epoch"],
                "members": [
                    {"node": m["node"], "online": bool(m["online"]), "url": m.get("url", "")}
                    for _, m in sorted(c["members"].items())
                ],
            }
        )
    return {"clusters": clusters}


@click.group("cluster")
def cluster() -> None:
    """Recovery clusters: owner election and members."""


@cluster.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Each cluster's owner, its epoch, and every member with whether it is online."""
    config = admin_config(ctx)

    async def go() -> list[dict[str, Any]]:
        answers = []
        async with AdminClient(config, timeout=10) as client:
            for base in config.admin.brokers:
                try:
                    code, body, _ = await client.request("GET", base.rstrip("/") + "/v1/status")
                except AdminError:
                    continue  # down: the others' records tell whether it is online
                if code == 200 and isinstance(body, dict) and isinstance(body.get("broker"), dict):
                    answers.append(body["broker"])
        if not answers:
            raise AdminError(
                f"no broker answered ({', '.join(config.admin.brokers)})",
                fix="check [admin] brokers in the admin config and that the brokers run",
            )
        return answers

    doc = cluster_doc(run(go))
    if as_json:
        emit_json(doc)
        return
    console = Console()
    for c in doc["clusters"]:
        owner = c["owner"] or "[bold red]none (election under way?)[/]"
        table = Table(title=f"cluster {c['name']}: owner {owner}, epoch {c['epoch']}")
        for col in ("MEMBER", "ONLINE", "URL", "ROLE"):
            table.add_column(col)
        for m in c["members"]:
            online = "[green]yes[/]" if m["online"] else "[red]no[/]"
            role = "owner" if m["node"] == c["owner"] else "standby"
            table.add_row(m["node"], online, m["url"], role)
        console.print(table)
