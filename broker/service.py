"""One broker process: store + HTTPS ingest + appliers + retention + point-in-time NBD exports.

``replikant broker run --config broker.toml`` builds a :class:`BrokerService` and runs it until
SIGTERM/SIGINT, then stops gracefully: no new connections, uploads in flight finish within
:data:`HANDLER_GRACE` or are dropped (never acked), each applier finishes the batch it is
applying, exports are removed; past :data:`STOP_DEADLINE` it dumps its stacks and exits 1.

The owner epoch (invariant 7): a broker without MQTT claims ``max(stored) + 1`` at start-up and
owns its store. With MQTT it is a cluster member (:mod:`broker.cluster`, decision 031): it serves
only once elected (:meth:`BrokerService.begin_owning`), and stops when it steps down; every
journal and apply is checked against the store's fence with :attr:`BrokerService.epoch`.

Alerts: :meth:`add_alert_hook` registers a callback ``(event, fields)`` fired when a condition
is raised or cleared (storage full, apply failure, fenced); the MQTT layer publishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from broker.app import build_app
from broker.apply import AlertHook, Condition, ReplicaEngine
from broker.cluster import ClusterMember
from broker.colocation import colocation_problems
from broker.errors import (
    BrokerError,
    IdentityConflict,
    NotOwner,
    StaleGeneration,
    StorageFullError,
)
from broker.exports import EXPORT_AGAIN, Exports, StepDownGuard
from broker.fence import T
from broker.hashes import block_hashes
from broker.httperrors import HTTP_LOG
from broker.membership import Membership
from broker.pitexport import prepare_socket_dir, socket_path
from broker.points import Key
from broker.retention import Retainer, free_store_space, publish
from broker.scaleout import ScaleOut
from broker.space import StoreSpace
from broker.store import Replica, Store
from broker.storemodes import tighten_permissions
from broker.testcopies import TestCopies
from broker.views import vm_site_records
from certs.service import startup_problems
from common import topics
from common.config import BrokerConfig, parse_listen, writable_dir_problems
from common.errors import refuse_to_start
from common.fsio import atomic_write_json
from common.hrl import DEFAULT_LIMITS, DecodeLimits
from common.logs import get_logger
from common.mqtt import MQTTLink
from common.nbd.server import NBDServer
from common.stacks import arm_stop_deadline
from common.tasks import cancel_and_wait
from common.tls import Identity, MutualTLSSite, server_context

_log = get_logger("broker.service")

RETENTION_INTERVAL: Final = 30.0
PRESSURE_PASS_INTERVAL: Final = 2.0
"""Seconds between retention passes while some disk's points fill most of its bound."""
READ_BUFSIZE: Final = 4 * 1024 * 1024
HANDLER_GRACE: Final = 5.0
"""Seconds a stopping broker lets requests in flight finish before it cancels them: an upload
cut short is never acked and the agent sends it again; a long-polling wait (hashes at a point
not yet applied) would otherwise hold the stop for up to two minutes."""
STOP_DEADLINE: Final = 25.0
"""Seconds after SIGTERM by which the broker has stopped, or dumps its stacks and exits 1."""


def check_config(config: BrokerConfig) -> list[str]:
    """Every problem that would stop the broker from working, one line each (empty: fine)."""
    b = config.broker
    problems = startup_problems(config.tls, Identity.broker(b.cluster, b.node))
    # Refused before touching anything: nothing is created here.
    problems += writable_dir_problems(b.store, "broker.store", create=False)
    if config.nbd_socket_dir is not None:
        problems += writable_dir_problems(config.nbd_socket_dir, "nbd_socket_dir", create=False)
    return problems + colocation_problems(config)


def validate(config: BrokerConfig, source: str = "broker config") -> None:
    """Raise :class:`ConfigError` listing every problem of ``config``."""
    refuse_to_start(check_config(config), source=source, service="broker")


