"""Doors of the owner fence beyond journal and apply (decision 031, wave 5): a deposed owner's
replica creation, meta changes, failover reset and seed commit line, on one shared store."""

from __future__ import annotations

from pathlib import Path

from broker.errors import BrokerError
from tests.security.rows import Door
from tests.test_fence_writes import PATHS, VM, deposed_store, snapshot

SURFACE = "shared replica store (deposed owner)"


async def test_a_deposed_owner_is_refused_every_store_write(tmp_path: Path, door: Door) -> None:
    """Each write path of an owner at epoch 1, after another claimed epoch 2, is refused with
    nothing of the store changed and no replica directory made."""
    for n, (name, write) in enumerate(sorted(PATHS.items())):
        store, replica = deposed_store(tmp_path / str(n))
        before = snapshot(store.root)
        try:
            write(store, replica)
            refused, observed = False, "written"
        except BrokerError as exc:
            refused, observed = True, f"{type(exc).__name__} {exc.code} {exc.status}"
        unchanged = snapshot(store.root) == before
        made = sorted(p.name for p in (store.root / VM).iterdir() if p.name != "disk0")
        door.attempt(
            SURFACE,
            f"owner at epoch 1 after epoch 2 was claimed: {name}",
            expected="FencedError fenced 503, store unchanged, no new directory",
            observed=f"{observed}, store unchanged: {unchanged}, new entries: {made}",
            refused=refused and unchanged and not made,
        )
