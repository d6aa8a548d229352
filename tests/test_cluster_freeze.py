"""A frozen owner (SIGSTOP) with batches in hand wakes up after another member took over: the
store's owner-epoch fence, not MQTT, is what keeps it from applying them.

b1 owns first and applies slowly (the test hook `REPLIKANT_TEST_SLOW_APPLY` pauses inside each
apply), so it holds journaled-but-unapplied batches when it is frozen. Another member takes over
while it sleeps; then it is resumed. With the fence, its `applied.log` lines all predate the
freeze and the replica ends byte-identical; with the fence off (`REPLIKANT_TEST_NO_FENCE`), the
same scene makes it apply a batch the new owner had applied already.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from common.tls import client_context
from common.tls.identities import Identity
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    VMSpec,
    agent_process,
    make_image,
    replikant_exe,
    run_tool,
)
from tests.support_cluster import (
    CLUSTER,
    applied_log,
    converge,
    make_members,
    replica_state,
    watch_owner,
    write_burst,
)
from tests.support_mqtt import mosquitto_tls

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 8 * MiB
SLOW = 1.5


async def _freeze_scene(tmp_path: Path, *, fence: bool) -> tuple[list[dict[str, object]], int, int]:
    """Run the scene; returns (applied.log, b1's epoch, wall time of the freeze in ns)."""
    rng = random.Random(5)
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    mqtt_cert = pki.store.issue_broker(CLUSTER, "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    image = make_image(tmp_path / "disk0.img", SIZE, fill=lambda i: rng.randbytes(MiB))
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    replica_dir = store / str(vm.uuid) / "disk0"
    path = f"/v1/replicas/{vm.uuid}/disk0"
    sock, export = tmp_path / "sock" / "vm1-disk0.sock", "vm1-disk0"
    nodes = [Identity.broker(CLUSTER, f"b{i}") for i in (1, 2, 3)]
    with mosquitto_tls(tmp_path, mqtt_cert, nodes) as mqtt_port:
        members, urls = make_members(tmp_path, pki, store, mqtt_port, 3)
        b1 = members[0]
        b1.env["REPLIKANT_TEST_SLOW_APPLY"] = str(SLOW)
        if not fence:
            for m in members:
                m.env["REPLIKANT_TEST_NO_FENCE"] = "1"
        agent = agent_process(tmp_path, pki=pki, broker_urls=urls, vms=[vm], interval=0.25)
        tls = client_context(pki.admin.tls)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http,
            watch_owner(pki, mqtt_port) as watch,
        ):
            try:
                b1.start()
                await b1.wait_up()
                _, first = await watch.new_owner(0, 30)
                assert first.node == "b1"
                for m in members[1:]:
                    m.start()
                    await m.wait_up()
                agent.start()
                await converge(http, urls, path, replica_dir / "replica.img", image)
                # Batches journaled fast, applied slowly: a backlog in b1's hands.
                for _ in range(4):
                    await asyncio.to_thread(write_burst, sock, export, rng, 1, SIZE)
                    await asyncio.sleep(0.4)
                deadline = time.monotonic() + 30
                slowed = 0
                while True:
                    st = await replica_state(http, urls, path)
                    backlog = int(str(st["durable_seq"])) - int(str(st["applied_seq"]))
                    now_slowed = len(b1.events("apply_slowed_for_test"))
                    # Freeze just as an apply enters its slowed step: mid-apply. Between two
                    # applies the successor could delete the next journal file first, and the
                    # resumed owner would find nothing to apply (a rare CI failure).
                    if backlog >= 2 and slowed and now_slowed > slowed:
                        break
                    slowed = now_slowed
                    assert time.monotonic() < deadline, f"no backlog at b1: {st}"
                    await asyncio.sleep(0.05)
                frozen_ns = time.time_ns()
                b1.signal(signal.SIGSTOP)
                _, successor = await watch.new_owner(first.epoch, 15)
                assert successor.node != "b1"
                if not fence:
                    # Nothing holds the successor back: let it apply everything first.
                    await _applied_by(replica_dir, successor.epoch, int(str(st["durable_seq"])))
                else:
                    await asyncio.sleep(1.0)
                b1.signal(signal.SIGCONT)
                await asyncio.sleep(SLOW + 2.0)  # b1 finishes the apply it was in
                if fence:
                    await converge(http, urls, path, replica_dir / "replica.img", image)
                    assert b1.events("replica_alert"), "b1 had no apply refused by the fence"
                    new = next(m for m in members if m.node == successor.node)
                    # The successor took that replica over only once b1's frozen write ended.
                    assert new.events("takeover_waiting_for_writer"), new.log
                    assert new.events("takeover_replica_loaded"), new.log
                    admin = _check_cluster_status(
                        tmp_path, pki, urls, successor.node, successor.epoch
                    )
                    await _check_admin_follows(http, admin, urls[0], image)
            finally:
                agent.kill9()
                for m in members:
                    m.stop()
    return applied_log(replica_dir), first.epoch, frozen_ns


def _check_cluster_status(tmp: Path, pki: Pki, urls: list[str], owner: str, epoch: int) -> Path:
    """`replikant cluster status --json` names the new owner, its epoch and three members;
    returns the admin config (its first broker is b1)."""
    admin = tmp / "admin.toml"
    tls = pki.admin.tls
    brokers = ", ".join(f'"{u}"' for u in urls)
    admin.write_text(
        f'[admin]\nbrokers = [{brokers}]\n\n[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\n'
        f'key = "{tls.key}"\n'
    )
    out = run_tool(replikant_exe(), "--config", str(admin), "cluster", "status", "--json")
    assert out.returncode == 0, out.stderr
    (c1,) = json.loads(out.stdout)["clusters"]
    assert (c1["name"], c1["owner"], c1["epoch"]) == (CLUSTER, owner, epoch)
    assert [m["node"] for m in c1["members"]] == ["b1", "b2", "b3"]
    assert all(m["online"] and m["url"] in urls for m in c1["members"]), c1
    return admin


async def _check_admin_follows(
    http: aiohttp.ClientSession, admin: Path, standby: str, image: Path
) -> None:
    """The first broker of the admin config, b1, is a standby now: asked directly it refuses
    with 503 not_owner, yet `replikant verify` (which asks the first broker) finds the replica
    by following the refusal to the member that serves the VM."""
    async with http.get(f"{standby}/v1/vms/vm1/hashes") as resp:
        body = await resp.json()
    assert (resp.status, body["error"]) == (503, "not_owner"), body
    assert body["details"]["owner_url"] != standby
    cmd = ["--config", str(admin), "verify", "vm1", "--source-image", str(image), "--json"]
    out = await asyncio.to_thread(run_tool, replikant_exe(), *cmd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["result"] == "match"


async def _applied_by(replica_dir: Path, epoch: int, seq: int) -> None:
    deadline = time.monotonic() + 30
    while not any(
        int(str(r["epoch"])) == epoch and int(str(r["seq"])) >= seq
        for r in applied_log(replica_dir)
    ):
        assert time.monotonic() < deadline, "the new owner did not apply the backlog"
        await asyncio.sleep(0.05)


async def test_frozen_owner_applies_nothing_after_a_takeover(tmp_path: Path) -> None:
    """SIGSTOP the owner mid-apply with a backlog, elect another, SIGCONT: every line the old
    owner wrote to applied.log predates the freeze, each batch is applied once, the replica is
    byte-identical."""
    applied, old_epoch, frozen_ns = await _freeze_scene(tmp_path, fence=True)
    seqs = [int(str(r["seq"])) for r in applied]
    assert seqs == list(range(1, len(seqs) + 1)), "a batch was applied twice or skipped"
    late = [r for r in applied if r["epoch"] == old_epoch and int(str(r["applied_ns"])) > frozen_ns]
    assert late == [], f"the frozen owner applied after the takeover: {late}"
    assert any(int(str(r["epoch"])) > old_epoch for r in applied), "the new owner applied nothing"


async def test_without_the_fence_the_frozen_owner_applies_stale_batches(tmp_path: Path) -> None:
    """The same scene with the fence switched off (test hook): the old owner, resumed, applies a
    batch after the new owner did: the damage the fence prevents."""
    applied, old_epoch, frozen_ns = await _freeze_scene(tmp_path, fence=False)
    seqs = [int(str(r["seq"])) for r in applied]
    late = [r for r in applied if r["epoch"] == old_epoch and int(str(r["applied_ns"])) > frozen_ns]
    assert late, "the old owner applied nothing after its resume: the scene proves nothing"
    assert len(seqs) != len(set(seqs)), f"no batch applied twice: {seqs}"
