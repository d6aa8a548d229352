"""`replikant lab`: a whole replication setup on one machine, in one command.

`lab up` makes a PKI with the certificate helper, starts an MQTT broker (embedded amqtt, or
Mosquitto when asked; either accepts only mutual TLS with the lab's certificates), a recovery-site
cluster of `--brokers` members on one store (default 2, `ops/labcluster.py`) and a source-site
agent with demo VMs, waits until every demo disk has finished its initial replication, and writes
`DIR/lab.json` (the contract outside scripts rely on; `brokers` lists the members). `lab down` stops
what `lab up` started and removes the directory.

The lab runs every daemon as its own process, the way they run in production, so what works in the
lab works on real hosts: it talks to them only over their real interfaces (HTTPS, NBD, MQTT).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
import tomli_w
from rich.console import Console
from rich.table import Table

from certs.store import CertStore
from common.config import TLSFiles
from common.errors import ReplikantError
from common.logs import get_logger
from common.tls import client_context
from common.tls.identities import Identity
from ops import labcluster, labsites

log = get_logger("replikant.lab")

LAB_FILE = "lab.json"
PIDS_FILE = "pids.json"
CLUSTER = "dr"
BROKER_NODE = "b1"
MQTT_NODE = "mqtt"
AGENT_HOST = "h1"
PRIMARY_SITE = "primary"
RECOVERY_SITE = "recovery"


class LabError(ReplikantError):
    """The lab could not be brought up or down."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _replikant() -> list[str]:
    """How to run our own console script from inside this interpreter's environment."""
    beside = Path(sys.executable).with_name("replikant")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("replikant")
    if found:
        return [found]
    return [sys.executable, "-c", "from common.cli import main; main()"]


@dataclass
class LabPlan:
    """Everything `lab up` decides before it starts a process."""

    root: Path
    vms: int
    disk_mib: int
    interval: float
    mqtt_kind: str
    brokers: int = 2
    mqtt_port: int = field(default_factory=_free_port)
    broker_port: int = field(default_factory=_free_port)
    primary_broker_port: int = field(default_factory=_free_port)
    members: list[labcluster.LabMember] = field(init=False)

    def __post_init__(self) -> None:
        self.members = labcluster.plan_members(self.root, self.broker_port, self.brokers)

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def mqtt_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.mqtt_port}"

    @property
    def mqtt_tls(self) -> TLSFiles:
        """The MQTT broker's own certificate (a broker identity, node ``mqtt``)."""
        return TLSFiles(
            ca=self.pki / "ca.crt",
            cert=self.pki / "brokers" / f"{CLUSTER}-{MQTT_NODE}.crt",
            key=self.pki / "brokers" / f"{CLUSTER}-{MQTT_NODE}.key",
        )

    @property
    def broker_url(self) -> str:
        return f"https://127.0.0.1:{self.broker_port}"

    @property
    def agent_control_socket(self) -> Path:
        return self.socket_dir / "control" / "agent.sock"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def store(self) -> Path:
        return self.root / "recovery" / "store"


def _tls_table(tls: TLSFiles) -> dict[str, str]:
    return {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}


def _write_toml(path: Path, doc: dict[str, Any]) -> None:
    path.write_bytes(tomli_w.dumps(doc).encode())


