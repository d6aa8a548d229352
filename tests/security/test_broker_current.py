"""Issue 10, point 6: the idle-disk statement (``POST /v1/replicas/{vm_uuid}/current``) is taken
only from the replica's own agent, only for the batch the replica holds durably, and only with a
well-formed body; a refused statement changes nothing the broker reports."""

from __future__ import annotations

import json
from typing import Any

from broker.service import BrokerService
from tests.security.broker_support import raw_request
from tests.security.rows import Door
from tests.support_broker import PKI, AgentClient, FakeSource, MiB

SURFACE = "broker HTTPS"


def _statement(src: FakeSource, *, seq: int, cut_id: int, **extra: Any) -> bytes:
    disk = {"disk_id": src.disk_id, "generation": src.generation, "seq": seq}
    return json.dumps({"cut_id": cut_id, "cut_time_ns": 10**19, "disks": [disk], **extra}).encode()


async def test_current_statements_are_taken_only_from_the_replicas_agent(
    broker: BrokerService, pki: PKI, door: Door
) -> None:
    """Another agent (403), an admin (403), a stale seq or an old cut (not taken), a bad body
    (400) or a non-JSON one (400) leave the replica's state and lag alone; h1's own is taken."""
    src = FakeSource(disk_size=MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as h1:
        await h1.enable(src)
        src.mutate()
        await h1.ship(src, src.cut())
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    engine = broker.engine_for(replica)
    path = f"/v1/replicas/{src.vm_uuid}/current"
    good = _statement(src, seq=1, cut_id=5)
    attempts = [
        ("agent h2 states h1's disk current", "h2", good, "application/json", "403"),
        ("an admin states a disk current", "admin", good, "application/json", "403"),
        (
            "h1 names a seq the replica does not hold",
            "h1",
            _statement(src, seq=7, cut_id=5),
            "application/json",
            "200 taken=false",
        ),
        (
            "h1 names a cut not after the durable one",
            "h1",
            _statement(src, seq=1, cut_id=1),
            "application/json",
            "200 taken=false",
        ),
        (
            "h1 adds an unknown key",
            "h1",
            _statement(src, seq=1, cut_id=5, extra=1),
            "application/json",
            "400",
        ),
        (
            "h1 names a disk id with a slash",
            "h1",
            good.replace(b'"disk0"', b'"../x"'),
            "application/json",
            "400",
        ),
        (
            "h1 sends 300 disks",
            "h1",
            json.dumps(
                {
                    "cut_id": 5,
                    "cut_time_ns": 1,
                    "disks": [{"disk_id": f"d{i}", "generation": 1, "seq": 1} for i in range(300)],
                }
            ).encode(),
            "application/json",
            "400",
        ),
        (
            "h1 sends the statement as a form (browser-forgeable)",
            "h1",
            good,
            "application/x-www-form-urlencoded",
            "400",
        ),
    ]
    for label, who, body, ctype, want in attempts:
        tls = pki.admin if who == "admin" else pki.agents[who]
        answer = await raw_request(broker.url, tls, "POST", path, body=body, content_type=ctype)
        taken = (answer.body.get("disks") or {}).get(src.disk_id)
        observed = f"{answer.status} {answer.error or ''}".strip()
        if answer.status == 200:
            observed = f"200 taken={'true' if taken else 'false'}"
        door.attempt(SURFACE, label, expected=want, observed=observed, refused=not taken)
        assert observed.startswith(want), (label, observed)
        assert engine.current is None, label
    answer = await raw_request(broker.url, pki.agents["h1"], "POST", path, body=good)
    assert answer.status == 200
    assert answer.body["disks"] == {src.disk_id: True}
    assert engine.current is not None
    assert (engine.current.seq, engine.current.cut_id) == (1, 5)
