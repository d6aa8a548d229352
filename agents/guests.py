"""The agent runs guests: a protected VM's own guest, and isolated test copies of standby VMs.

Served on the control socket (agents/control.py guards it):

- ``GET /v1/guests``: every VM with a ``hypervisor`` section, and each instance's state;
- ``POST /v1/guests/{vm}/start`` / ``stop`` / ``GET /v1/guests/{vm}``: the VM's own guest on the
  agent's tracked exports (a [[vms]] entry only, and only where its role lets it run);
- ``POST /v1/guests/{vm}/test`` ``{"disks": {ID: NBD_URI}}`` / ``DELETE /v1/guests/{vm}/test``:
  an isolated test copy (no NIC) on the disks given, typically a broker's point-in-time exports;
  the delete stops it and removes its run directory (QMP socket, pid file, console log).

Each instance has its own driver and run directory ``<state_dir>/guests/<vm>/<instance>``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from agents.control import refusal
from agents.hypervisor import GuestDisk, Hypervisor, HypervisorError, driver_for
from agents.startup import export_name, socket_path
from common.config import AgentConfig, StandbyVM, VMConfig
from common.logs import get_logger
from common.roles import RoleRefused, State, VMRole, check_start

log = get_logger("agents.guests")

MAIN, TEST = "main", "test"
_DISK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TEST_STOP_GRACE = 10.0

# The role of a protected VM here. Without failover state every [[vms]] entry is PRIMARY; the
# two-site work plugs the real answer (FENCED after a newer generation elsewhere) in here.
RoleOf = Callable[[VMConfig], VMRole]


class Guests:
    """Drivers for every guest instance this agent runs, and their control routes."""

    def __init__(self, config: AgentConfig, role_of: RoleOf | None = None) -> None:
        self.config = config
        self.root = config.agent.state_dir / "guests"
        self._role_of = role_of or self._primary
        self._drivers: dict[tuple[str, str], Hypervisor] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _primary(self, vm: VMConfig) -> VMRole:
        return VMRole(vm.name, self.config.agent.site, State.PRIMARY, 0)

    def routes(self, app: web.Application) -> None:
        """Add the guest routes to the control application: each one a thin wrapper of the
        public method of the same job, so another transport (MQTT requests) can call those."""
        app.router.add_get("/v1/guests", self._list)
        app.router.add_get("/v1/guests/{vm}", _route(self.status))
        app.router.add_post("/v1/guests/{vm}/start", _route(self.start))
        app.router.add_post("/v1/guests/{vm}/stop", _route(self.stop))
        app.router.add_post("/v1/guests/{vm}/test", _route(self.start_test))
        app.router.add_delete("/v1/guests/{vm}/test", _route(self.stop_test))

    def _find(self, name: str) -> VMConfig | StandbyVM | None:
        for vm in self.config.vms:
            if vm.name == name and vm.hypervisor is not None:
                return vm
        for standby in self.config.standby:
            if standby.name == name:
                return standby
        return None

    def driver(self, vm: VMConfig | StandbyVM, instance: str) -> Hypervisor:
        """The driver of one instance of ``vm`` (made once)."""
        key = (vm.name, instance)
        if key not in self._drivers:
            assert vm.hypervisor is not None
            run_dir = self.root / vm.name / instance
            self._drivers[key] = driver_for(vm.name, str(vm.uuid), vm.hypervisor, run_dir)
        return self._drivers[key]

    async def describe(self, vm: VMConfig | StandbyVM) -> dict[str, Any]:
        """One VM's entry: its driver and every instance's state."""
        assert vm.hypervisor is not None
        instances = {}
        for instance in (MAIN, TEST):
            drv = self.driver(vm, instance)
            instances[instance] = {**(await drv.status()).json(), "run_dir": str(drv.run_dir)}
        return {
            "name": vm.name,
            "uuid": str(vm.uuid),
            "standby": isinstance(vm, StandbyVM),
            "driver": vm.hypervisor.driver,
            "instances": instances,
        }

    async def _list(self, request: web.Request) -> web.Response:
        vms: list[VMConfig | StandbyVM] = [v for v in self.config.vms if v.hypervisor]
        vms += self.config.standby
        return web.json_response({"guests": [await self.describe(v) for v in vms]})

    def _vm(self, name: str) -> VMConfig | StandbyVM:
        vm = self._find(name)
        if vm is None:
            raise _Refused(
                404,
                "unknown_guest",
                f"this agent runs no guest called {name!r}",
                "add a [vms.hypervisor] section to the VM, or a [[standby]] entry, in agent.toml",
            )
        return vm

    async def status(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """The VM's driver and each instance's state."""
        return await self.describe(self._vm(name))

    async def start(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Start the VM's own guest on this agent's exports, if its role lets it run here."""
        vm = self._vm(name)
        if isinstance(vm, StandbyVM):
            role = VMRole(vm.name, self.config.agent.site, State.REPLICA, 0)
        else:
            role = self._role_of(vm)
        check_start(role)
        assert isinstance(vm, VMConfig)
        disks = [
            GuestDisk(
                d.id,
                f"nbd+unix:///{export_name(vm, d)}?socket="
                f"{socket_path(self.config, export_name(vm, d))}",
            )
            for d in vm.disks
        ]
        async with self._lock(vm.name):
            status = await self.driver(vm, MAIN).start(disks, isolated=False)
        return {"vm": vm.name, "instance": MAIN, "role": role.state.value, **status.json()}

    async def stop(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Power the VM's guest down (``grace_seconds``, default its stop timeout), then kill."""
        vm = self._vm(name)
        grace = args.get("grace_seconds")
        if grace is not None and not (isinstance(grace, int | float) and 0 <= grace <= 3600):
            raise _Refused(
                400,
                "bad_request",
                "grace_seconds must be a number of seconds between 0 and 3600",
                'send e.g. {"grace_seconds": 30}',
            )
        async with self._lock(vm.name):
            result = await self.driver(vm, MAIN).stop(grace=grace)
        return {"vm": vm.name, "instance": MAIN, **result.json()}

    async def start_test(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Boot an isolated test copy (no NIC) on ``args["disks"]``: {disk id: NBD URI}."""
        vm = self._vm(name)
        disks = _test_disks(args)
        async with self._lock(vm.name):
            status = await self.driver(vm, TEST).start(disks, isolated=True)
        log.info("test_copy_started", vm=vm.name, pid=status.pid, disks=len(disks))
        return {"vm": vm.name, "instance": TEST, "isolated": True, **status.json()}

    async def stop_test(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Stop the test copy and remove its run directory (QMP socket, pid file, console)."""
        vm = self._vm(name)
        async with self._lock(vm.name):
            drv = self.driver(vm, TEST)
            result = await drv.stop(grace=TEST_STOP_GRACE)
            await asyncio.to_thread(_remove_run_dir, drv.run_dir)
        log.info("test_copy_removed", vm=vm.name, how=result.how)
        return {"vm": vm.name, "instance": TEST, "removed": str(drv.run_dir), **result.json()}

    def _lock(self, vm: str) -> asyncio.Lock:
        return self._locks.setdefault(vm, asyncio.Lock())


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fix = status, code, message, fix


def _test_disks(body: object) -> list[GuestDisk]:
    disks = body.get("disks") if isinstance(body, dict) else None
    if (
        not isinstance(disks, dict)
        or not disks
        or not all(isinstance(k, str) and _DISK_ID.match(k) for k in disks)
        or not all(isinstance(v, str) for v in disks.values())
    ):
        raise _Refused(
            400,
            "bad_request",
            'a test copy needs {"disks": {"DISK_ID": "nbd+unix:///EXPORT?socket=PATH", ...}}',
            "pass the point-in-time exports `replikant failover test` got from the broker",
        )
    return [GuestDisk(k, v) for k, v in disks.items()]


def _remove_run_dir(path: Path) -> None:
    # The directory is ours (0700, checked when made); rmtree does not follow symlinks inside.
    if path.exists():
        shutil.rmtree(path)
    parent = path.parent
    if parent.exists() and not any(parent.iterdir()):
        parent.rmdir()


Job = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def _route(job: Job) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The control route of ``job``: the VM from the path, the arguments from the JSON body."""

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return refusal(
                400,
                "bad_request",
                "the body must be a JSON object",
                "send {} or the arguments docs/protocol/http.md names",
            )
        return await _answer(job(request.match_info["vm"], body))

    return handler


async def _answer(work: Awaitable[dict[str, Any]]) -> web.Response:
    try:
        return web.json_response(await work)
    except _Refused as exc:
        log.warning("guest_request_refused", code=exc.code, message=exc.message)
        return refusal(exc.status, exc.code, exc.message, exc.fix)
    except RoleRefused as exc:
        log.warning("guest_start_refused", vm=exc.role.vm, state=exc.role.state.value)
        return refusal(
            409,
            "wrong_role",
            f"{exc.role.describe()}: {exc.reason}",
            exc.fix,
            state=exc.role.state.value,
        )
    except HypervisorError as exc:
        return refusal(409, "hypervisor_error", exc.message, exc.fix or "")
