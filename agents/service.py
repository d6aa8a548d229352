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
import base64
import contextlib
import fcntl
import functools
import json
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from agents.control import (
    control_gid,
    control_socket_path,
    guard,
    open_control_socket,
    peer_of,
    refusal,
    remove_control_socket,
)
from agents.cut import Cut
from agents.dirtymap import DATA
from agents.disk import IN_USE_FIX, TrackedExport, image_in_use, in_use_message
from agents.errors import AgentError, ShipError
from agents.hooks import FreezeHooks
from agents.replicate import REFUSED_CODES, DiskReplicator
from agents.seed import ExportRequest, SeedError, cancel_seeds, export_media
from agents.ship import MAX_EXTENT, Backoff, BrokerClient, TokenBucket
from agents.state import CutClock
from certs.service import startup_problems
from common.blockhash import hash_blocks
from common.config import (
    AgentConfig,
    DiskConfig,
    Policy,
    VMConfig,
    access_problem,
    path_problem,
    writable_dir_problems,
)
from common.errors import refuse_to_start
from common.hrl import Consistency
from common.logs import get_logger
from common.nbd.backend import FileExport
from common.nbd.server import NBDServer
from common.tls import Identity, TLSError, client_context, nbd_server_context

log = get_logger("agents.service")

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def export_name(vm: VMConfig, disk: DiskConfig) -> str:
    """The NBD export name of a disk: ``disk.export`` or ``<vm>-<disk>``."""
    return disk.export or f"{vm.name}-{disk.id}"


def socket_path(config: AgentConfig, name: str) -> Path:
    """The unix socket that serves export ``name``."""
    return config.nbd.socket_dir / f"{name}.sock"


def policy_for(config: AgentConfig, vm: VMConfig) -> Policy | None:
    """The VM's policy: named, else the first whose selector matches its labels, else default.

    Returns None only for a named policy that does not exist.
    """
    if vm.policy is not None:
        return config.policies.get(vm.policy)
    for policy in config.policies.values():
        if policy.selector and all(vm.labels.get(k) == v for k, v in policy.selector.items()):
            return policy
    return config.policies.get("default", Policy())


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a tuple; raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


_PATH_FIX = "give an absolute path without '..' components (e.g. /var/lib/replikant)"


def _check_path(key: str, path: Path, problems: list[str]) -> bool:
    """Whether ``path`` is absolute and normalised; if not, one problem naming ``key``."""
    problem = path_problem(path)
    if problem is not None:
        problems.append(f"{key}: {str(path)!r} {problem}; fix: {_PATH_FIX}")
    return problem is None


def check_config(config: AgentConfig) -> list[str]:
    """Every problem that would stop the agent from working, one message each (empty: fine)."""
    problems: list[str] = []
    for label, path in (
        ("CA certificate", config.tls.ca),
        ("certificate", config.tls.cert),
        ("private key", config.tls.key),
    ):
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            problems.append(f"tls: {label} {path} is unreadable: {exc.strerror}")
    if not any(p.startswith("tls:") for p in problems):
        try:
            client_context(config.tls)
        except TLSError as exc:
            problems.append(f"tls: {exc}")
        else:
            problems += startup_problems(config.tls, Identity.agent(config.agent.host))
    for url in config.broker.urls:
        if not url.startswith("https://"):
            problems.append(f"broker.urls: {url!r} must be an https:// URL (mutual TLS)")
    if config.nbd.tcp_listen is not None:
        try:
            parse_listen(config.nbd.tcp_listen)
        except ValueError as exc:
            problems.append(f"nbd.tcp_listen: {exc}")
    if _check_path("agent.state_dir", config.agent.state_dir, problems):
        problems += writable_dir_problems(config.agent.state_dir, "agent.state_dir", mode=0o700)
    if _check_path("nbd.socket_dir", config.nbd.socket_dir, problems):
        # NBD clients (QEMU, of the agent's group) must reach the sockets inside.
        problems += writable_dir_problems(config.nbd.socket_dir, "nbd.socket_dir", mode=0o750)
    control = control_socket_path(config)
    if _check_path("agent.control_socket", control, problems) and (
        len(os.fsencode(control)) > _UNIX_PATH_MAX
    ):
        problems.append(
            f"agent.control_socket: {control} is longer than {_UNIX_PATH_MAX} bytes; "
            "fix: set a shorter control_socket"
        )
    try:
        control_gid(config)
    except AgentError as exc:
        problems.append(str(exc))

    exports: dict[str, str] = {}
    names: dict[str, int] = {}
    uuids: dict[str, int] = {}
    for i, vm in enumerate(config.vms):
        where = f"vms[{i}] ({vm.name})"
        if vm.name in names:
            problems.append(f"{where}: VM name {vm.name!r} is also used by vms[{names[vm.name]}]")
        names.setdefault(vm.name, i)
        if str(vm.uuid) in uuids:
            problems.append(f"{where}: uuid {vm.uuid} is also used by vms[{uuids[str(vm.uuid)]}]")
        uuids.setdefault(str(vm.uuid), i)
        policy = policy_for(config, vm)
        if policy is None:
            known = ", ".join(sorted(config.policies)) or "none"
            problems.append(f"{where}: unknown policy {vm.policy!r} (defined: {known})")
        else:
            problems.extend(f"{where}: {p}" for p in _check_policy(policy))
        disk_ids: set[str] = set()
        for j, disk in enumerate(vm.disks):
            dwhere = f"vms[{i}].disks[{j}] ({vm.name}/{disk.id})"
            if disk.id in disk_ids:
                problems.append(f"{dwhere}: disk id {disk.id!r} appears twice in VM {vm.name}")
            disk_ids.add(disk.id)
            name = export_name(vm, disk)
            if name in exports:
                problems.append(
                    f"{dwhere}: export name {name!r} is already used by {exports[name]}"
                )
            exports.setdefault(name, f"{vm.name}/{disk.id}")
            sock = socket_path(config, name)
            if len(os.fsencode(sock)) > _UNIX_PATH_MAX:
                problems.append(
                    f"{dwhere}: socket path {sock} is longer than {_UNIX_PATH_MAX} bytes"
                )
            if _check_path(f"vms[{i}].disks[{j}].image", disk.image, problems):
                problems.extend(f"{dwhere}: {p}" for p in _check_image(disk.image, disk.exclude))
    return problems


