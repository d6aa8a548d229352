"""Issue 8, finding 4: an agent's PUT can neither take over another host's replica nor raise its
generation; only an admin certificate can (``POST /v1/vms/{vm}/source``, the `replikant replica`
commands), and each such act is logged once with the admin's identity."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from structlog.testing import capture_logs

from broker.service import BrokerService
from tests.security.broker_support import Answer, raw_request
from tests.security.rows import Door
from tests.support_broker import (
    PKI,
    AgentClient,
    FakeSource,
    MiB,
    admin_cli,
    admin_toml,
)

SURFACE = "broker HTTPS"


async def _settle(svc: BrokerService, src: FakeSource) -> None:
    replica = svc.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    async with asyncio.timeout(20):
        await svc.engines[replica.key].wait_for_state((src.generation, replica.meta.durable_seq))


def _put_body(src: FakeSource, generation: int) -> bytes:
    return json.dumps(
        {
            "vm_name": "web1",
            "disk_size": src.disk_size,
            "block_size": src.block_size,
            "generation": generation,
        }
    ).encode()


async def test_agent_put_cannot_rebind_or_raise_a_generation(
    broker: BrokerService, pki: PKI, door: Door
) -> None:
    """Agent h2's PUT, reads and uploads on h1's replica are 403 (rule replica.source_host), a
    PUT raising the generation is 409 generation_ahead, an agent on the admin endpoint is 403;
    h1 replicates on, byte for byte."""
    src = FakeSource(disk_size=MiB)
    path = f"/v1/replicas/{src.vm_uuid}/{src.disk_id}"
    async with AgentClient(broker.url, pki.agents["h1"]) as h1:
        await h1.enable(src)
        src.mutate()
        await h1.ship(src, src.cut())
    src.mutate()
    cut = src.cut()

    async def attempt(
        label: str, who: str, method: str, target: str, body: bytes, want: str
    ) -> Answer:
        tls = pki.agents[who]
        ctype = "application/x-replikant-hrl" if target.endswith("/batches") else "application/json"
        answer = await raw_request(broker.url, tls, method, target, body=body, content_type=ctype)
        rule = (answer.body.get("details") or {}).get("rule")
        door.attempt(
            SURFACE,
            label,
            expected=want,
            observed=f"{answer.status} {answer.error} rule={rule}",
            refused=400 <= answer.status < 500,
        )
        return answer

    a = await attempt(
        "agent h2 PUTs h1's replica (take-over)",
        "h2",
        "PUT",
        path,
        _put_body(src, 1),
        "403 not_authorised rule=replica.source_host",
    )
    assert (a.status, a.error, a.body["details"]["rule"]) == (
        403,
        "not_authorised",
        "replica.source_host",
    )
    assert "replikant replica rebind" in a.body["fix"]
    a = await attempt(
        "agent h2 PUTs h1's replica with generation 999",
        "h2",
        "PUT",
        path,
        _put_body(src, 999),
        "403 not_authorised rule=replica.source_host",
    )
    assert (a.status, a.error) == (403, "not_authorised")
    for what, target in (("state", path), ("block hashes", path + "/hashes")):
        a = await attempt(
            f"agent h2 reads the {what} of h1's replica",
            "h2",
            "GET",
            target,
            b"",
            "403 not_authorised rule=replica.source_host",
        )
        assert (a.status, a.error) == (403, "not_authorised")
    a = await attempt(
        "agent h2 uploads a batch to h1's replica",
        "h2",
        "POST",
        path + "/batches",
        cut.body,
        "403 not_authorised rule=replica.source_host",
    )
    assert (a.status, a.error) == (403, "not_authorised")
    a = await attempt(
        "agent h1 PUTs its own replica with generation 999 (fencing by PUT)",
        "h1",
        "PUT",
        path,
        _put_body(src, 999),
        "409 generation_ahead rule=replica.generation",
    )
    assert (a.status, a.error, a.body["details"]["rule"]) == (
        409,
        "generation_ahead",
        "replica.generation",
    )
    assert "999" in a.body["message"]
    assert "generation 1" in a.body["message"]
    assert "replikant replica set-generation" in a.body["fix"]
    a = await attempt(
        "agent h1 calls the admin rebind endpoint",
        "h1",
        "POST",
        "/v1/vms/web1/source",
        b'{"host": "h1", "generation": 5}',
        "403 not_authorised rule=role admin",
    )
    assert (a.status, a.error) == (403, "not_authorised")
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    assert (replica.meta.source_host, replica.meta.generation) == ("h1", 1)
    # The real source is not fenced: it announces and ships on.
    async with AgentClient(broker.url, pki.agents["h1"]) as h1:
        assert (await h1.enable(src))["generation"] == 1
        assert await h1.ship(src, cut) == 2
    await _settle(broker, src)
    assert hashlib.sha256(replica.image.read_bytes()).digest() == hashlib.sha256(src.image).digest()


async def test_operator_rebinds_and_raises_the_generation(
    broker: BrokerService, pki: PKI, tmp_path: Path
) -> None:
    """`replikant replica rebind` moves the replica to h2 (h1 is then refused) and
    `replikant replica set-generation` fences the old generation; each is logged once with the
    admin's identity, and lowering a generation is refused."""
    src = FakeSource(disk_size=MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as h1:
        await h1.enable(src)
        src.mutate()
        await h1.ship(src, src.cut())
    await _settle(broker, src)
    config = admin_toml(tmp_path / "admin.toml", pki, broker.url)
    with capture_logs() as logs:
        rc, out, err = await admin_cli(config, "replica", "rebind", "web1", "--host", "h2")
        assert rc == 0, err
        assert "source host h2" in out
        rc, out, err = await admin_cli(config, "replica", "set-generation", "web1", "2")
        assert rc == 0, err
        assert "generation 2" in out
        rc, _, err = await admin_cli(config, "replica", "set-generation", "web1", "1")
        assert rc == 1
        assert "stale_generation" in err
    changes = [e for e in logs if e["event"] == "replica_source_changed"]
    assert [(e["host"], e["generation"], e["admin"]) for e in changes] == [
        ("h2", None, "replikant://admin/alice"),
        (None, 2, "replikant://admin/alice"),
    ]
    src.generation, src.seq = 2, 0
    async with AgentClient(broker.url, pki.agents["h1"]) as h1:
        assert h1.session is not None
        async with h1.session.put(
            f"{broker.url}/v1/replicas/{src.vm_uuid}/{src.disk_id}",
            json={"vm_name": "web1", "disk_size": src.disk_size, "block_size": src.block_size},
        ) as resp:
            assert resp.status == 403
    async with AgentClient(broker.url, pki.agents["h2"]) as h2:
        state = await h2.enable(src)
        assert (state["source_host"], state["generation"], state["durable_seq"]) == ("h2", 2, 0)
        src.mutate()
        assert await h2.ship(src, src.cut()) == 1
    await _settle(broker, src)
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    assert replica.image.read_bytes() == bytes(src.image)
