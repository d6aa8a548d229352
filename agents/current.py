"""Idle disks ship nothing: one small statement per VM and cycle says they are current.

A disk with no change since its last acked batch (:attr:`DiskReplicator.unchanged`) is left out
of the cut; the cycle instead tells the broker, for all such disks of the VM at once, that each
is still as after its last acked batch at this cut (``POST /v1/replicas/{vm_uuid}/current``,
docs/protocol/http.md; the broker side is :mod:`broker.current`). That keeps ``lag_seconds``
and the VM's points current (decision 004, rule 3) without a journaled, fsynced empty batch per
disk per cycle. A broker without the endpoint gets empty batches as before.
"""

from __future__ import annotations

import time
import uuid

from agents.errors import ShipError
from agents.replicate import DiskReplicator
from common.logs import get_logger

log = get_logger("agents.current")


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
        try:
            taken = await idle[0].client.current(self.vm_uuid, body)
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
