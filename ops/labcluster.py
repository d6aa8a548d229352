"""The lab's recovery cluster: N broker members on one store (issue 12, decision 031).

Member ``b1`` keeps the lab's ``broker.toml``; ``b2``..``bN`` get ``broker-<node>.toml``, the same
but for their node name, port and certificate. The agent's ``[broker] urls`` and the admin
config's ``[admin] brokers`` list every member, so whichever owns the cluster is reached with no
configuration change. ``lab.json`` describes them as ``brokers: [{node, cluster, url, pid}]``.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from certs.store import CertStore


@dataclass(frozen=True)
class LabMember:
    """One broker member of the lab's cluster."""

    node: str
    port: int
    config: Path

    @property
    def url(self) -> str:
        """Its HTTPS address."""
        return f"https://127.0.0.1:{self.port}"


def plan_members(root: Path, first_port: int, count: int) -> list[LabMember]:
    """``b1`` (the lab's ``broker.toml`` and port) and ``count - 1`` more on free ports."""
    members = [LabMember("b1", first_port, root / "broker.toml")]
    for i in range(2, count + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        members.append(LabMember(f"b{i}", port, root / f"broker-b{i}.toml"))
    return members


def write_member_configs(root: Path, pki: Path, cluster: str, members: list[LabMember]) -> None:
    """Configs of the members after ``b1`` (from ``broker.toml``); every member listed in the
    agent's and the admin's configs."""
    base = tomllib.loads((root / "broker.toml").read_text())
    store = CertStore(pki)
    for m in members[1:]:
        cert = store.issue_broker(cluster, m.node, dns=["localhost"], ips=["127.0.0.1"]).tls
        doc = {
            **base,
            "broker": {**base["broker"], "node": m.node, "listen": f"127.0.0.1:{m.port}"},
            "tls": {"ca": str(cert.ca), "cert": str(cert.cert), "key": str(cert.key)},
        }
        m.config.write_bytes(tomli_w.dumps(doc).encode())
    urls = [m.url for m in members]
    for name, section, key in (
        ("agent.toml", "broker", "urls"),
        ("admin.toml", "admin", "brokers"),
    ):
        doc = tomllib.loads((root / name).read_text())
        doc[section][key] = urls
        (root / name).write_bytes(tomli_w.dumps(doc).encode())


def process_name(member: LabMember) -> str:
    """The lab's name for a member's process and log (``broker`` for ``b1``, as before)."""
    return "broker" if member.node == "b1" else f"broker-{member.node}"


def brokers_json(cluster: str, members: list[LabMember], pids: dict[str, int]) -> list[Any]:
    """``lab.json``'s ``brokers``."""
    return [
        {"node": m.node, "cluster": cluster, "url": m.url, "pid": pids.get(process_name(m))}
        for m in members
    ]


async def replicated(session: aiohttp.ClientSession, urls: list[str], wanted: set[Any]) -> bool:
    """Whether every ``(vm uuid, disk id)`` in ``wanted`` finished its initial copy, as the
    member that serves it (the owner) reports; a standby reports no VMs."""
    done = set()
    for url in urls:
        try:
            async with session.get(f"{url}/v1/status") as resp:
                body = await resp.json() if resp.status == 200 else {}
        except aiohttp.ClientError:
            continue
        for vm in body.get("vms", []):
            for disk in vm.get("disks", []):
                if disk.get("initial_sync") == "complete" and disk.get("applied_seq", 0) > 0:
                    done.add((vm["uuid"], disk["disk_id"]))
    return wanted <= done
