"""Issue 10, point 6: the idle-disk statement (``POST /v1/replicas/{vm_uuid}/current``, and many
VMs' at once in ``POST /v1/current``) is taken only from the replica's own agent, only for the
batch the replica holds durably, and only with a well-formed body; a refused statement changes
nothing the broker reports."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from broker.current import MAX_VMS
from broker.service import BrokerService
from tests.security.broker_support import Answer, raw_request
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


def _statements(*vms: tuple[str, FakeSource], cut_id: int = 5) -> bytes:
    return json.dumps(
        {
            "vms": [
                {
                    "vm_uuid": vm,
                    "cut_id": cut_id,
                    "cut_time_ns": 10**19,
                    "disks": [{"disk_id": s.disk_id, "generation": s.generation, "seq": 1}],
                }
                for vm, s in vms
            ]
        }
    ).encode()


async def test_shared_statements_speak_only_for_the_callers_vms(
    broker: BrokerService, pki: PKI, door: Door
) -> None:
    """``POST /v1/current`` takes each VM's statement only from that VM's agent: another agent's
    VM is refused on its own (403) while the caller's own VM in the same request is taken, an
    unknown VM is not taken, and a bad name, a doubled VM, an admin, a form or too many VMs
    refuse the whole request; nothing refused reaches a replica."""
    mine, theirs = FakeSource(disk_size=MiB), FakeSource(disk_size=MiB)
    for host, src in (("h1", mine), ("h2", theirs)):
        async with AgentClient(broker.url, pki.agents[host]) as agent:
            await agent.enable(src)
            src.mutate()
            await agent.ship(src, src.cut())
    engines = {}
    for src in (mine, theirs):
        replica = broker.store.get(str(src.vm_uuid), src.disk_id)
        assert replica is not None
        engines[str(src.vm_uuid)] = broker.engine_for(replica)
    a, b = str(mine.vm_uuid), str(theirs.vm_uuid)
    unknown = str(uuid.uuid4())

    def per_vm(answer: Answer, vm: str) -> str:
        got = answer.body.get("vms", {}).get(vm, {})
        if "disks" in got:
            return "taken=true" if all(got["disks"].values()) else "taken=false"
        return f"{got.get('status')} {got.get('error')}"

    # (label, caller, body, content type, expected, observed of the answer)
    attempts: list[tuple[str, str, bytes, str, str, Callable[[Answer], str]]] = [
        (
            "h1 states h2's VM beside its own",
            "h1",
            _statements((a, mine), (b, theirs)),
            "application/json",
            "200 h2's VM 403 not_authorised",
            lambda r: f"{r.status} h2's VM {per_vm(r, b)}",
        ),
        (
            "h1 states a VM the broker does not hold",
            "h1",
            _statements((unknown, mine)),
            "application/json",
            "200 taken=false",
            lambda r: f"{r.status} {per_vm(r, unknown)}",
        ),
        *(
            (
                f"h1 names vm_uuid {label}",
                "h1",
                _statements((bad, mine)),
                "application/json",
                "400 bad_request field=vms.0.vm_uuid",
                Answer.text,
            )
            for label, bad in (
                ("'../x'", "../x"),
                ("'a/b'", "a/b"),
                ("bare hex", a.replace("-", "")),
                ("with braces", "{" + a + "}"),
                ("overlong", "x" * 65),
            )
        ),
        (
            "h1 names a disk id with a slash",
            "h1",
            _statements((a, mine)).replace(b'"disk0"', b'"../x"'),
            "application/json",
            "400 bad_request",
            Answer.text,
        ),
        (
            "h1 names its VM twice",
            "h1",
            _statements((a, mine), (a, mine)),
            "application/json",
            "400 bad_request field=vms",
            Answer.text,
        ),
        (
            "an admin states a VM current",
            "admin",
            _statements((a, mine)),
            "application/json",
            "403 not_authorised",
            Answer.text,
        ),
        (
            "h1 sends the statements as a form (browser-forgeable)",
            "h1",
            _statements((a, mine)),
            "application/x-www-form-urlencoded",
            "400 bad_request",
            Answer.text,
        ),
        (
            f"h1 sends {MAX_VMS + 1} VMs",
            "h1",
            _statements(*((str(uuid.uuid4()), mine) for _ in range(MAX_VMS + 1))),
            "application/json",
            "400 bad_request field=vms",
            Answer.text,
        ),
    ]
    for label, who, body, ctype, want, observe in attempts:
        tls = pki.admin if who == "admin" else pki.agents[who]
        answer = await raw_request(
            broker.url, tls, "POST", "/v1/current", body=body, content_type=ctype
        )
        observed = observe(answer)
        door.attempt(
            SURFACE, label, expected=want, observed=observed, refused="taken=true" not in observed
        )
        assert observed.startswith(want), (label, observed)
        assert engines[b].current is None, label
    # The first attempt took h1's own VM beside the refused one: its statement counts.
    current = engines[a].current
    assert current is not None
    assert (current.seq, current.cut_id) == (1, 5)