def _check_policy(policy: Policy) -> list[str]:
    out = []
    if (
        policy.app_consistent_every
        and policy.freeze_command is None
        and (policy.guest_agent_socket is None)
    ):
        out.append(
            "app_consistent_every is set but neither freeze_command nor "
            "guest_agent_socket says how to freeze"
        )
    if (policy.freeze_command is None) != (policy.thaw_command is None):
        out.append("freeze_command and thaw_command must be given together")
    return out


def _check_image(path: Path, exclude: bool) -> list[str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"image {path} does not exist"]
    except OSError as exc:
        return [f"image {path} cannot be examined: {exc.strerror}"]
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return [f"image {path} is neither a regular file nor a block device"]
    problem = access_problem(
        path,
        "image",
        mode=os.R_OK | os.W_OK,
        fix="`chown {user} {path}` for an image file, group `disk` for a block device",
    )
    if problem is not None:
        return [problem]
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return [f"image {path} is empty (size 0)"]
    if stat.S_ISREG(st.st_mode) and st.st_size % 512:
        return [f"image {path} size {st.st_size} is not a multiple of 512"]
    if not exclude and image_in_use(path):
        return [f"{in_use_message(path)}; fix: {IN_USE_FIX}"]
    return []


def validate(config: AgentConfig, source: str = "agent config") -> None:
    """Raise :class:`ConfigError` listing every problem of ``config``."""
    refuse_to_start(check_config(config), source=source, service="agent")


