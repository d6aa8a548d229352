"""The test failovers this broker serves: which VMs are TEST here, from which point, on which
point-in-time exports.

Kept in memory beside the exports themselves (which live only as long as the broker process);
the roles come from :mod:`common.roles`, whose in-progress marker refuses a second command on a
VM while the first one still creates or removes its exports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.logs import get_logger
from common.roles import RoleBook

_log = get_logger("broker.testcopies")


@dataclass
class TestCopy:
    """One VM's test copy: the point and the exports (one per disk) it boots from."""

    vm: str
    uuid: str
    point: str
    exports: list[dict[str, Any]]
    started: float = field(default_factory=time.time)

    def json(self) -> dict[str, Any]:
        """What the admin API returns about it."""
        return {
            "vm": self.vm,
            "uuid": self.uuid,
            "point": self.point,
            "started": self.started,
            "exports": self.exports,
        }


class TestCopies:
    """This broker's test copies and the role book that guards them."""

    def __init__(self, site: str) -> None:
        self.book = RoleBook(site)
        self.copies: dict[str, TestCopy] = {}
        # Set by the broker when it publishes on MQTT: a role change, or an export made or
        # ended, is announced at once, so that when the command returns the retained records
        # (the VM's role, the member's exported VMs) already say so.
        self.publish: Callable[[], Awaitable[int]] | None = None

    def is_test(self, vm: str) -> bool:
        """Whether ``vm`` runs as a TEST copy from this site."""
        return vm in self.copies

    async def announce(self) -> None:
        """Publish the changed records now (MQTT is advisory: a failure only waits for the
        next periodic publish, and is logged)."""
        if self.publish is None:
            return
        try:
            async with asyncio.timeout(2):
                await self.publish()
        except Exception as exc:  # any MQTT failure: the periodic publish tries again
            _log.warning("records_publish_deferred", error=str(exc) or type(exc).__name__)
