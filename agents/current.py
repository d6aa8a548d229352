"""Idle disks ship nothing: one small statement per VM and cycle says they are current.

A disk with no change since its last acked batch (:attr:`DiskReplicator.unchanged`) is left out
of the cut; the cycle instead tells the broker, for all such disks of the VM at once, that each
is still as after its last acked batch at this cut (docs/protocol/http.md; the broker side is
:mod:`broker.current`). That keeps ``lag_seconds`` and the VM's points current (decision 004,
rule 3) without a journaled, fsynced empty batch per disk per cycle. The statements of all VMs
that cut within :data:`WINDOW` of each other travel in one ``POST /v1/current``
(:class:`StatementBatches`; idle VMs cut on a shared tick, :func:`agents.worker.next_due`), so
100 idle VMs cost one request a second on each side, not 100. A VM another cluster member
serves, and every VM when the broker lacks ``/v1/current``, uses the per-VM ``POST
/v1/replicas/{vm_uuid}/current``; a broker without either gets empty batches as before.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from typing import Any

from agents.errors import ShipError
from agents.replicate import DiskReplicator
from agents.ship import BrokerClient
from common.logs import get_logger

log = get_logger("agents.current")

WINDOW = 0.01
"""Seconds a statement waits for others to share its request: VMs on the shared tick state
within a few milliseconds of each other, and a statement's delay costs nothing but this."""
MAX_VMS = 1024  # broker.current.MAX_VMS: a larger tick goes in several requests

_Pending = tuple[str, dict[str, Any], asyncio.Future[dict[str, bool] | None]]  # VM, body, answer


class StatementBatches:
    """The statements of one broker client's VMs, gathered into ``POST /v1/current`` requests."""

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.supported = True  # until the broker answers 404/405: then per VM, as before
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def state(self, vm_uuid: uuid.UUID, body: dict[str, Any]) -> dict[str, bool] | None:
        """Which of the VM's disks the broker took, or None: state it on its own (per VM).

        Raises the :class:`ShipError` of the shared request, as the VM's own would.
        """
        if not self.supported or self.client.routed(vm_uuid):
            return None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[str, bool] | None] = loop.create_future()
        self._pending.append((str(vm_uuid), body, answer))
        if self._timer is None:
            self._timer = loop.call_later(WINDOW, self._flush)
        return await answer

    def _flush(self) -> None:
        self._timer = None
        # A VM whose cycle was cancelled meanwhile (the agent stopping) has nothing to say.
        pending = [p for p in self._pending if not p[2].done()]
        self._pending = []
        for i in range(0, len(pending), MAX_VMS):
            task = asyncio.create_task(self._send(pending[i : i + MAX_VMS]))
            self._sending.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            answers = await self.client.current_all([{"vm_uuid": vm, **b} for vm, b, _ in batch])
        except ShipError as exc:
            if exc.status not in (404, 405):
                _fail(batch, exc)  # each VM handles it as the failure of its own request
                return
            log.info("agent_current_unsupported", error=exc.message)
            self.supported = False
            answers = {}
        except BaseException as exc:
            _fail(batch, exc)  # a bug, or the loop stopping: no VM may wait forever
            raise
        for vm, _b, answer in batch:
            mine = answers.get(vm)
            disks = mine.get("disks") if isinstance(mine, dict) else None
            if not answer.done():
                # A VM refused here states again on its own: the per-VM request's refusal
                # follows a redirect, fences or backs off exactly as for a batch.
                answer.set_result(
                    {str(k): v is True for k, v in disks.items()}
                    if isinstance(disks, dict)
                    else None
                )


def _fail(
    batch: list[_Pending],
    exc: BaseException,
) -> None:
    for _vm, _b, answer in batch:
        if answer.done():
            continue
        if isinstance(exc, Exception):
            answer.set_exception(exc)
        else:
            answer.cancel()


_BATCHES: weakref.WeakKeyDictionary[BrokerClient, StatementBatches] = weakref.WeakKeyDictionary()


def batches_of(client: BrokerClient) -> StatementBatches:
    """The one :class:`StatementBatches` of ``client`` (every VM of the agent shares it)."""
    batches = _BATCHES.get(client)
    if batches is None:
        batches = _BATCHES[client] = StatementBatches(client)
    return batches


class CurrentStatements:
    """The idle-disk statements of one VM."""

    def __init__(self, vm_uuid: uuid.UUID) -> None:
        self.vm_uuid = vm_uuid
        # None until the broker answered one statement: meanwhile unchanged disks still ship
        # (empty) batches, and the statement about them only probes for the endpoint.
        self.supported: bool | None = None

    def plan(self, ready: list[DiskReplicator]) -> tuple[list[DiskReplicator], bool]:
        """The unchanged disks at this cut (call in the cut's loop step), and whether they are
        left out of the cut (else the statement is a probe and they ship as usual)."""
        if self.supported is False:
            return [], False
        return [r for r in ready if r.unchanged], self.supported is True

    async def declare(
        self, idle: list[DiskReplicator], cut_id: int, cut_ns: int, *, probe: bool = False
    ) -> bool:
        """Tell the broker the ``idle`` disks are current at cut ``cut_id``; False on failure.

        A disk the broker does not take (it holds another batch than the one named) asks for
        the replica's state and ships a batch next cycle. A ``probe`` (the disks ship a batch
        of this cut anyway) only learns whether the broker has the endpoint.
        """
        if not idle:
            return True
        body = {
            "cut_id": cut_id,
            "cut_time_ns": cut_ns,
            "disks": [
                {
                    "disk_id": r.disk.id,
                    "generation": r.state.generation if r.state else 1,
                    "seq": r.status.last_acked_seq,
                }
                for r in idle
            ],
        }
        started = time.monotonic()
        client = idle[0].client
        try:
            taken = await batches_of(client).state(self.vm_uuid, body)
            if taken is None:
                taken = await client.current(self.vm_uuid, body)
        except ShipError as exc:
            if exc.status in (404, 405):
                log.info("current_statements_unsupported", error=exc.message)
                self.supported = False  # the disks ship (empty) batches, as they did so far
                return True
            if probe:
                return True  # the batches of this cut tell what the broker holds
            for rep in idle:
                rep.ready = False
                rep.record_error(exc)
                rep.log.warning("broker_unavailable", error=exc.message, code=exc.code)
            return False
        if probe:
            self.supported = True
            return True
        for rep in idle:
            if taken.get(rep.disk.id, False):
                rep.status.last_cut_ns = rep.status.last_acked_cut_ns = cut_ns
                rep.status.last_error = None
            else:
                rep.ready = False
        log.debug(
            "vm_current_declared",
            cut_id=cut_id,
            disks=len(idle),
            refused=[r.disk.id for r in idle if not taken.get(r.disk.id, False)],
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return True