@dataclass
class VMWorker:
    """The replication loop of one VM: cut every disk at once, ship, repeat."""

    vm: VMConfig
    policy: Policy
    replicators: list[DiskReplicator]
    hooks: FreezeHooks
    cuts: CutClock
    cycles: int = 0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one cycle (or verify) at a time

    async def run(self, stop: asyncio.Event) -> None:
        """Cycle until ``stop`` is set; failures back off, the dirty map keeps collecting."""
        wlog = log.bind(vm=self.vm.name)
        interval = self.policy.interval_seconds
        due = time.monotonic()  # the first cut right away: ship what the map recovered
        while not stop.is_set():
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
            started = time.monotonic()
            unfenced = [r for r in self.replicators if r.fenced is None]
            # A refused disk (403) waits out its slow retry; the others go on.
            live = [r for r in unfenced if r.refused_until <= started]
            failed = not unfenced
            async with self.lock:  # not while a seed export or a verify holds the disks
                # All at once: in an outage every disk shows its own error at the same time,
                # instead of one after another behind each other's timeouts.
                pending = [r for r in live if not r.ready]
                results = await asyncio.gather(
                    *(r.prepare() for r in pending), return_exceptions=True
                )
                for rep, result in zip(pending, results, strict=True):
                    if not isinstance(result, BaseException):
                        continue
                    if not isinstance(result, ShipError):
                        raise result
                    if result.code in REFUSED_CODES:
                        continue  # logged as replication_refused; retried slowly
                    failed = True
                    rep.record_error(result)
                    wlog.warning(
                        "broker_unavailable",
                        disk=rep.disk.id,
                        error=result.message,
                        code=result.code,
                    )
            ready = [r for r in live if r.ready]
            if not ready:
                # Disks awaiting seed media are no failure: look at the replica next interval.
                due = time.monotonic() + self.backoff.next_delay() if failed else started + interval
                continue
            ok = await self.cycle(ready)
            if ok:
                self.backoff.reset()
                backlog = any(r.backlog for r in ready)
                due = time.monotonic() if backlog else started + interval
            else:
                due = time.monotonic() + self.backoff.next_delay()

    async def cycle(self, ready: list[DiskReplicator]) -> bool:
        """One cut of every ready disk at the same instant, then ship them all."""
        async with self.lock:
            # A seed export may have taken a disk out while this cycle waited for the lock.
            ready = [r for r in ready if r.ready and r.fenced is None]
            return await self._cycle(ready) if ready else True

    async def _cycle(self, ready: list[DiskReplicator]) -> bool:
        self.cycles += 1
        frozen = False
        if self.hooks.due(self.cycles):
            frozen = await self.hooks.freeze()
        # No await between these cuts: they are one step of the event loop, so no guest request
        # of any of the VM's disks falls between them.
        cut_id = self.next_cut_id()
        cut_time = time.time_ns()
        cuts = [(rep, rep.begin_cut(cut_time, cut_id)) for rep in ready]
        if frozen:
            await self.hooks.thaw()
        consistency = Consistency.APP if frozen else Consistency.CRASH
        results = await asyncio.gather(*(rep.ship(cut, consistency) for rep, cut in cuts))
        return all(results)

    def next_cut_id(self) -> int:
        """Take the VM's next cut id, and tell every disk (cut or not) that a cut happens.

        Synchronous: call it in the loop step of the cut itself. The id is past anything the
        broker holds for any disk, so a lost state directory cannot make ids repeat.
        """
        for rep in self.replicators:
            self.cuts.observe(rep.broker_cut_id)
        cut_id = self.cuts.next()
        for rep in self.replicators:
            rep.note_cut(cut_id)
        return cut_id

    async def verify(self) -> list[dict[str, Any]]:
        """Cut every disk now, ship the cut, and hash the disks exactly as they were at it.

        A whole-disk snapshot (copy-on-write, like a cut's) is taken in the same loop step as
        the cut, so the hashes describe the very state the shipped batch brings the replica to.
        Raises :class:`ShipError` if a disk cannot be shipped.
        """
        async with self.lock:
            for rep in self.replicators:
                if rep.fenced is not None:
                    raise ShipError(f"disk {rep.disk.id} is fenced: {rep.fenced}")
                if not rep.ready:
                    await rep.prepare()
                if rep.mode == "awaiting_seed":
                    raise ShipError(
                        f"disk {rep.disk.id} awaits its seed import and ships nothing yet",
                        fix="run `replikant seed import DIR` at the recovery site, then verify",
                        code="awaiting_seed",
                    )
            self.cycles += 1
            cut_id = self.next_cut_id()
            cut_time = time.time_ns()
            cuts = [(rep, rep.begin_cut(cut_time, cut_id)) for rep in self.replicators]
            snaps = [rep.export.begin_snapshot(cut_time) for rep in self.replicators]
            try:
                ok = await asyncio.gather(*(rep.ship(cut, Consistency.CRASH) for rep, cut in cuts))
                if not all(ok):
                    failed = [
                        r.disk.id for r, good in zip(self.replicators, ok, strict=True) if not good
                    ]
                    raise ShipError(f"the verify cut of {', '.join(failed)} was not acked")
                out = []
                for rep, snap in zip(self.replicators, snaps, strict=True):
                    hashes = await snapshot_hashes(snap, rep.export.block_size)
                    assert rep.state is not None
                    out.append(
                        {
                            "disk_id": rep.disk.id,
                            "generation": rep.state.generation,
                            "seq": rep.status.last_acked_seq,
                            "cut_id": cut_id,
                            "block_size": rep.export.block_size,
                            "disk_size": rep.export.size,
                            "hashes": base64.b64encode(hashes).decode("ascii"),
                        }
                    )
                return out
            finally:
                for rep, snap in zip(self.replicators, snaps, strict=True):
                    rep.export.end_snapshot(snap)


