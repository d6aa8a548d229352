"""Owner takeover in a real cluster: Mosquitto with mutual TLS, three `replikant broker run`
members on one store, one real agent shipping to them through `[broker] urls`.

The owner is killed with SIGKILL while a batch is being uploaded, twenty times; each time a new
owner's record must appear within 5 s of the kill, the agent must resume on it, and at the end
the sequence audit (`applied.log`) and the replica's bytes must show that every acked batch was
applied exactly once.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from common.tls import client_context
from common.tls.identities import Identity
from common.topics import OwnerRecord
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    ReplikantProc,
    VMSpec,
    agent_process,
    log_events,
    make_image,
)
from tests.support_cluster import (
    CLUSTER,
    Member,
    OwnerWatch,
    applied_log,
    converge,
    make_members,
    same,
    watch_owner,
    write_burst,
)
from tests.support_mqtt import mosquitto_tls

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(300)]

ROUNDS = 20
SIZE = 32 * MiB
TAKEOVER_LIMIT = 5.0
# A frozen owner never answers: without dropping the upload, the agent would wait for the ack
# timeout (300 s). Takeover (~2 s), the owner record, a retry and one upload fit well within.
RESUME_LIMIT = 30.0


def _by_node(members: list[Member], node: str) -> Member:
    return next(m for m in members if m.node == node)


async def _mid_upload(
    watch: OwnerWatch, members: list[Member], sock: Path, export: str, rng: random.Random
) -> tuple[OwnerRecord, Member]:
    """Write a burst and return (owner record, owner) once its batch is being uploaded."""
    owner = watch.current()
    assert owner is not None
    await asyncio.to_thread(write_burst, sock, export, rng, 3, SIZE)
    await asyncio.sleep(rng.uniform(0.3, 0.6))  # the cut, then mid-upload
    return owner, _by_node(members, owner.node)


async def _freeze_mid_upload(
    watch: OwnerWatch,
    members: list[Member],
    agent: ReplikantProc,
    sock: Path,
    export: str,
    rng: random.Random,
) -> float:
    """SIGSTOP the owner, then write: the next batch's upload waits on the frozen owner, which
    never answers; the agent drops it when it learns of the new owner and is acked there.
    Returns seconds from the freeze to that ack. (Freezing first: a burst's batch may be
    uploaded and acked within the moments a freeze "mid-upload" aims for.)

    A freeze that lands inside one of the owner's write sections (a journal write or an apply:
    with 0.25 s cycles the owner is often in one) keeps the new owner off that VM until the
    section ends, as it must for a process that may wake and write (decision 031); the agent
    is told so, and the refusal names the fix, to kill that broker. The test then does what
    an operator or a fencing agent would, and counts from the kill instead (this wait made the
    test fail once in CI, after 120 s)."""
    owner = watch.current()
    assert owner is not None
    victim = _by_node(members, owner.node)
    frozen = time.monotonic()
    victim.signal(signal.SIGSTOP)
    # An ack the owner sent just before it stopped is logged before the mark, not taken for
    # the resumed one (a faster broker made that race show, once in three CI runs).
    await asyncio.sleep(0.5)
    mark = agent.log.stat().st_size
    try:
        await asyncio.to_thread(write_burst, sock, export, rng, 3, SIZE)
        _, new = await watch.new_owner(owner.epoch, 30)
        assert new.node != victim.node
        deadline = time.monotonic() + 120
        fenced = False
        while not log_events(agent.log, "batch_acked", mark):
            assert time.monotonic() < deadline, f"agent did not resume: {agent.log}"
            if not fenced and any(
                "deposed owner is still writing" in str(e.get("error"))
                for e in log_events(agent.log, "broker_unavailable", mark)
            ):
                victim.signal(signal.SIGKILL)
                fenced, frozen = True, time.monotonic()
            await asyncio.sleep(0.05)
        resumed = time.monotonic() - frozen
        # What waited on the frozen owner is the burst's upload, or the cycle's statement sent
        # just before the burst's writes landed (then the burst is cut after it): either is
        # dropped when the agent learns of the new owner.
        dropped = log_events(agent.log, "batch_failed", mark) + log_events(
            agent.log, "broker_unavailable", mark
        )
        assert any(e.get("code") == "owner_moved" for e in dropped), dropped
    finally:
        victim.signal(signal.SIGKILL)
        victim.start()
    await victim.wait_up()
    return resumed


async def test_kill9_of_the_owner_mid_upload_twenty_times(tmp_path: Path) -> None:
    """Twenty kill -9s of the owner mid-upload: a new owner within 5 s each time, the agent
    resumes, every acked batch is applied exactly once and the replica equals the source; then
    a SIGSTOP mid-upload: the agent is acked by the new owner within 30 s, not the 300 s ack
    timeout."""
    rng = random.Random(12)
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    mqtt_cert = pki.store.issue_broker(CLUSTER, "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    nodes = [Identity.broker(CLUSTER, f"b{i}") for i in (1, 2, 3)]
    nodes.append(Identity.agent("h1"))  # the agent follows the owner record (agents/presence.py)
    image = make_image(tmp_path / "disk0.img", SIZE, fill=lambda i: rng.randbytes(MiB))
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    replica_dir = store / str(vm.uuid) / "disk0"
    path = f"/v1/replicas/{vm.uuid}/disk0"
    sock, export = tmp_path / "sock" / "vm1-disk0.sock", "vm1-disk0"
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls)))
    with mosquitto_tls(tmp_path, mqtt_cert, nodes) as mqtt_port:
        members, urls = make_members(tmp_path, pki, store, mqtt_port, 3)
        # 20 Mbit/s: a 3 MiB batch takes ~0.8 s to upload (the bucket lets about its first
        # MiB go at once), so a kill 0.3-0.6 s after the write finds it in flight.
        agent = agent_process(
            tmp_path,
            pki=pki,
            broker_urls=urls,
            vms=[vm],
            interval=0.25,
            policy_extra="bandwidth_limit_mbps = 20.0\n",
            mqtt_url=f"mqtts://127.0.0.1:{mqtt_port}",
        )
        try:
            async with watch_owner(pki, mqtt_port) as watch:
                for m in members:
                    m.start()
                for m in members:
                    await m.wait_up()
                _, first = await watch.new_owner(0, 30)
                agent.start()
                await converge(http, urls, path, replica_dir / "replica.img", image)
                takeovers: list[float] = []
                in_flight = 0
                for _ in range(ROUNDS):
                    owner, victim = await _mid_upload(watch, members, sock, export, rng)
                    killed_at = agent.log.stat().st_size
                    killed = time.monotonic()
                    victim.signal(signal.SIGKILL)
                    at, new = await watch.new_owner(owner.epoch, 30)
                    takeovers.append(at - killed)
                    assert new.node != victim.node
                    victim.start()
                    await victim.wait_up()
                    # The agent resumes: it ships (and gets acked) what is written after the kill.
                    mark = agent.log.stat().st_size
                    await asyncio.to_thread(write_burst, sock, export, rng, 1, SIZE)
                    deadline = time.monotonic() + 30
                    while not log_events(agent.log, "batch_acked", mark):
                        assert time.monotonic() < deadline, f"agent did not resume: {agent.log}"
                        await asyncio.sleep(0.05)
                    # In flight: an upload broke off, or was dropped when the new owner's
                    # record came first (the shipping process's reset can arrive after it); a
                    # refused connect is a later attempt.
                    if any(
                        "Cannot connect" not in str(e.get("error"))
                        and e.get("code") in ("connection_reset", "unreachable", "owner_moved")
                        for e in log_events(agent.log, "batch_failed", killed_at)
                    ):
                        in_flight += 1
                resumed = await _freeze_mid_upload(watch, members, agent, sock, export, rng)
                await converge(http, urls, path, replica_dir / "replica.img", image)
                assert agent.stop() == 0
        finally:
            await http.close()
            agent.kill9()
            for m in members:
                m.stop()
    print(f"takeover seconds: {sorted(round(t, 2) for t in takeovers)}; in flight: {in_flight}")
    print(f"acked {resumed:.2f} s after the owner froze")
    assert max(takeovers) <= TAKEOVER_LIMIT, takeovers
    assert resumed <= RESUME_LIMIT, f"the agent waited {resumed:.1f} s on the frozen owner"
    assert in_flight >= ROUNDS // 2, f"only {in_flight} kills hit an upload in flight"
    applied = applied_log(replica_dir)
    seqs = [int(r["seq"]) for r in applied]
    assert seqs == list(range(1, len(seqs) + 1)), "a batch was applied twice or skipped"
    epochs = [int(r["epoch"]) for r in applied]
    assert epochs == sorted(epochs), "an older owner applied after a newer one"
    assert len(set(epochs)) >= ROUNDS // 2, "the batches were not applied by changing owners"
    acked = {int(e["seq"]) for e in agent.events("batch_acked")}
    assert acked <= set(seqs), "an acked batch was never applied"
    assert first.epoch >= 1
    assert same(replica_dir / "replica.img", image)