def _make_image(path: Path, size: int, seed: int) -> None:
    """A sparse demo disk with some content: a boot-sector-like head, text, random blocks."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        f.write(b"REPLIKANT DEMO DISK".ljust(512, b"\0"))
        text = "".join(f"line {i}: the quick brown fox\n" for i in range(4000)).encode()
        f.seek(1 << 20)
        f.write(text)
        for i in range(8):
            f.seek(min(size - (64 << 10), (i + 2) * (size // 10)) & ~0xFFFF)
            f.write(rng.randbytes(64 << 10))


def write_lab_files(plan: LabPlan) -> dict[str, Any]:
    """Create PKI, demo images and configs; return the lab description (not yet written)."""
    root = plan.root
    for sub in ("logs", "primary/images", "primary/state", "recovery", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pki = CertStore.init(plan.pki)
    broker_cert = pki.issue_broker(CLUSTER, BROKER_NODE, dns=["localhost"], ips=["127.0.0.1"])
    agent_cert = pki.issue_agent(AGENT_HOST, dns=["localhost"], ips=["127.0.0.1"])
    admin_cert = pki.issue_admin("lab")
    pki.issue_broker(CLUSTER, MQTT_NODE, dns=["localhost"], ips=["127.0.0.1"])

    vms: list[dict[str, Any]] = []
    agent_vms: list[dict[str, Any]] = []
    for n in range(plan.vms):
        name = f"demo{n + 1}"
        vm_uuid = uuid.uuid4()
        disks = []
        agent_disks = []
        for d in range(2 if n == 0 else 1):
            disk_id = f"disk{d}"
            image = root / "primary" / "images" / f"{name}-{disk_id}.img"
            _make_image(image, plan.disk_mib << 20, seed=n * 10 + d)
            export = f"{name}-{disk_id}"
            sock = plan.socket_dir / f"{export}.sock"
            agent_disks.append({"id": disk_id, "image": str(image), "export": export})
            disks.append(
                {
                    "id": disk_id,
                    "source_image": str(image),
                    "nbd_uri": f"nbd+unix:///{export}?socket={sock}",
                    "replica_image": str(plan.store / str(vm_uuid) / disk_id / "replica.img"),
                }
            )
        agent_vms.append(
            {
                "name": name,
                "uuid": str(vm_uuid),
                "policy": "lab",
                "labels": {"tier": "demo"},
                "disks": agent_disks,
            }
        )
        vms.append({"name": name, "uuid": str(vm_uuid), "primary_site": PRIMARY_SITE,
                    "disks": disks})  # fmt: skip

    _write_toml(
        root / "agent.toml",
        {
            "agent": {
                "host": AGENT_HOST,
                "site": PRIMARY_SITE,
                "state_dir": str(root / "primary" / "state"),
                "control_socket": str(plan.agent_control_socket),
            },
            "tls": _tls_table(agent_cert.tls),
            "nbd": {"socket_dir": str(plan.socket_dir)},
            "broker": {"urls": [plan.broker_url], "cluster": CLUSTER},
            "mqtt": {"url": plan.mqtt_url, "tls": True},
            "policies": {"lab": {"interval_seconds": plan.interval}},
            "vms": agent_vms,
        },
    )
    _write_toml(
        root / "broker.toml",
        {
            "broker": {
                "node": BROKER_NODE,
                "cluster": CLUSTER,
                "site": RECOVERY_SITE,
                "listen": f"127.0.0.1:{plan.broker_port}",
                "store": str(plan.store),
                "min_free_bytes": 64 << 20,
            },
            "tls": _tls_table(broker_cert.tls),
            "mqtt": {"url": plan.mqtt_url, "tls": True},
            "authorization": {"mode": "listed", "agents": [AGENT_HOST]},
            "retention": {"journal_bound": "100%"},
        },
    )
    _write_toml(
        root / "admin.toml",
        {
            "admin": {
                "brokers": [plan.broker_url],
                "agents": [str(plan.agent_control_socket)],
            },
            "tls": _tls_table(admin_cert.tls),
        },
    )
    labcluster.write_member_configs(root, plan.pki, CLUSTER, plan.members)
    return {
        "mqtt": plan.mqtt_url,
        "config": str(root / "admin.toml"),
        "broker_url": plan.broker_url,
        "agent_control_socket": str(plan.agent_control_socket),
        "pki": str(plan.pki),
        "logs": str(root / "logs"),
        "vms": vms,
    }


@dataclass
class _Proc:
    name: str
    argv: list[str]
    pid: int = 0


def _start(plan: LabPlan, name: str, argv: list[str]) -> _Proc:
    return _start_in(plan.root, name, argv)


def _start_in(root: Path, name: str, argv: list[str]) -> _Proc:
    logfile = (root / "logs" / f"{name}.log").open("ab")
    env = dict(os.environ, REPLIKANT_LAB=str(root))
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the lab outlives `lab up --detach`; `lab down` stops it
        env=env,
        cwd=root,
    )
    logfile.close()
    # Recorded at once, so `lab down` can stop what a failed `lab up` left behind.
    pids_path = root / PIDS_FILE
    pids = json.loads(pids_path.read_text()) if pids_path.exists() else []
    pids_path.write_text(json.dumps([*pids, proc.pid]))
    # debug: on a terminal the spinner and the summary say this; the log keeps it for scripts.
    log.debug("lab_process_started", process=name, pid=proc.pid)
    return _Proc(name, argv, proc.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # A zombie child of ours counts as gone.
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def _log_tail(plan_root: Path, name: str, lines: int = 15) -> str:
    path = plan_root / "logs" / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _wait_until(
    what: str, check: Callable[[], Awaitable[object]], procs: list[_Proc], root: Path, limit: float
) -> None:
    """Poll ``check`` until it answers something true; a lab process that dies ends the wait."""
    deadline = time.monotonic() + limit
    last_error = "not checked yet"
    while time.monotonic() < deadline:
        for proc in procs:
            if not _alive(proc.pid):
                raise LabError(
                    f"lab process {proc.name} (pid {proc.pid}) exited while waiting for {what}; "
                    f"last log lines:\n{_log_tail(root, proc.name)}",
                    fix=f"read {root / 'logs' / (proc.name + '.log')}",
                )
        try:
            if await check():
                return
            last_error = "not ready yet"
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.2)
    raise LabError(
        f"timed out after {limit:.0f}s waiting for {what} ({last_error})",
        fix=f"read the logs in {root / 'logs'}",
    )


def _mqtt_argv(plan: LabPlan) -> list[str]:
    """How the lab's MQTT broker runs (Mosquitto's configuration is written here)."""
    mqtt_tls = plan.mqtt_tls
    if plan.mqtt_kind == "mosquitto":
        from common.mqttbroker import mosquitto_config  # noqa: PLC0415 (amqtt)
        from ops.deploy import pki_acl  # noqa: PLC0415 (amqtt)

        acl = plan.root / "mosquitto.acl"
        # The same ACL `replikant deploy mosquitto-config` renders, for the lab's PKI.
        acl.write_text(pki_acl(plan.pki, server=Identity.broker(CLUSTER, MQTT_NODE)))
        conf = plan.root / "mosquitto.conf"
        # Mosquitto started by root switches to its own user, which cannot read the lab's
        # key: it runs as the lab's user instead.
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf.write_text(
            mosquitto_config("127.0.0.1", plan.mqtt_port, mqtt_tls, acl_file=acl, user=user)
        )
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
    tls_args = ["--ca", mqtt_tls.ca, "--cert", mqtt_tls.cert, "--key", mqtt_tls.key]
    return [*_replikant(), "lab", "mqtt", "--port", str(plan.mqtt_port), *map(str, tls_args)]


def _admin_context(root: Path) -> Any:
    admin = root / "pki" / "admins"
    return client_context(
        TLSFiles(ca=root / "pki" / "ca.crt", cert=admin / "lab.crt", key=admin / "lab.key")
    )


async def _start_daemons(
    root: Path, daemons: list[dict[str, Any]], procs: list[_Proc], limit: float
) -> None:
    """Start each daemon of a site (:mod:`ops.labsites`) and wait until it answers."""
    ssl_ctx = _admin_context(root)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=5), connector=aiohttp.TCPConnector(ssl=ssl_ctx)
    ) as session:
        for daemon in daemons:
            procs.append(_start_in(root, daemon["name"], daemon["argv"]))
            ready = daemon["ready"]

            async def answers(ready: dict[str, Any] = ready) -> bool:
                if "https" in ready:
                    async with session.get(f"{ready['https']}/v1/status") as resp:
                        return resp.status == 200
                if "unix" in ready:
                    async with (
                        aiohttp.ClientSession(
                            connector=aiohttp.UnixConnector(path=ready["unix"])
                        ) as agent,
                        agent.get("http://agent/v1/status") as resp,
                    ):
                        return resp.status == 200
                port = int(ready["tls_port"])
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx)
                writer.close()
                return True

            await _wait_until(daemon["name"], answers, procs, root, limit)


async def _bring_up(plan: LabPlan, lab: dict[str, Any], limit: float) -> list[_Proc]:
    cmd = _replikant()
    procs: list[_Proc] = []
    try:
        ssl_ctx = _admin_context(plan.root)
        procs.append(_start(plan, "mqtt", _mqtt_argv(plan)))

        async def mqtt_up() -> bool:
            # A whole mutual-TLS handshake: a bare TCP probe would be logged as a refused client.
            _, writer = await asyncio.open_connection("127.0.0.1", plan.mqtt_port, ssl=ssl_ctx)
            writer.close()
            return True

        await _wait_until("the MQTT broker", mqtt_up, procs, plan.root, limit)
        procs.append(
            _start(
                plan, "broker", [*cmd, "broker", "run", "--config", str(plan.root / "broker.toml")]
            )
        )
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx),
        ) as session:

            async def broker_up() -> bool:
                async with session.get(f"{plan.broker_url}/v1/status") as resp:
                    return resp.status == 200

            await _wait_until("the broker's HTTPS endpoint", broker_up, procs, plan.root, limit)
            for m in plan.members[1:]:  # b1 first: it stands first in the election
                argv = [*cmd, "broker", "run", "--config", str(m.config)]
                procs.append(_start(plan, labcluster.process_name(m), argv))
            procs.append(
                _start(
                    plan, "agent", [*cmd, "agent", "run", "--config", str(plan.root / "agent.toml")]
                )
            )
            wanted = {(vm["uuid"], d["id"]) for vm in lab["vms"] for d in vm["disks"]}

            async def replicated() -> bool:
                urls = [m.url for m in plan.members]
                return await labcluster.replicated(session, urls, wanted)

            await _wait_until(
                "the initial replication of every demo disk", replicated, procs, plan.root, limit
            )
        # The other half of each site: the primary site's broker (reverse replication) and the
        # recovery site's agent (serves a VM once it is promoted there).
        extra = {"broker-primary", "agent-recovery"}
        for site in (labsites.PRIMARY_SITE, labsites.RECOVERY_SITE):
            daemons = labsites.site_daemons(plan.root, site)
            await _start_daemons(
                plan.root, [d for d in daemons if d["name"] in extra], procs, limit
            )
    except BaseException:
        _stop([p.pid for p in procs])
        raise
    return procs


def _stop(pids: list[int], grace: float = 10.0) -> None:
    """Stop the lab's processes, ``pids`` in the order they started: every daemon at once, then
    the MQTT server, the first started. Each daemon's clean stop still reaches it (an owner's
    leave, an agent's last record) instead of waiting out its MQTT reconnects."""
    for tier in (pids[1:], pids[:1]):
        _stop_together(tier, grace)