async def snapshot_hashes(snap: Cut, block_size: int) -> bytes:
    """The hash list (:mod:`common.blockhash`) of a whole-disk snapshot."""
    out = bytearray()
    for ext in snap.plan(max(MAX_EXTENT, block_size)):
        data = memoryview(snap.read(ext))  # atomic w.r.t. guest requests
        out += hash_blocks(data, block_size)
        await asyncio.sleep(0)
    return bytes(out)


class InitialCopyProgress:
    """A rich progress bar per disk while initial copies (or seed exports) run, when stderr is
    a terminal.

    Without a terminal the ``initial_sync_progress`` (``seed_export_progress``) log events carry
    the same information.
    """

    def __init__(self) -> None:
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def update(
        self, rep: DiskReplicator, done: int, total: int, *, what: str = "initial copy"
    ) -> None:
        """Show ``done`` of ``total`` bytes of ``what`` for ``rep``'s disk."""
        if not sys.stderr.isatty():
            return
        from rich.progress import (  # noqa: PLC0415 - only on a terminal
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if self._progress is None:
            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
        key = f"{what} {rep.vm.name}/{rep.disk.id}"
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(key, total=total)
        self._progress.update(self._tasks[key], completed=done)
        if all(t.finished for t in self._progress.tasks):
            self._progress.stop()
            self._progress = None
            self._tasks.clear()


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
        self._runner: web.AppRunner | None = None
        self._lock_fd = -1
        self.control_socket = control_socket_path(config)
        self.started_ns = time.time_ns()
        self.progress = InitialCopyProgress()
        self._seed_task: asyncio.Task[dict[str, Any]] | None = None

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
        try:
            for vm in cfg.vms:
                await self._open_vm(vm)
            if cfg.nbd.tcp_listen is not None:
                host, port = parse_listen(cfg.nbd.tcp_listen)
                tcp = NBDServer(
                    [*self.exports, *self.plain_exports],
                    tls_context=functools.partial(nbd_server_context, cfg.tls),
                    max_connections=cfg.nbd.max_connections,
                )
                await tcp.serve_tcp(host, port)
                self.servers.append(tcp)
            await self._start_control()
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

    async def _open_vm(self, vm: VMConfig) -> None:
        cfg = self.config
        policy = policy_for(cfg, vm)
        assert policy is not None  # validated
        rate = policy.bandwidth_limit_mbps * 1_000_000 / 8
        bucket = TokenBucket(rate) if rate > 0 else None
        reps: list[DiskReplicator] = []
        for disk in vm.disks:
            name = export_name(vm, disk)
            sock = socket_path(cfg, name)
            if disk.exclude:
                plain = FileExport(disk.image, name, description=f"{vm.name}/{disk.id} (excluded)")
                self.plain_exports.append(plain)
                await self._serve(plain, sock)
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
            )
            rep.on_progress = self.progress.update
            reps.append(rep)
            self.replicators.append(rep)
            await self._serve(export, sock)
        if reps:
            # Disk ids cannot start with "_", so the VM's own file never meets a disk's.
            cuts = CutClock(cfg.agent.state_dir / str(vm.uuid) / "_cuts.json")
            self.workers.append(VMWorker(vm, policy, reps, FreezeHooks(policy, vm=vm.name), cuts))

    async def _serve(self, export: TrackedExport | FileExport, sock: Path) -> None:
        server = NBDServer(
            [export],
            default_export=export.name,
            max_connections=self.config.nbd.max_connections,
            flush_threads=2,
        )
        await server.serve_unix(sock, mode=0o660)
        self.servers.append(server)

    async def _start_control(self) -> None:
        app = web.Application(middlewares=[guard])
        app.router.add_get("/v1/status", self._status)
        app.router.add_post("/v1/vms/{vm}/verify", self._verify)
        app.router.add_post("/v1/vms/{vm}/repair", self._repair)
        app.router.add_post("/v1/seed/export", self._seed_export)
        app.router.add_post("/v1/seed/cancel", self._seed_cancel)
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
        """Run the VM loops until ``stop`` is set."""
        async with asyncio.TaskGroup() as tg:
            for worker in self.workers:
                tg.create_task(worker.run(stop))

    async def stop(self, *, clean: bool = True) -> None:
        """Stop serving, then persist every map exactly (a clean stop)."""
        if self._seed_task is not None and not self._seed_task.done():
            # Abort the export first: its cut returns only the blocks pending before it.
            self._seed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._seed_task
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
            await asyncio.wait_for(asyncio.shield(runner), timeout=10.0)
        except TimeoutError:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    finally:
        await agent.stop(clean=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    sys.stderr.flush()
