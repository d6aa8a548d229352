"""Signed MQTT records: only a genuine, newer record from a daemon allowed on its topic passes."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from common import topics
from common.signedrecord import WILL_SEQ, ForgedRecord, Signer, StaleRecord, Verifier
from common.tls.identities import Identity
from tests.fixtures_pki import Pki, issue_expired, make_pki, pki

__all__ = ["pki"]

OWNER = topics.owner("c1")
RECORD = (
    topics.OwnerRecord(node="b1", epoch=4, url="https://127.0.0.1:8443", seq=1)
    .model_dump_json()
    .encode()
)


def _signer(issued: object) -> Signer:
    return Signer.from_files(issued.cert_path, issued.key_path)  # type: ignore[attr-defined]


def test_a_genuine_record_passes_with_its_signer(pki: Pki) -> None:
    """A broker's signed owner record for its own cluster verifies and names the broker."""
    wire = _signer(pki.broker).sign(OWNER, RECORD, session=10.0, seq=1)
    verified = Verifier.from_file(pki.ca).open(OWNER, wire)
    assert verified.record == RECORD
    assert verified.signer == Identity.broker("c1", "b1")


def _tamper(wire: bytes, **changes: object) -> bytes:
    env = json.loads(wire)
    env.update(changes)
    return json.dumps(env).encode()


def test_forgeries_are_refused_with_their_reason(pki: Pki, tmp_path: Path) -> None:
    """Tampered records, signatures, foreign or expired certificates, unsigned payloads and a
    role on a topic it may not write are all refused, each naming why."""
    verifier = Verifier.from_file(pki.ca)
    broker = _signer(pki.broker)
    wire = broker.sign(OWNER, RECORD, session=10.0, seq=1)
    forged_record = topics.OwnerRecord(
        node="evil", epoch=99, url="https://evil.example:8443", seq=1
    ).model_dump_json()
    other = make_pki(tmp_path / "other")
    bad_sig = base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()
    cases = {
        "signature does not match": _tamper(wire, record=forged_record),
        "signature does not match ": _tamper(wire, sig=bad_sig),
        "not issued by our CA": _signer(other.broker).sign(OWNER, RECORD, session=10, seq=1),
        "not valid now": _signer(issue_expired(pki.store)).sign(
            topics.host("expired-h"), b"{}", session=10, seq=1
        ),
        "not a signed envelope": RECORD,
        "agent/h1 may not publish": _signer(pki.agent).sign(OWNER, RECORD, session=10, seq=1),
        "admin/alice may not publish": _signer(pki.admin).sign(OWNER, RECORD, session=10, seq=1),
    }
    for why, payload in cases.items():
        topic = topics.host("expired-h") if "valid now" in why else OWNER
        with pytest.raises(ForgedRecord, match=why.strip()):
            verifier.open(topic, payload)
    # The same genuine envelope moved to another cluster's topic: the topic is signed too.
    with pytest.raises(ForgedRecord, match="signature does not match"):
        verifier.open(topics.owner("c2"), wire)


def test_replays_never_move_a_receiver_backwards(pki: Pki) -> None:
    """A genuine record older than one already accepted from the same signer is dropped, the
    last one accepted passes again only as a retained record on resubscription; the last will
    supersedes its own session and is superseded by the next one."""
    verifier = Verifier.from_file(pki.ca)
    broker = _signer(pki.broker)
    member = topics.member("c1", "b1")
    first = broker.sign(member, b"{}", session=10.0, seq=1)
    second = broker.sign(member, b"{}", session=10.0, seq=2)
    will = broker.sign(member, b"{}", session=10.0, seq=WILL_SEQ)
    later = broker.sign(member, b"{}", session=11.0, seq=1)
    verifier.open(member, first)
    verifier.open(member, second)
    with pytest.raises(StaleRecord):
        verifier.open(member, first)
    with pytest.raises(StaleRecord):
        verifier.open(member, first, retained=True)
    with pytest.raises(StaleRecord):
        verifier.open(member, second)  # the same record pushed again: a replay
    assert verifier.open(member, second, retained=True).order == (10.0, 2)  # a resubscription
    verifier.open(member, will)
    with pytest.raises(StaleRecord):
        verifier.open(member, second)
    verifier.open(member, later)
    with pytest.raises(StaleRecord):
        verifier.open(member, will)


def test_topic_rules_match_the_publishers_table() -> None:
    """Each role may publish exactly its own topics: a broker its cluster's, an agent its host's,
    an admin only requests; names are the publisher's own."""
    b1 = Identity.broker("c1", "b1")
    h1 = Identity.agent("h1")
    alice = Identity.admin("alice")
    assert topics.may_publish(b1, topics.owner("c1"))
    assert not topics.may_publish(b1, topics.owner("c2"))
    assert topics.may_publish(h1, topics.host("h1"))
    assert not topics.may_publish(h1, topics.host("h2"))
    assert not topics.may_publish(h1, topics.requests("h1"))
    assert topics.may_publish(h1, topics.replies(alice))
    assert topics.may_publish(alice, topics.requests("h1"))
    assert not topics.may_publish(alice, topics.host("h1"))
    assert not topics.may_publish(h1, topics.owner("c1"))


def test_signing_and_verifying_are_cheap(pki: Pki) -> None:
    """Verifying a signed record costs well under a millisecond or two, so every message can."""
    verifier = Verifier.from_file(pki.ca)
    broker = _signer(pki.broker)
    wires = [broker.sign(OWNER, RECORD, session=1.0, seq=i) for i in range(1, 201)]
    start = time.perf_counter()
    for wire in wires:
        verifier.open(OWNER, wire)
    per = (time.perf_counter() - start) / len(wires)
    assert per < 0.005, f"{per * 1000:.2f} ms per record"