def _stop_together(pids: list[int], grace: float) -> None:
    """SIGTERM each process group, then SIGKILL what is left after ``grace`` seconds."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _print_summary(console: Console, lab: dict[str, Any], root: Path) -> None:
    table = Table(title="Replikant lab: demo disks (write to nbd_uri, read replica_image)")
    for col in ("vm", "disk", "nbd_uri", "replica_image"):
        table.add_column(col, overflow="fold")
    for vm in lab["vms"]:
        for disk in vm["disks"]:
            table.add_row(vm["name"], disk["id"], disk["nbd_uri"], disk["replica_image"])
    console.print(table)
    cli = " ".join(_replikant())
    first = lab["vms"][0]["disks"][0]
    console.print(f"MQTT:        {lab['mqtt']}")
    console.print(f"Broker:      {lab['broker_url']}")
    console.print(f"Logs:        {lab['logs']}")
    console.print(f"Description: {root / LAB_FILE}")
    console.print("\nTry it:")
    console.print(f"  qemu-io -f raw -c 'write -P 0x5a 0 1M' '{first['nbd_uri']}'")
    console.print(f"  cmp -n 1048576 {first['source_image']} {first['replica_image']}")
    console.print(f"  {cli} --config {lab['config']} status")
    console.print(f"  {cli} --config {lab['config']} points {lab['vms'][0]['name']}")


@click.group("lab")
def lab() -> None:
    """A complete replication setup on this machine, for trying Replikant out."""


@lab.command("up")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--vms", default=2, show_default=True, type=click.IntRange(1, 20))
@click.option("--disk-mib", default=64, show_default=True, type=click.IntRange(8, 65536))
@click.option("--interval", default=1.0, show_default=True, help="Replication interval, seconds.")
@click.option(
    "--mqtt",
    "mqtt_kind",
    type=click.Choice(["embedded", "mosquitto"]),
    default="embedded",
    show_default=True,
)
@click.option(
    "--brokers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 9),
    help="Members of the recovery cluster (one store).",
)
@click.option("--detach", is_flag=True, help="Return once all is up; `lab down` stops it.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for readiness.")
def up(
    directory: Path,
    vms: int,
    disk_mib: int,
    interval: float,
    mqtt_kind: str,
    brokers: int,
    detach: bool,
    timeout: float,
) -> None:
    """Bring up MQTT, a recovery cluster of brokers and an agent with demo VMs whose disks
    replicate."""
    root = directory.resolve()
    if (root / PIDS_FILE).exists():
        raise LabError(
            f"a lab (or what is left of a failed `lab up`) is in {root} (found {PIDS_FILE})",
            fix=f"run `replikant lab down --dir {root}` first, or choose another --dir",
        )
    if root.exists() and any(root.iterdir()):
        raise LabError(
            f"{root} is not empty; the lab needs a directory of its own",
            fix="choose a new or empty --dir",
        )
    console = Console(stderr=True)
    plan = LabPlan(root, vms, disk_mib, interval, mqtt_kind, brokers)
    root.mkdir(parents=True, exist_ok=True)
    lab_info = write_lab_files(plan)
    labsites.add_sites(
        root,
        lab_info,
        cli=_replikant(),
        primary_broker_port=plan.primary_broker_port,
        interval=interval,
        mqtt_argv=_mqtt_argv(plan),
        members=[(labcluster.process_name(m), m.config, m.url) for m in plan.members],
    )
    try:
        with console.status("starting MQTT, broker and agent; replicating demo disks..."):
            procs = asyncio.run(_bring_up(plan, lab_info, timeout))
    except LabError as exc:
        raise LabError(
            f"{exc.message}\nthe lab's processes were stopped; its files stay in {root}",
            fix=f"read {root / 'logs'}, then `replikant lab down --dir {root}` removes it",
        ) from None
    lab_info["processes"] = {p.name: p.pid for p in procs}
    lab_info["pids"] = labsites.pids_by_site(root, lab_info["processes"])
    lab_info["brokers"] = labcluster.brokers_json(CLUSTER, plan.members, lab_info["processes"])
    (root / LAB_FILE).write_text(json.dumps(lab_info, indent=2) + "\n")
    _print_summary(console, lab_info, root)
    log.debug("lab_up", dir=str(root), vms=vms)
    if detach:
        console.print(f"\nStop it with: {' '.join(_replikant())} lab down --dir {root}")
        return
    console.print("Running; press Ctrl-C to stop and remove the lab.")
    stop = {"now": False}

    def _request_stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    while not stop["now"] and all(_alive(p.pid) for p in procs):
        time.sleep(0.5)
    _down(root, console)


def _down(root: Path, console: Console) -> None:
    pids_path = root / PIDS_FILE
    pids: list[int] = json.loads(pids_path.read_text()) if pids_path.exists() else []
    _stop(pids)
    shutil.rmtree(root, ignore_errors=True)
    console.print(f"lab in {root} stopped and removed ({len(pids)} processes)")
    log.debug("lab_down", dir=str(root), processes=len(pids))


@lab.command("down")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), required=True)
def down(directory: Path) -> None:
    """Stop everything `lab up` started in DIR and remove DIR."""
    root = directory.resolve()
    if not (root / LAB_FILE).exists() and not (root / PIDS_FILE).exists():
        raise LabError(
            f"{root} holds no lab (no {LAB_FILE})",
            fix="pass the --dir that `replikant lab up` was given",
        )
    _down(root, Console(stderr=True))


@lab.command("start")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--site", required=True, help="The site whose daemons start again.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for readiness.")
def start(directory: Path, site: str, timeout: float) -> None:
    """Start SITE's daemons again (after they were killed), from the state they left on disk."""
    root = directory.resolve()
    if not (root / LAB_FILE).exists():
        raise LabError(f"{root} holds no lab (no {LAB_FILE})", fix="pass the --dir of `lab up`")
    lab_info = json.loads((root / LAB_FILE).read_text())
    running = {n: p for n, p in lab_info.get("processes", {}).items() if _alive(p)}
    daemons = [d for d in labsites.site_daemons(root, site) if d["name"] not in running]
    procs: list[_Proc] = []
    asyncio.run(_start_daemons(root, daemons, procs, timeout))
    lab_info["processes"] = {**lab_info.get("processes", {}), **{p.name: p.pid for p in procs}}
    lab_info["pids"] = labsites.pids_by_site(root, lab_info["processes"])
    (root / LAB_FILE).write_text(json.dumps(lab_info, indent=2) + "\n")
    Console(stderr=True).print(
        f"site {site}: started {', '.join(p.name for p in procs) or 'nothing'}"
    )


@lab.command("mqtt", hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--cert", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False), required=True)
def mqtt(host: str, port: int, ca: Path, cert: Path, key: Path) -> None:
    """Run the embedded MQTT broker in the foreground (the lab's own broker): mutual TLS only,
    clients need a certificate from the CA in ``--ca``."""
    import uvloop  # noqa: PLC0415  (the event loop is chosen at the entry point only)

    from common.mqttbroker import serve_embedded  # noqa: PLC0415

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_embedded(host, port, TLSFiles(ca=ca, cert=cert, key=key)))
