"""The broker's HTTPS API as one aiohttp application: every route, and the error middleware."""

from __future__ import annotations

from aiohttp import web

from broker.adminroutes import (
    create_exports,
    delete_export,
    list_exports,
    seed_import,
    set_source,
    status,
    vm_hashes,
    vm_points,
)
from broker.api import SERVICE_KEY, Admin
from broker.authz import no_browser_writes
from broker.current import agent_current, vm_current
from broker.handoverroutes import adopt_vm, promote_vm, settle_vm
from broker.httperrors import errors_middleware
from broker.ingest import enable_replica, replica_hashes, replica_state, upload_batch
from broker.testroutes import ROUTES as TEST_ROUTES
from common.logs import get_logger

_log = get_logger("broker.app")


def build_app(service: Admin) -> web.Application:
    """The aiohttp application of one broker."""
    app = web.Application(
        middlewares=[errors_middleware, no_browser_writes], client_max_size=1 << 20
    )
    app[SERVICE_KEY] = service
    app.add_routes(
        [
            web.put("/v1/replicas/{vm_uuid}/{disk_id}", enable_replica),
            web.get("/v1/replicas/{vm_uuid}/{disk_id}", replica_state),
            web.post("/v1/replicas/{vm_uuid}/{disk_id}/batches", upload_batch),
            web.get("/v1/replicas/{vm_uuid}/{disk_id}/hashes", replica_hashes),
            web.post("/v1/replicas/{vm_uuid}/current", vm_current),
            web.post("/v1/current", agent_current),
            web.get("/v1/status", status),
            web.get("/v1/vms/{vm}/points", vm_points),
            web.get("/v1/vms/{vm}/hashes", vm_hashes),
            web.post("/v1/vms/{vm}/source", set_source),
            web.post("/v1/vms/{vm}/promote", promote_vm),
            web.post("/v1/vms/{vm}/failover", settle_vm),
            web.post("/v1/vms/{vm}/adopt", adopt_vm),
            web.post("/v1/vms/{vm}/exports", create_exports),
            web.get("/v1/exports", list_exports),
            web.delete("/v1/exports/{name}", delete_export),
            web.post("/v1/seed/import", seed_import),
            *TEST_ROUTES,
        ]
    )
    return app
