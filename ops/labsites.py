"""The lab's two sites: which daemons each site runs, their files, and `lab.json`'s site fields.

Site ``primary`` runs the agent that serves the demo VMs (``h1``, shipping to the recovery
site's broker) and a broker of its own (cluster ``dr-primary``, store ``primary/store``) that
receives the reversed replication after a failover. Site ``recovery`` runs the broker that holds
the replicas (cluster ``dr``) and an agent (``h2``, shipping to the primary site's broker) whose
VMs start as ``REPLICA``: it serves nothing until a failover promotes a VM there, and then serves
the replica image as a tracked export. Both sites take their certificates from the lab's one PKI.

The MQTT broker counts as a recovery-site daemon (the recovery site's broker uses it). Each site's
daemons are described in ``sites.json`` (argv and readiness check), so that ``replikant lab start
--site SITE`` starts them again, in order, from the state they left on disk; ``lab.json`` gets
``pids: {SITE: [pid, ...]}`` and, per demo disk, ``nbd_uris: {SITE: uri}``.

This module knows nothing of processes: :mod:`ops.lab` starts what it describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomli_w

from certs.store import CertStore

PRIMARY_SITE = "primary"
RECOVERY_SITE = "recovery"
PRIMARY_CLUSTER = "dr-primary"
PRIMARY_BROKER_NODE = "p1"
RECOVERY_AGENT_HOST = "h2"
SITES_FILE = "sites.json"
LAB_FILE = "lab.json"


def _tls(tls: Any) -> dict[str, str]:
    return {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}


def _write_toml(path: Path, doc: dict[str, Any]) -> None:
    path.write_bytes(tomli_w.dumps(doc).encode())


def recovery_socket_dir(root: Path) -> Path:
    """Where the recovery site's agent serves its exports (short: unix paths are limited)."""
    return root / "run-r"


def add_sites(
    root: Path,
    lab: dict[str, Any],
    *,
    cli: list[str],
    primary_broker_port: int,
    interval: float,
    mqtt_argv: list[str],
    members: list[tuple[str, Path, str]],
) -> None:
    """Write the primary site's broker and the recovery site's agent, extend ``admin.toml`` to
    both sites, and add the site fields to ``lab`` (``sites``, ``nbd_uris`` per disk)."""
    pki = CertStore(root / "pki")
    broker = pki.issue_broker(
        PRIMARY_CLUSTER, PRIMARY_BROKER_NODE, dns=["localhost"], ips=["127.0.0.1"]
    )
    agent = pki.issue_agent(RECOVERY_AGENT_HOST, dns=["localhost"], ips=["127.0.0.1"])
    primary_url = f"https://127.0.0.1:{primary_broker_port}"
    store = root / PRIMARY_SITE / "store"
    _write_toml(
        root / "broker-primary.toml",
        {
            "broker": {
                "node": PRIMARY_BROKER_NODE,
                "cluster": PRIMARY_CLUSTER,
                "site": PRIMARY_SITE,
                "listen": f"127.0.0.1:{primary_broker_port}",
                "store": str(store),
                "min_free_bytes": 64 << 20,
            },
            "tls": _tls(broker.tls),
            "authorization": {"mode": "listed", "agents": [RECOVERY_AGENT_HOST]},
            "retention": {"journal_bound": "100%"},
        },
    )
    sockets = recovery_socket_dir(root)
    control = sockets / "control" / "agent.sock"
    agent_vms = []
    for vm in lab["vms"]:
        disks = []
        for d in vm["disks"]:
            export = f"{vm['name']}-{d['id']}"
            disks.append({"id": d["id"], "image": d["replica_image"], "export": export})
            d["nbd_uris"] = {
                PRIMARY_SITE: d["nbd_uri"],
                RECOVERY_SITE: f"nbd+unix:///{export}?socket={sockets / (export + '.sock')}",
            }
        agent_vms.append(
            {
                "name": vm["name"],
                "uuid": vm["uuid"],
                "policy": "lab",
                "labels": {"tier": "demo"},
                "initial_role": "REPLICA",
                "disks": disks,
            }
        )
    _write_toml(
        root / "agent-recovery.toml",
        {
            "agent": {
                "host": RECOVERY_AGENT_HOST,
                "site": RECOVERY_SITE,
                "state_dir": str(root / RECOVERY_SITE / "state"),
                "control_socket": str(control),
            },
            "tls": _tls(agent.tls),
            "nbd": {"socket_dir": str(sockets)},
            "broker": {"urls": [primary_url], "cluster": PRIMARY_CLUSTER},
            # On the lab's one MQTT server: its host record carries the VM's role here.
            "mqtt": {"url": lab["mqtt"], "tls": True},
            "policies": {"lab": {"interval_seconds": interval}},
            "vms": agent_vms,
        },
    )
    admin_path = root / "admin.toml"
    import tomllib  # noqa: PLC0415 - only here

    admin = tomllib.loads(admin_path.read_text())
    admin["admin"]["brokers"].append(primary_url)
    admin["admin"]["agents"].append(str(control))
    _write_toml(admin_path, admin)
    lab["sites"] = {
        PRIMARY_SITE: {
            "broker_url": primary_url,
            "agent_control_socket": lab["agent_control_socket"],
        },
        RECOVERY_SITE: {"broker_url": lab["broker_url"], "agent_control_socket": str(control)},
    }
    _write_daemons(root, cli, mqtt_argv, members, primary_url, (control, lab))