class BrokerService:
    """The broker's live state, shared by the HTTP handlers, the appliers and the CLI."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        limits: DecodeLimits = DEFAULT_LIMITS,
        retention_interval: float = RETENTION_INTERVAL,
    ) -> None:
        self.config = config
        self.limits = limits
        self.retention_interval = retention_interval
        self.retainer = Retainer(config)
        b = config.broker
        clustered = config.mqtt.url is not None
        # Members share the store: what is one broker's own is kept apart by node name.
        overlays = b.store / ".overlays" / b.node if clustered else None
        self.store = Store(b.store, overlays=overlays, load=False)
        self.space = StoreSpace(self.store.root, config.broker.min_free_bytes)
        self.epoch = 0
        self.engines: dict[tuple[str, str], ReplicaEngine] = {}
        self.conditions: dict[str, Condition] = {}
        self._hooks: list[AlertHook] = []
        self.test_copies = TestCopies(config.broker.site)
        self.nbd = NBDServer(max_connections=100)
        nbd_dir = b.store / (f".nbd-{b.node}" if clustered else ".nbd")
        self.nbd_socket = socket_path((config.nbd_socket_dir or nbd_dir) / "pit.sock")
        self.exports = Exports(self.nbd, self.nbd_socket, self.store.overlay_dir)
        self._kept: tuple[int, set[str]] = (0, set())
        """(epoch, VMs): exported VMs kept through a step-down at that epoch (decision 043)."""
        self._runner: web.AppRunner | None = None
        self._site: MutualTLSSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()  # engines closing once their upload ends
        self.url = ""
        self.started_ns = time.time_ns()
        self.membership: Membership | None = None
        self.cluster: ClusterMember | None = None
        self.scaleout: ScaleOut | None = None
        self.serving = False
        """Owner with the store loaded: journals replayed, appliers running, agents accepted."""
        self.taking_over: set[str] = set()
        """VMs (uuids) whose replicas a deposed owner is still writing: refused until loaded."""

    # -- lifecycle
    async def start(self) -> None:
        """Claim the epoch and replay journals (alone; a cluster member waits to be elected),
        listen for HTTPS and NBD."""
        files, dirs = await asyncio.to_thread(
            tighten_permissions, self.store.root, skip=self.nbd_socket.parent
        )
        if files or dirs:
            _log.warning(
                "store_permissions_tightened", store=str(self.store.root), files=files, dirs=dirs
            )
        if not self.config.mqtt.url:
            epoch = await asyncio.to_thread(self.store.claim_next_epoch, self.config.broker.node)
            await self.begin_owning(epoch)
        gid = prepare_socket_dir(self.nbd_socket.parent, self.config.nbd_socket_group)
        await self.nbd.serve_unix(self.nbd_socket, mode=0o660)
        if os.lstat(self.nbd_socket).st_gid != gid:  # chown only if needed (see there)
            os.chown(self.nbd_socket, -1, gid, follow_symlinks=False)
        app = build_app(self)
        # A deep read buffer (aiohttp pauses the socket at 2x read_bufsize): the network keeps
        # receiving while a worker thread decodes and writes the previous megabytes.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            read_bufsize=READ_BUFSIZE,
            logger=HTTP_LOG,
            shutdown_timeout=HANDLER_GRACE,
        )
        await self._runner.setup()
        host, port = parse_listen(self.config.broker.listen, default_host="0.0.0.0")
        self._site = MutualTLSSite(self._runner, host, port, server_context(self.config.tls))
        await self._site.start()
        self.url = f"https://{host}:{self._site.port}"
        self._tasks.append(asyncio.get_running_loop().create_task(self._retention_loop()))
        if self.config.mqtt.url:
            self._start_membership(self.config.mqtt.url)
        self._write_run_file()
        _log.info(
            "broker_started",
            url=self.url,
            node=self.config.broker.node,
            cluster=self.config.broker.cluster,
            epoch=self.epoch,
            store=str(self.store.root),
            replicas=len(self.engines),
            nbd_socket=str(self.nbd_socket),
        )

    def _write_run_file(self) -> None:
        """``.run/<node>.json`` for this broker, and ``.run/broker.json`` while it serves (the
        store's owner: what :func:`load_run_file` reads)."""
        if not self.url:
            return
        run = self.store.root / ".run"
        run.mkdir(mode=0o700, exist_ok=True)
        doc = {
            "pid": os.getpid(),
            "url": self.url,
            "epoch": self.epoch,
            "node": self.config.broker.node,
            "nbd_socket": str(self.nbd_socket),
            "serving": self.serving,
        }
        atomic_write_json(run / f"{self.config.broker.node}.json", doc)
        if self.serving:
            atomic_write_json(run / "broker.json", doc)

    @property
    def advertised_url(self) -> str:
        """Where other members send agents to reach this broker."""
        return self.config.broker.url or self.url

    async def begin_owning(self, epoch: int) -> None:
        """Own the store under ``epoch`` (claimed already): reload it (waiting out a deposed
        owner's write in progress), replay every journal and accept agents. The exported VMs
        kept through a step-down resume if no other broker claimed the store meanwhile, and
        end otherwise (decision 043)."""
        kept_epoch, kept = self._kept
        node = self.config.broker.node
        if kept and not await asyncio.to_thread(self.store.owned_since, kept_epoch, node):
            await self._let_go(kept, f"another broker owned the store after epoch {kept_epoch}")
            kept = set()
        self.epoch = epoch
        busy = await asyncio.to_thread(self.store.load, wait=not self.config.mqtt.url)
        for replica in self.store.replicas():
            if not self.store.holds_vm(replica.meta.vm_uuid):  # placed here: runs already
                self.engine_for(replica)
        for vm in kept:
            self.store.hold_vm(vm, hold=False)  # the owner's again
        for engine in [e for k, e in self.engines.items() if k[0] in kept]:
            engine.start()
        self.taking_over = {d.parent.name for d in busy}
        self.serving, self._kept = True, (0, set())
        self._write_run_file()
        _log.info("owner_serving", epoch=epoch, replicas=len(self.engines), waiting=len(busy))
        if busy:
            self._tasks.append(asyncio.get_running_loop().create_task(self._take_over(busy)))

    async def _take_over(self, busy: list[Path]) -> None:
        """Load the replicas a deposed owner was still writing once it is done (resumed and
        refused by the fence, or killed); the others are served meanwhile."""
        epoch = self.epoch
        while busy and self.serving and self.epoch == epoch:
            await asyncio.sleep(0.2)
            for disk_dir in list(busy):
                replica = await asyncio.to_thread(self.store.load_replica, disk_dir)
                if replica is not None and self.serving and self.epoch == epoch:
                    busy.remove(disk_dir)
                    self.engine_for(replica)
                    _log.info("takeover_replica_loaded", replica=replica.label, epoch=epoch)
            self.taking_over = {d.parent.name for d in busy}

    async def end_owning(self, *, leaving: bool = False) -> None:
        """Stop serving: appliers finish the batch in hand; a straggler is refused by the
        store's fence once another member claims. VMs placed here run on under their own
        token, exports too (decision 032); the appliers of exported VMs pause and their
        exports go on, guarded (decision 043). A ``leaving`` broker lets everything go."""
        held = self.store.holds_vm
        exported = set() if leaving else {v for v in self.exports.vms() if not held(v)}
        stop = {k for k in self.engines if leaving or not (held(k[0]) or k[0] in exported)}
        engines = [self.engines.pop(k) for k in stop]
        was, self.serving, self.taking_over = self.serving or bool(engines), False, set()
        if leaving:
            self._kept = (0, set())
            for name in self.exports.names_of(self.exports.vms()):
                await self.remove_export(name)
        paused = [e for k, e in self.engines.items() if k[0] in exported]
        await asyncio.gather(*(e.stop() for e in [*engines, *paused]))
        if exported:
            for vm in exported:
                self.store.hold_vm(vm)
            self._kept = (self.epoch, self._kept[1] | exported)
            _log.warning("pit_exports_kept", epoch=self.epoch, vms=sorted(exported))
        for engine in engines:
            if not engine.ingest_lock.locked():
                await engine.close_when_idle()  # at once: the lock is free
                continue
            # An upload in flight still uses the descriptors: they close when it ends, and the
            # step-down (or the next election) does not wait for it.
            _log.warning("engine_close_deferred", replica=engine.replica.label)
            task = asyncio.get_running_loop().create_task(engine.close_when_idle())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self.store.forget(held=leaving)
        self._write_run_file()
        if was:
            _log.info("owner_stopped_serving", epoch=self.epoch, node=self.config.broker.node)

    def kept_epoch(self, vm_uuid: str) -> int | None:
        """The epoch VM ``vm_uuid``'s exports were kept through a step-down at, if they were."""
        epoch, kept = self._kept
        return epoch if vm_uuid in kept else None

    async def _let_go(self, kept: set[str], why: str) -> None:
        """End the exports kept through a step-down, and their appliers: the replica may have
        changed under them (decision 043)."""
        for name in self.exports.names_of(kept):
            await self.remove_export(name)
            _log.warning("pit_export_ended", export=name, reason=why, fix=EXPORT_AGAIN)
        for key in [k for k in self.engines if k[0] in kept]:
            await self.engines.pop(key).close_when_idle()
        for vm in kept:
            self.store.forget_vm(vm)
        self._kept = (0, set())

    def _start_membership(self, url: str) -> None:
        """Announce this broker, its owner epoch and every VM's roles on the MQTT control plane."""
        b = self.config.broker
        link = MQTTLink.for_daemon(
            url,
            client_id=f"replikant-broker-{b.cluster}-{b.node}",
            tls=self.config.tls,
            use_tls=self.config.mqtt.use_tls,
        )
        membership = Membership(
            link,
            node=b.node,
            cluster=b.cluster,
            site=b.site,
            url=self.url,
            epoch=lambda: self.epoch,
            snapshot=lambda: vm_site_records(self),
            exporting=self.exports.vms,
        )
        # The Last Will marks us offline if we vanish without a clean leave.
        link.set_will(topics.member(b.cluster, b.node), membership.member_record(online=False))
        self.membership = membership
        self.cluster = ClusterMember(self, link)
        self.scaleout = ScaleOut.attach(self, link) if b.placement == "spread" else None
        loop = asyncio.get_running_loop()

        pending: set[asyncio.Task[None]] = set()

        def publish_alert(event: str, fields: dict[str, Any]) -> None:
            if event == "alert_raised":
                message = str(fields.get("message", fields.get("condition", "alert")))
                fix = str(fields["fix"])
                task = loop.create_task(
                    membership.alert(str(fields.get("condition")), message, fix=fix)
                )
                pending.add(task)
                task.add_done_callback(pending.discard)

        self.test_copies.publish = membership.publish_once
        self.add_alert_hook(publish_alert)
        self._tasks.append(loop.create_task(link.run()))
        self._tasks.append(loop.create_task(membership.run()))
        self._tasks += [loop.create_task(t.run()) for t in (self.cluster, self.scaleout) if t]

    async def stop(self) -> None:
        """Graceful shutdown."""
        _log.info("broker_stopping")
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.cluster.leave()
        if self.membership is not None and self.membership.link.connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.membership.leave()
        await cancel_and_wait(self._tasks)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.end_owning(leaving=True)
        await self.nbd.close()
        run = self.store.root / ".run"
        (run / f"{self.config.broker.node}.json").unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, ValueError):
            if load_run_file(self.store.root).get("pid") == os.getpid():
                (run / "broker.json").unlink()
        _log.info("broker_stopped")

    async def run(self) -> None:
        """Start, wait for SIGTERM or SIGINT, stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            # A stop that hangs shows where, and ends before systemd's SIGKILL at 60 s.
            arm_stop_deadline(STOP_DEADLINE)
            await self.stop()

    # -- epoch
    def set_epoch(self, epoch: int) -> None:
        """Adopt an owner epoch granted by the election (claims it at the store first)."""
        self.store.claim_epoch(epoch, self.config.broker.node)
        self.epoch = epoch

    async def fenced(self, replica: Replica, write: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a blocking store write on ``replica`` inside a write section at this broker's
        epoch (:meth:`Store.fenced`): a deposed owner is refused before it writes."""
        return await asyncio.to_thread(self.store.fenced, replica, self.epoch, write, *args, **kw)

    def check_owner(self, vm_uuid: str | None = None, *, stored_epoch: int | None = None) -> None:
        """:meth:`broker.api.Ingest.check_owner`: placed here, or the owner at the store's epoch."""
        if self.scaleout is not None and self.scaleout.serves(vm_uuid):
            return  # placed here: the store's per-VM fence decides at each write (decision 032)
        if self.cluster is not None:
            self.cluster.check_serving(vm_uuid)
        if vm_uuid in self.taking_over:
            raise NotOwner(
                f"broker {self.config.broker.node} owns the cluster but a deposed owner is still "
                f"writing vm {vm_uuid}; it is taken over once that write ends",
                fix="retry shortly; if it lasts, resume or kill the previous owner's process",
                details={"epoch": self.epoch, "owner_url": self.advertised_url},
            )
        stored = self.store.stored_epoch() if stored_epoch is None else stored_epoch
        if stored > self.epoch:
            raise NotOwner(
                f"broker {self.config.broker.node} holds owner epoch {self.epoch} but the store "
                f"is at epoch {stored} ({self.store.stored_owner()})",
                fix="send batches to the cluster's current owner",
                details={"epoch": self.epoch, "stored_epoch": stored},
            )

    # -- engines
    def engine_for(self, replica: Replica) -> ReplicaEngine:
        """The live engine of a replica (created and started on first use)."""
        engine = self.engines.get(replica.key)
        if engine is None:
            engine = ReplicaEngine(
                self.store,
                replica,
                epoch=lambda: self.epoch,
                limits=self.limits,
                alert=self._alert,
            )
            self.retainer.configure(engine)
            self.engines[replica.key] = engine
            engine.start()
        return engine

    async def reannounce(self, replica: Replica, ident: Identity, body: dict[str, Any]) -> None:
        """PUT on an existing replica by its source (ingest checked host and generation): site,
        labels and RPO. A replica bound to no host yet (seeded from media) binds to this one."""
        m = replica.meta
        changes: dict[str, Any] = {}
        if not m.source_host:
            # Trust on first use among our CA's agents: the first announce binds.
            _log.info("replica_source_bound", vm=m.vm_name, disk=m.disk_id, host=ident.name)
            changes["source_host"] = ident.name
        for field, key in (
            ("source_site", "site"),
            ("labels", "labels"),
            ("rpo_seconds", "rpo_seconds"),
        ):
            value = body.get(key)
            if value not in (None, "") and value != getattr(m, field):
                changes[field] = value
        if changes:
            await self.fenced(replica, replica.update_meta, **changes)

    async def change_source(
        self,
        replicas: list[Replica],
        admin: Identity,
        *,
        host: str | None,
        generation: int | None,
    ) -> None:
        """The operator's rebind and/or generation raise for every disk of one VM (all or none
        of its disks change: every refusal is found before anything is written)."""
        first = replicas[0].meta
        old_host, old_generation = first.source_host, first.generation
        if generation is not None:
            low = min(r.meta.generation for r in replicas)
            if generation <= max(r.meta.generation for r in replicas):
                raise StaleGeneration(
                    f"vm {first.vm_name} is at generation {low}; generation {generation} would "
                    "not raise it (lowering one would unfence an old primary)",
                    fix=f"give a generation above {max(r.meta.generation for r in replicas)}",
                    details={"requested": generation, "replica_generation": low},
                )
        engines = [self.engine_for(r) for r in replicas]
        async with contextlib.AsyncExitStack() as stack:
            for engine in engines:
                await stack.enter_async_context(engine.ingest_lock)
            busy = [e.replica.label for e in engines if generation is not None and e.backlog()]
            if busy:
                raise IdentityConflict(
                    f"{', '.join(busy)} still apply batches of generation {first.generation}; "
                    "the generation can change once they are applied",
                    fix="retry in a few seconds",
                    details={"busy": busy},
                )
            for replica in replicas:
                changes: dict[str, Any] = {}
                if host is not None:
                    changes["source_host"] = host
                if generation is not None:
                    changes.update(generation=generation, durable_seq=0)
                await self.fenced(replica, replica.update_meta, **changes)
        _log.warning(
            "replica_source_changed",
            vm=first.vm_name,
            vm_uuid=first.vm_uuid,
            disks=[r.meta.disk_id for r in replicas],
            admin=admin.uri,
            old_host=old_host,
            host=host,
            old_generation=old_generation,
            generation=generation,
        )

    # -- space and alerts
    def add_alert_hook(self, hook: AlertHook) -> None:
        """Call ``hook(event, fields)`` on every alert raised or cleared."""
        self._hooks.append(hook)

    def _alert(self, event: str, fields: dict[str, Any]) -> None:
        for hook in self._hooks:
            try:
                hook(event, fields)
            except Exception:  # a broken hook must not break ingest
                _log.exception("alert_hook_failed", alert_event=event)

    def check_space(self, *, needed: int, replica: Replica | None = None) -> None:
        """Refuse up front when the store is below its reserve."""
        space = self.space
        if space.free() - needed < space.reserve:
            # Recovery points yield before replication does: old undo goes before any 507.
            gone = free_store_space(
                list(self.engines.values()), lambda: space.free() - needed >= space.reserve
            )
            if gone["points_dropped"]:
                _log.warning("store_low_points_dropped", store=str(space.root), **gone)
        label = f" for {replica.label}" if replica is not None else ""
        space.check(needed, f"accepting a batch{label}")

    def storage_full(self, exc: StorageFullError) -> None:
        """Raise the broker-wide storage_full condition (idempotent)."""
        if "storage_full" not in self.conditions:
            self.conditions["storage_full"] = Condition("storage_full", "critical", exc.message)
            _log.error("storage_full", **exc.details)
            self._alert(
                "alert_raised",
                {
                    "condition": "storage_full",
                    "level": "critical",
                    "message": exc.message,
                    "fix": exc.fix or "free space on the store's file system",
                    **exc.details,
                },
            )

    def storage_ok(self) -> None:
        """Clear storage_full once a batch was journaled (or space came back)."""
        if self.conditions.pop("storage_full", None) is not None:
            _log.info(
                "storage_recovered",
                store=str(self.store.root),
                free_bytes=self.space.free(),
            )
            self._alert("alert_cleared", {"condition": "storage_full"})

    def hosts_json(self) -> list[dict[str, Any]]:
        """The agent hosts' retained records as heard on MQTT (none without ``[mqtt]``)."""
        return self.membership.hosts_json() if self.membership is not None else []

    def broker_json(self) -> dict[str, Any]:
        """This broker's part of the status document."""
        b = self.config.broker
        levels = [c.level for c in self.conditions.values()]
        return {
            "node": b.node,
            "cluster": b.cluster,
            "site": b.site,
            "epoch": self.epoch,
            "store": str(self.store.root),
            "free_bytes": self.space.free(),
            "min_free_bytes": b.min_free_bytes,
            "health": "critical" if "critical" in levels else "warning" if levels else "ok",
            "conditions": [
                {"code": c.code, "level": c.level, "message": c.message}
                for c in self.conditions.values()
            ],
            "exports": len(self.exports),
            "cluster_view": self.cluster.json() if self.cluster is not None else None,
        }

    # -- retention
    def run_retention(self, now_ns: int | None = None) -> list[Any]:
        """Thin and prune every VM's points within each disk's bound (blocking; the retention
        task runs it): :class:`broker.retention.Retainer`. Returns the per-disk verdicts."""
        now_ns = now_ns if now_ns is not None else time.time_ns()
        disks: dict[str, int] = {}
        for replica in self.store.replicas():
            disks[replica.meta.vm_uuid] = disks.get(replica.meta.vm_uuid, 0) + 1
        engines = list(self.engines.values())
        live: dict[str, int] = {}
        for e in engines:
            live[e.replica.meta.vm_uuid] = live.get(e.replica.meta.vm_uuid, 0) + 1
        # A disk being seeded has no engine now: VM points need every disk.
        engines = [
            e for e in engines if live[e.replica.meta.vm_uuid] == disks.get(e.replica.meta.vm_uuid)
        ]
        return self.retainer.run(engines, now_ns)

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self.serving:
                continue  # retention writes the store: the owner's job alone
            since = time.monotonic() - self.retainer.last_pass
            engines = list(self.engines.values())
            if since < self.retention_interval and not (
                since >= PRESSURE_PASS_INTERVAL and self.retainer.under_pressure(engines)
            ):
                continue
            try:
                verdicts = await asyncio.to_thread(self.run_retention)
                publish(verdicts, time.time_ns())
            except (OSError, BrokerError) as exc:
                self.retainer.last_pass = time.monotonic()
                _log.error("retention_failed", error=str(exc))
            if "storage_full" in self.conditions:
                with contextlib.suppress(StorageFullError):
                    self.check_space(needed=0)
                    self.storage_ok()

    # -- reading
    def hashes(
        self,
        engine: ReplicaEngine,
        key: Key | None,
        offset: int,
        length: int,
        block_size: int,
    ) -> tuple[bytes, Key]:
        """Block hashes as of ``key`` (default: the applied state), and the key used."""
        view = engine.open_view(key)
        try:
            data = block_hashes(
                view, engine.image_fd, offset=offset, length=length, block_size=block_size
            )
        finally:
            view.close()
        return data, view.key

    # -- point-in-time exports
    async def create_exports(
        self, replicas: list[Replica], point: str, keys: list[Key], *, read_only: bool = False
    ) -> list[dict[str, Any]]:
        """Serve each disk of a VM as of VM point ``point`` over NBD, disk ``i`` at its state
        ``keys[i]`` (its state at that cut); returns their descriptions."""
        node = self.config.broker.node
        return await self.exports.create(
            [self.engine_for(r) for r in replicas],
            point,
            keys,
            lambda engine, name: StepDownGuard(self.store, engine.replica, self, node, name),
            read_only=read_only,
        )

    def list_exports(self) -> list[dict[str, Any]]:
        """The exports being served, with their client counts."""
        return self.exports.list()

    async def remove_export(self, name: str) -> None:
        """Stop serving an export and delete its overlay."""
        await self.exports.remove(name)

    # -- seeding
    async def seed_import(
        self,
        directory: str,
        *,
        expect_vm: str | None,
        image: tuple[str, str, str] | None = None,
    ) -> dict[str, Any]:
        """Load offline media, or one raw copy ``(path, vm, disk)`` (see broker.seed)."""
        from broker.seed import import_seed  # noqa: PLC0415 - rarely used

        raw = (Path(image[0]), image[1], image[2]) if image is not None else None
        return await import_seed(self, Path(directory), expect_vm=expect_vm, image=raw)


def load_run_file(store_root: Path, node: str | None = None) -> dict[str, Any]:
    """The store owner's ``.run/broker.json`` (url, pid, epoch, nbd socket), or with ``node``
    that member's ``.run/<node>.json``."""
    name = f"{node}.json" if node is not None else "broker.json"
    data: dict[str, Any] = json.loads((store_root / ".run" / name).read_text())
    return data


__all__ = ["BrokerService", "load_run_file"]
