"""The agent daemon: ``replikant agent run --config agent.toml``.

One process per host. For every protected disk it opens the image as a :class:`TrackedExport`,
serves it over NBD on ``<nbd.socket_dir>/<export>.sock`` (and on TCP with STARTTLS when
``nbd.tcp_listen`` is set), and runs one replication loop per VM that cuts all the VM's disks at
the same instant every policy interval and ships the batches. The control API (status, verify,
repair, seed export) is served on a unix socket only (:mod:`agents.control`): the file system
decides who may use it.

A configuration with problems is refused before anything starts, with one line per problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from agents import resync
from agents.control import (
    control_gid,
    control_socket_path,
    guard,
    open_control_socket,
    peer_of,
    refusal,
    remove_control_socket,
)
from agents.dirtymap import DATA
from agents.disk import TrackedExport
from agents.errors import AgentError, SeedError, ShipError
from agents.guests import Guests
from agents.hooks import FreezeHooks
from agents.presence import Presence
from agents.replicate import DiskReplicator
from agents.roles import RoleRecord, RoleTable, fence_reason
from agents.seed import ExportRequest
from agents.seedexport import cancel_seeds, export_media
from agents.ship import BrokerClient, TokenBucket
from agents.shiploop import ShipLoop, Uploader
from agents.startup import NBD_DEFAULT_HOST, export_name, policy_for, socket_path, validate
from agents.state import CutClock, DiskState
from agents.worker import InitialCopyProgress, VMWorker
from common.config import AgentConfig, VMConfig, parse_listen
from common.logs import get_logger
from common.nbd.backend import FileExport
from common.nbd.server import NBDServer
from common.roles import State, VMRole
from common.tasks import cancel_and_wait
from common.tls import client_context, nbd_server_context
from common.tls.identities import Identity
from common.tls.serving import Allowed

log = get_logger("agents.service")

FENCE_PROBE = 2.0  # seconds a starting agent waits for its broker's view of each VM's generation


def tcp_clients(config: AgentConfig) -> Allowed:
    """Who may open this agent's exports over ``nbd.tcp_listen``: the identities listed in
    ``nbd.tcp_clients``, by default only the agent's own (a QEMU on this host using its
    certificate). A certificate of our CA alone is not enough: brokers, admins and the agents of
    other hosts hold those too."""
    uris = config.nbd.tcp_clients or [Identity.agent(config.agent.host).uri]
    return Allowed(
        frozenset(uris),
        fix="add the client's certificate identity to nbd.tcp_clients in agent.toml, or give "
        "the client a certificate that is listed there",
    )


class Agent:
    """Everything one agent process runs."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.exports: list[TrackedExport] = []
        self.plain_exports: list[FileExport] = []
        self.servers: list[NBDServer] = []
        self.workers: list[VMWorker] = []
        self.replicators: list[DiskReplicator] = []
        self.client: BrokerClient | None = None
        self.uploader: Uploader | None = None  # batches go out on their own loop (decision 025)
        self._runner: web.AppRunner | None = None
        self._lock_fd = -1
        self.control_socket = control_socket_path(config)
        self.started_ns = time.time_ns()
        self.progress = InitialCopyProgress()
        self._seed_task: asyncio.Task[dict[str, Any]] | None = None
        self.roles = RoleTable()  # by VM uuid (agents.roles)
        self.vm_servers: dict[str, list[NBDServer]] = {}  # the unix-socket servers of each VM
        self._stops: dict[str, asyncio.Event] = {}  # each running worker's own stop
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        # The guests' drivers start a VM only where its role here lets it run (FENCED: never).
        self.guests = Guests(config, role_of=self.vm_role)
        self.pending: dict[str, str] = {}  # VMs with a failover command in progress here
        self.presence: Presence | None = None
        self._presence_task: asyncio.Task[None] | None = None

    def _lock(self) -> None:
        self.config.agent.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.nbd.socket_dir.mkdir(parents=True, exist_ok=True)
        path = self.config.agent.state_dir / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentError(
                f"another agent is running with state_dir {self.config.agent.state_dir}",
                fix="stop it first (systemctl stop replikant-agent) or use another state_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def start(self) -> None:
        """Open every disk, serve the exports, start the status endpoint (not the loops)."""
        cfg = self.config
        self._lock()
        self.client = BrokerClient(
            cfg.broker.urls, client_context(cfg.tls), cluster=cfg.broker.cluster
        )
        self.uploader = Uploader(ShipLoop(cfg.agent.shipping_nice), self.client.twin(), cfg.tls)
        self.uploader.prestart()
        try:
            for vm in cfg.vms:
                self.roles[str(vm.uuid)] = RoleRecord.load(cfg.agent.state_dir, vm)
            # Before serving a single write: was a VM failed over while this agent was down?
            await asyncio.gather(*(self._learn_generation(vm) for vm in cfg.vms))
            for vm in cfg.vms:
                if self.roles[str(vm.uuid)].role != "REPLICA":
                    await self._open_vm(vm)
            if cfg.nbd.tcp_listen is not None:
                host, port = parse_listen(cfg.nbd.tcp_listen, default_host=NBD_DEFAULT_HOST)
                tcp = NBDServer(
                    [*self.exports, *self.plain_exports],
                    tls_context=functools.partial(nbd_server_context, cfg.tls),
                    max_connections=cfg.nbd.max_connections,
                    allowed_identities=tcp_clients(cfg),
                )
                await tcp.serve_tcp(host, port)
                self.servers.append(tcp)
            await self._start_control()
            if cfg.mqtt.url:
                self._start_presence()
        except BaseException:
            await self.stop(clean=True)
            raise
        log.info(
            "agent_started",
            host=cfg.agent.host,
            vms=len(cfg.vms),
            disks=len(self.exports),
            control_socket=str(self.control_socket),
            pid=os.getpid(),
        )

    def _start_presence(self) -> None:
        self.presence = Presence(
            self.config, status=self.status, roles=self.roles, follower=self.client
        )
        self._presence_task = asyncio.get_running_loop().create_task(self.presence.run())

    async def _stop_presence(self) -> None:
        if self.presence is None or self._presence_task is None:
            return
        if self.presence.link.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.presence.leave()
        await cancel_and_wait([self._presence_task])
        self._presence_task = None

    async def _open_vm(self, vm: VMConfig) -> None:
        cfg = self.config
        policy = policy_for(cfg, vm)
        assert policy is not None  # validated
        rate = policy.bandwidth_limit_mbps * 1_000_000 / 8
        bucket = TokenBucket(rate) if rate > 0 else None
        reps: list[DiskReplicator] = []
        role = self.roles[str(vm.uuid)]
        for disk in vm.disks:
            name = export_name(vm, disk)
            sock = socket_path(cfg, name)
            if disk.exclude:
                plain = FileExport(disk.image, name, description=f"{vm.name}/{disk.id} (excluded)")
                self.plain_exports.append(plain)
                await self._serve(plain, sock, vm)
                log.info("disk_excluded", vm=vm.name, disk=disk.id, export=name)
                continue
            base = cfg.agent.state_dir / str(vm.uuid)
            export = TrackedExport(
                disk.image,
                name,
                block_size=policy.block_size,
                map_path=base / f"{disk.id}.map",
                spill_path=base / f"{disk.id}.cow",
                description=f"{vm.name}/{disk.id}",
                sync_marks=cfg.agent.sync_marks,
            )
            self.exports.append(export)
            recovery = export.open()
            log.info(
                "disk_opened",
                vm=vm.name,
                disk=disk.id,
                export=name,
                size=export.size,
                fresh=recovery.fresh,
                clean=recovery.clean,
                recovered_dirty_bytes=export.map.dirty_bytes,
                tracking_lost=recovery.tracking_lost,
            )
            assert self.client is not None
            rep = DiskReplicator(
                vm=vm,
                disk=disk,
                export=export,
                policy=policy,
                client=self.client,
                state_path=base / f"{disk.id}.json",
                recovery=recovery,
                site=cfg.agent.site,
                host=cfg.agent.host,
                bucket=bucket,
                uploader=self.uploader,
            )
            rep.on_progress = self.progress.update
            rep.on_fenced = self._on_fenced
            if role.role == "FENCED":
                export.fenced = rep.fenced = fence_reason(vm.name, role.reason)
            reps.append(rep)
            self.replicators.append(rep)
            await self._serve(export, sock, vm)
        if reps and role.role == "PRIMARY":
            # Disk ids cannot start with "_", so the VM's own file never meets a disk's.
            cuts = CutClock(cfg.agent.state_dir / str(vm.uuid) / "_cuts.json")
            pace = self.uploader.ship if self.uploader is not None else None
            worker = VMWorker(vm, policy, reps, FreezeHooks(policy, vm=vm.name), cuts, pace=pace)
            self.workers.append(worker)
            if role.replicating and self._running:
                self._launch(worker)

    async def _learn_generation(self, vm: VMConfig) -> None:
        """Fence a PRIMARY VM whose replica moved to a newer generation while we were down.

        Asked once at start, briefly: a broker that does not answer within ``FENCE_PROBE``
        seconds leaves the VM serving (the replication loop learns it on its first answer)."""
        key = str(vm.uuid)
        disk = next((d for d in vm.disks if not d.exclude), None)
        if self.roles[key].role != "PRIMARY" or disk is None or self.client is None:
            return
        local = DiskState.load(self.config.agent.state_dir / key / f"{disk.id}.json")
        if local is None:
            return
        try:
            async with asyncio.timeout(FENCE_PROBE):
                rs = await self.client.state(vm.uuid, disk.id)
        except (ShipError, TimeoutError, OSError):
            return
        if rs.generation > local.generation:
            self._fence_vm(
                vm,
                f"the replica is at generation {rs.generation}, this disk at "
                f"{local.generation}: the VM was failed over",
            )

    def vm_role(self, vm: VMConfig) -> VMRole:
        """The VM's role here as the state machine of :mod:`common.roles` names it."""
        record = self.roles.get(str(vm.uuid)) or RoleRecord.load(self.config.agent.state_dir, vm)
        return VMRole(vm.name, self.config.agent.site, State(record.role), record.generation)

    def _launch(self, worker: VMWorker) -> None:
        """Run ``worker``'s loop until the agent stops or the VM leaves this site."""
        key = str(worker.vm.uuid)
        if key in self._tasks or not self.roles[key].replicating:
            return
        self._stops[key] = asyncio.Event()
        self._tasks[key] = asyncio.create_task(worker.run(self._stops[key]))

    def _on_fenced(self, rep: DiskReplicator, reason: str, code: str) -> None:
        """The broker answers for a newer generation: fence every disk of the VM, for good."""
        if code != "stale_generation":
            return  # an identity refusal: the operator fixes the configuration, no failover
        self._fence_vm(rep.vm, reason)

    def _fence_vm(self, vm: VMConfig, reason: str) -> None:
        """Persist FENCED for ``vm`` and make every export of it refuse writes from now on."""
        key = str(vm.uuid)
        role = self.roles[key]
        if role.role == "FENCED":
            return
        self.roles[key] = RoleRecord("FENCED", role.generation, reason, replicating=False)
        self.roles[key].save(self.config.agent.state_dir, vm)
        message = fence_reason(vm.name, reason)
        for other in self.replicators:
            if other.vm.uuid == vm.uuid:
                other.fenced = other.export.fenced = message
        log.error("vm_fenced", vm=vm.name, reason=reason, fix=f"replikant reverse {vm.name}")

    async def _serve(self, export: TrackedExport | FileExport, sock: Path, vm: VMConfig) -> None:
        server = NBDServer(
            [export],
            default_export=export.name,
            max_connections=self.config.nbd.max_connections,
            flush_threads=2,
        )
        await server.serve_unix(sock, mode=0o660)
        self.servers.append(server)
        self.vm_servers.setdefault(str(vm.uuid), []).append(server)

    async def _start_control(self) -> None:
        app = web.Application(middlewares=[guard])
        app.router.add_get("/v1/status", self._status)
        app.router.add_post("/v1/vms/{vm}/verify", self._verify)
        app.router.add_post("/v1/vms/{vm}/repair", self._repair)
        app.router.add_post("/v1/seed/export", self._seed_export)
        app.router.add_post("/v1/seed/cancel", self._seed_cancel)
        app.router.add_post("/v1/vms/{vm}/role", self._role)
        self.guests.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = open_control_socket(self.control_socket, control_gid(self.config))
        await web.SockSite(self._runner, sock).start()

    def status(self) -> dict[str, Any]:
        """The whole status document."""
        return {
            "host": self.config.agent.host,
            "site": self.config.agent.site,
            "pid": os.getpid(),
            "uptime_seconds": round((time.time_ns() - self.started_ns) / 1e9, 1),
            "broker": self.client.url if self.client else None,
            "disks": [rep.snapshot() for rep in self.replicators],
            "vms": [
                {"name": vm.name, "uuid": str(vm.uuid), **asdict(self.roles[str(vm.uuid)])}
                for vm in self.config.vms
            ],
            "excluded": [e.name for e in self.plain_exports],
        }

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def _worker(self, request: web.Request) -> VMWorker:
        key = request.match_info["vm"]
        for worker in self.workers:
            if key in (worker.vm.name, str(worker.vm.uuid)):
                return worker
        raise web.HTTPNotFound(
            text=json.dumps(
                {
                    "error": "unknown_vm",
                    "message": f"no protected VM {key!r} here",
                    "fix": "`replikant agent status` lists the VMs this agent protects",
                    "details": {"vm": key},
                }
            ),
            content_type="application/json",
        )

    async def _close_vm(self, vm: VMConfig) -> None:
        """Stop the VM's loop, stop serving its disks and close them: the images are free."""
        key = str(vm.uuid)
        if key in self._tasks:
            self._stops.pop(key).set()
            await self._tasks.pop(key)
        for server in self.vm_servers.pop(key, []):
            await server.close()
            self.servers.remove(server)
        for rep in [r for r in self.replicators if r.vm.uuid == vm.uuid]:
            self.replicators.remove(rep)
            self.exports.remove(rep.export)
            rep.export.close(clean=True)
        self.workers = [w for w in self.workers if w.vm.uuid != vm.uuid]

    async def change_role(
        self, vm: VMConfig, act: str, generation: int, body: dict[str, Any] | None = None
    ) -> RoleRecord:
        """One failover act on ``vm`` at this site (see ``POST /v1/vms/{vm}/role``; ``body``:
        the request's, with a promotion's point and the regions it rolled back)."""
        extra = body or {}
        point, rolled = str(extra.get("point", "latest"))[:64], extra.get("rolled_back")
        key, state_dir = str(vm.uuid), self.config.agent.state_dir
        now = self.roles[key]
        if act == "begin":
            # One failover command of a VM at a time: a second one is refused, not raced.
            if key in self.pending:
                raise AgentError(
                    f"vm {vm.name} is {now.role} at site {self.config.agent.site}: a failover "
                    f"command on it is already in progress here ({self.pending[key]})",
                    fix="wait for it to finish (or fail), then look at `replikant status`",
                )
            self.pending[key] = f"since {time.strftime('%H:%M:%S')}"
            return now
        if act == "end":
            self.pending.pop(key, None)
            return now
        legal = {
            "promote": ("REPLICA",),
            "replicate": ("PRIMARY",),
            "quiesce": ("PRIMARY",),
            "resume": ("PRIMARY", "FENCED"),
            "demote": ("PRIMARY", "FENCED"),
        }[act]
        if now.role not in legal:
            raise AgentError(
                f"vm {vm.name} is {now.role} at site {self.config.agent.site} (generation "
                f"{now.generation}): `{act}` needs it {' or '.join(legal)}",
                fix="`replikant status` shows the VM's roles; `replikant failover` and "
                "`replikant reverse` change them",
            )
        if act == "quiesce":
            for rep in self.replicators:
                if rep.vm.uuid == vm.uuid:
                    rep.export.fenced = (
                        "it is being failed over (planned); `replikant "
                        f"failover cancel {vm.name}` gives it back"
                    )
            return now
        if act in ("resume", "demote"):
            await self._close_vm(vm)
        if act == "promote" or (act == "resume" and generation > now.generation):
            for disk in vm.disks:
                # The image is this disk at the new generation: replication state, change map
                # and any earlier reverse's regions start over (decisions 041, 042).
                fresh = DiskState(str(vm.uuid), disk.id, disk.image.stat().st_size, generation)
                fresh.save(state_dir / key / f"{disk.id}.json")
                resync.promoted(state_dir / key, disk.id, point, rolled)
        role = {
            "promote": RoleRecord("PRIMARY", generation, replicating=False),
            "replicate": RoleRecord("PRIMARY", now.generation, replicating=True),
            "resume": RoleRecord("PRIMARY", max(generation, now.generation)),
            "demote": RoleRecord("REPLICA", max(generation, now.generation)),
        }[act]
        role.save(state_dir, vm)
        self.roles[key] = role
        if act in ("promote", "resume"):
            await self._open_vm(vm)
            for rep in (r for r in self.replicators if r.vm.uuid == vm.uuid and act == "promote"):
                resync.mark_rolled_back(rep.export, rep.disk.id, rolled)
        elif act == "replicate":
            for worker in self.workers:
                if worker.vm.uuid == vm.uuid:
                    self._launch(worker)
        log.warning(
            "vm_role_changed", vm=vm.name, act=act, role=role.role, generation=role.generation
        )
        return role

    async def _role(self, request: web.Request) -> web.Response:
        """POST /v1/vms/{vm}/role {"act": A, "generation": N}: begin | end (a failover command's
        marker) | promote | replicate | quiesce | resume | demote this site's copy of the VM (the
        failover commands' steps)."""
        worker_vm = next(
            (v for v in self.config.vms if request.match_info["vm"] in (v.name, str(v.uuid))),
            None,
        )
        if worker_vm is None:
            self._worker(request)  # the unknown_vm refusal
            raise AssertionError("unreachable")
        try:
            body = await request.json()
            act, generation = str(body["act"]), int(body.get("generation", 0))
            if act not in ("begin", "end", "promote", "replicate", "quiesce", "resume", "demote"):
                raise ValueError(act)
        except (ValueError, KeyError, TypeError):
            return refusal(
                400,
                "bad_request",
                'expected {"act": "begin|end|promote|replicate|quiesce|resume|demote", '
                '"generation": N}',
                "send one of the acts",
            )
        base = self.config.agent.state_dir / str(worker_vm.uuid)
        maps = {  # the old primary's change maps, read while its exports are still open
            r.disk.id: resync.old_primary_regions(r.export, r.recovery, r.state)
            for r in self.replicators
            if act == "demote" and r.vm.uuid == worker_vm.uuid
        }
        try:
            if act == "replicate" and "disks" in body:
                resync.save_hints(base, [d.id for d in worker_vm.disks], body["disks"])
            role = await self.change_role(worker_vm, act, generation, body)
        except (ValueError, TypeError, AttributeError) as exc:
            return refusal(400, "bad_request", f"bad change maps: {exc}", "send [[offset, length]]")
        except AgentError as exc:
            log.warning("role_change_refused", vm=worker_vm.name, act=act, error=exc.message)
            return refusal(409, "wrong_role", exc.message, exc.fix or "", vm=worker_vm.name)
        except OSError as exc:
            return refusal(500, "role_change_failed", str(exc), "see the agent's log")
        exports = [
            {
                "disk_id": d.id,
                "image": str(d.image),
                "socket": str(socket_path(self.config, export_name(worker_vm, d))),
                **({"change_map": maps[d.id]} if d.id in maps else {}),
            }
            for d in worker_vm.disks
        ]
        return web.json_response({"vm": worker_vm.name, **asdict(role), "disks": exports})

    async def _verify(self, request: web.Request) -> web.Response:
        worker = self._worker(request)
        try:
            disks = await worker.verify()
        except ShipError as exc:
            fix = exc.fix or "see `replikant agent status` and the agent's log"
            return refusal(503, "verify_failed", str(exc), fix, vm=worker.vm.name)
        log.info("verify_cut_shipped", vm=worker.vm.name, seqs=[d["seq"] for d in disks])
        return web.json_response(
            {"vm": worker.vm.name, "vm_uuid": str(worker.vm.uuid), "disks": disks}
        )

    async def _repair(self, request: web.Request) -> web.Response:
        """Mark ranges dirty so that the next cycle ships them again (``verify --repair``)."""
        worker = self._worker(request)
        try:
            body = await request.json()
            wanted = {str(d["disk_id"]): d["ranges"] for d in body["disks"]}
        except (ValueError, KeyError, TypeError):
            return refusal(
                400,
                "bad_request",
                "expected {disks: [{disk_id, ranges}]}",
                'send {"disks": [{"disk_id": ID, "ranges": [[offset, length], ...]}]}',
            )
        reps = {rep.disk.id: rep for rep in worker.replicators}
        unknown = sorted(set(wanted) - set(reps))
        if unknown:
            return refusal(
                404,
                "unknown_disk",
                f"VM {worker.vm.name} has no disk {unknown}",
                "`replikant agent status` lists the VM's disks",
                disks=unknown,
            )
        marked = 0
        for disk_id, ranges in wanted.items():
            export = reps[disk_id].export
            for offset, length in ranges:
                if not (int(offset) >= 0 and 0 < int(length) <= export.size - int(offset)):
                    return refusal(
                        400,
                        "bad_request",
                        f"range {offset}+{length} is outside disk {disk_id}",
                        f"give ranges within the disk's {export.size} bytes",
                    )
                export.map.mark(int(offset), int(length), DATA)
                marked += int(length)
        log.info("repair_marked", vm=worker.vm.name, bytes=marked)
        return web.json_response({"vm": worker.vm.name, "marked_bytes": marked})

    async def _seed_export(self, request: web.Request) -> web.Response:
        """Write VMs to offline seed media (``agents.seed``); one export at a time."""
        peer = peer_of(request)
        who = peer.fields() if peer is not None else {}
        try:
            req = ExportRequest.from_json(await request.json())
            # An export pauses the VMs' network replication until its import: say who asked.
            log.warning(
                "seed_export_requested",
                dir=str(req.directory),
                vms=list(req.vms),
                selector=req.selector,
                force=req.force,
                resume=req.resume,
                dry_run=req.dry_run,
                pauses_replication=not req.dry_run,
                **who,
            )
            if self._seed_task is not None and not self._seed_task.done():
                raise SeedError(
                    "another seed export is running on this agent",
                    code="export_in_progress",
                    fix="wait for it to finish (replikant agent status shows its progress)",
                )
            self._seed_task = asyncio.create_task(
                export_media(
                    self.workers,
                    req,
                    host=self.config.agent.host,
                    site=self.config.agent.site,
                    progress=functools.partial(self.progress.update, what="seed export"),
                    peer_uid=peer.uid if peer is not None else None,
                )
            )
            return web.json_response(await self._seed_task)
        except ValueError:
            return refusal(400, "bad_request", "the request body is not JSON", "send a JSON object")
        except SeedError as exc:
            log.warning("seed_export_refused", code=exc.code, error=exc.message, **who)
            return web.json_response(exc.body(), status=exc.status)
        except (AgentError, OSError) as exc:
            log.error("seed_export_failed", error=str(exc), **who)
            return refusal(500, "export_failed", str(exc), "see the agent's log")

    async def _seed_cancel(self, request: web.Request) -> web.Response:
        """Stop waiting for the import of the named VMs' last export (the media was lost)."""
        try:
            body = await request.json()
            names = tuple(str(v) for v in body["vms"])
            return web.json_response(await cancel_seeds(self.workers, names))
        except (ValueError, KeyError, TypeError):
            return refusal(400, "bad_request", 'expected {"vms": [names]}', "name the VMs")
        except SeedError as exc:
            return web.json_response(exc.body(), status=exc.status)

    async def run(self, stop: asyncio.Event) -> None:
        """Run the VM loops until ``stop`` is set (VMs promoted meanwhile join them)."""
        self._running = True
        for worker in self.workers:
            self._launch(worker)
        await stop.wait()
        self._running = False
        for event in self._stops.values():
            event.set()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._stops.clear()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    async def stop(self, *, clean: bool = True) -> None:
        """Stop serving, then persist every map exactly (a clean stop)."""
        if self._seed_task is not None and not self._seed_task.done():
            # Abort the export first: its cut returns only the blocks pending before it.
            self._seed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._seed_task
        await self._stop_presence()
        for server in self.servers:
            await server.close()
        self.servers.clear()
        for export in self.exports:
            try:
                export.close(clean=clean)
            except (OSError, AgentError) as exc:
                log.error("disk_close_failed", export=export.name, error=str(exc))
        self.exports.clear()
        for plain in self.plain_exports:
            plain.flush()
            plain.close()
        self.plain_exports.clear()
        if self.client is not None:
            await self.client.close()
        if self.uploader is not None:
            await self.uploader.close()
            self.uploader = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            remove_control_socket(self.control_socket)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        log.info("agent_stopped", clean=clean)


async def run_agent(config: AgentConfig, *, source: str = "agent config") -> None:
    """Validate, start, run until SIGTERM/SIGINT, stop cleanly."""
    # Whatever the agent creates without an explicit mode stays its own: copies of a disk and
    # its change maps are as secret as the disk.
    os.umask(0o077)
    validate(config, source)
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        runner = asyncio.create_task(agent.run(stop))
        await stop.wait()
        log.info("agent_stopping")
        try:
            # Let a batch in flight finish (it may just be waiting for its ack).
            async with asyncio.timeout(10.0):
                await asyncio.shield(runner)
        except TimeoutError:
            await cancel_and_wait([runner])
    finally:
        await agent.stop(clean=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    sys.stderr.flush()