def _write_daemons(
    root: Path,
    cli: list[str],
    mqtt_argv: list[str],
    members: list[tuple[str, Path, str]],
    primary_url: str,
    agents: tuple[Path, dict[str, Any]],
) -> None:
    """``sites.json``: each site's daemons in start order, with how to tell each is ready
    (``members``: the recovery cluster's brokers as ``(process name, config, url)``)."""
    control, lab = agents
    mqtt_port = int(lab["mqtt"].rsplit(":", 1)[1])

    def run(name: str, config: Path, ready: dict[str, Any]) -> dict[str, Any]:
        kind = "broker" if name.startswith("broker") else "agent"
        argv = [*cli, kind, "run", "--config", str(config)]
        return {"name": name, "argv": argv, "ready": ready}

    daemons = {
        RECOVERY_SITE: [
            {"name": "mqtt", "argv": mqtt_argv, "ready": {"tls_port": mqtt_port}},
            *(run(name, config, {"https": url}) for name, config, url in members),
            run("agent-recovery", root / "agent-recovery.toml", {"unix": str(control)}),
        ],
        PRIMARY_SITE: [
            run("broker-primary", root / "broker-primary.toml", {"https": primary_url}),
            run("agent", root / "agent.toml", {"unix": lab["agent_control_socket"]}),
        ],
    }
    (root / SITES_FILE).write_text(json.dumps(daemons, indent=1))


def site_daemons(root: Path, site: str) -> list[dict[str, Any]]:
    """The daemons of ``site`` in start order (argv, readiness), as :func:`add_sites` wrote them."""
    sites: dict[str, list[dict[str, Any]]] = json.loads((root / SITES_FILE).read_text())
    if site not in sites:
        from ops.client import AdminError  # noqa: PLC0415

        raise AdminError(
            f"the lab in {root} has no site {site!r}",
            fix=f"give one of: {', '.join(sorted(sites))}",
        )
    return sites[site]


def pids_by_site(root: Path, processes: dict[str, int]) -> dict[str, list[int]]:
    """``lab.json``'s ``pids``: every daemon's pid, by the site it belongs to."""
    sites: dict[str, list[dict[str, Any]]] = json.loads((root / SITES_FILE).read_text())
    return {
        site: [processes[d["name"]] for d in daemons if d["name"] in processes]
        for site, daemons in sites.items()
    }
