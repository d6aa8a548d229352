"""The 1,000-VM simulation of docs/scale.md: three member processes (tests/sim_member.py, the
broker's real membership and placement code) share one store and a real Mosquitto over mutual
TLS; one is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from broker.placement import Member, Placer
from broker.placements import PlacementBook, PlacementRecord
from broker.store import Store
from common import topics
from common.tls import Identity, client_context
from tests.fixtures_pki import make_pki
from tests.sim_member import HEARTBEAT
from tests.support_mqtt import mosquitto_tls

VMS = 1000
NODES = ["n1", "n2", "n3"]
RATE_FACTOR = 1.5
"""How far the observed steady-state message rate may be from docs/scale.md's formula."""


class Observer:
    """Counts every control-plane message by kind, with the time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self.sizes: dict[str, list[int]] = {}

    async def run(self, port: int, tls: object) -> None:
        """Subscribe to the whole tree until cancelled."""
        assert tls is not None
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier="observer",
            tls_context=tls,  # type: ignore[arg-type]
        ) as client:
            await client.subscribe(f"{topics.ROOT}/#", qos=1)
            async for message in client.messages:
                kind = message.topic.value.split("/")[4]  # members, owner, placements, ...
                self.seen.append((time.monotonic(), kind))
                size = len(message.topic.value) + len(bytes(message.payload or b""))  # type: ignore[arg-type]
                self.sizes.setdefault(kind, []).append(size)

    def count(self, kind: str, since: float, until: float | None = None) -> int:
        """Messages of ``kind`` in ``[since, until)``."""
        end = until if until is not None else float("inf")
        return sum(1 for t, k in self.seen if k == kind and since <= t < end)


def _records(root: Path) -> dict[str, PlacementRecord]:
    return PlacementBook(Store(root), "observer").all()


async def until(what: str, check: Callable[[], bool], limit: float = 30) -> float:
    """Poll ``check()`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"{what}: not within {limit} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_thousand_vms_on_three_members(tmp_path: Path) -> None:
    """1,000 VMs end up on exactly one of three members each, balanced within the threshold; a
    SIGKILLed member's VMs (and no other) are re-placed within seconds; the message rates match
    docs/scale.md's formulas (and a placement's size) within RATE_FACTOR."""
    pki = make_pki(tmp_path / "pki")
    server = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    root = tmp_path / "store"
    Store(root)
    for _ in range(VMS):
        (root / str(uuid.uuid4())).mkdir(mode=0o700)
    certs = {n: pki.store.issue_broker("c1", n, ips=["127.0.0.1"]).tls for n in NODES}
    observer = Observer()
    procs: dict[str, asyncio.subprocess.Process] = {}
    with mosquitto_tls(tmp_path, server, [Identity.broker("c1", n) for n in NODES]) as port:
        watch = asyncio.create_task(observer.run(port, client_context(pki.admin.tls)))
        try:
            for node in ["n2", "n3", "n1"]:  # the owner last: it finds the others online
                tls = certs[node]
                args = [str(root), str(port), "c1", node, str(tls.ca), str(tls.cert), str(tls.key)]
                with (tmp_path / f"{node}.log").open("wb") as log:
                    procs[node] = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "tests.sim_member",
                        *args,
                        *(["--owner"] if node == "n1" else []),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=Path(__file__).parent.parent,
                    )
            for node in procs:
                log_path = tmp_path / f"{node}.log"
                await until(
                    f"{node} connected", lambda p=log_path: b"\nready\n" in p.read_bytes(), 20
                )
            placer = Placer()
            members = [Member(n) for n in NODES]

            def balanced() -> bool:
                records = _records(root)
                loads = Counter(r.node for r in records.values())
                return len(records) == VMS and placer.within_threshold(members, loads)

            took = await until("1,000 VMs placed and balanced", balanced, 30)
            first = _records(root)
            loads = Counter(r.node for r in first.values())
            bounds = placer.bounds(members, VMS)
            assert all(bounds[n][0] <= loads[n] <= bounds[n][1] for n in NODES), (loads, bounds)
            assert set(first) == set(PlacementBook(Store(root), "observer").vms())
            await until(
                "every placement retained", lambda: observer.count("placements", 0) >= VMS, 10
            )

            # Steady state: membership heartbeats only (docs/scale.md: members / H; the owner
            # record is the election's, not run here; placements publish nothing while settled).
            start = time.monotonic()
            await asyncio.sleep(4)
            end = time.monotonic()
            window = end - start
            heartbeats = observer.count("members", start, end)
            expected = len(NODES) / HEARTBEAT * window
            assert expected / RATE_FACTOR <= heartbeats <= expected * RATE_FACTOR, heartbeats
            assert observer.count("placements", start, end) == 0
            # docs/scale.md's retained state: ~1,050 bytes a signed placement with its topic.
            per_placement = sum(observer.sizes["placements"]) / len(observer.sizes["placements"])
            assert 1050 / RATE_FACTOR <= per_placement <= 1050 * RATE_FACTOR, per_placement

            # A member dies: its VMs, and only its VMs, move within the bound.
            victims = {vm for vm, r in first.items() if r.node == "n3"}
            os.kill(procs["n3"].pid, signal.SIGKILL)
            killed = time.monotonic()
            replaced = await until(
                "n3's VMs re-placed",
                lambda: not any(r.node == "n3" for r in _records(root).values()),
                15,
            )
            after = _records(root)
            moved = {vm for vm in after if after[vm].token != first[vm].token}
            assert moved == victims
            assert all(after[vm].token > first[vm].token for vm in moved)
            await until(
                "the moves announced",
                lambda: observer.count("placements", killed) >= len(victims),
                10,
            )
            await asyncio.sleep(1)
            assert observer.count("placements", killed) == len(victims)
            print(
                f"\nsim: placed {VMS} VMs in {took:.1f} s, loads {dict(loads)}; heartbeats "
                f"{heartbeats / window:.1f}/s (formula {expected / window:.1f}/s); n3's "
                f"{len(victims)} VMs re-placed {replaced:.1f} s after SIGKILL; "
                f"{per_placement:.0f} bytes a placement"
            )
            assert replaced < 5.0
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await watch
            for proc in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
