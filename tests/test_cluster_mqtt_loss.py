"""An owner that loses MQTT steps down by itself; when MQTT returns a member is elected again and
the deposed owner's record does not come back (real Mosquitto, restarted without persistence)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from common.tls.identities import Identity
from tests.fixtures_pki import make_pki
from tests.support_agent import free_port
from tests.support_cluster import CLUSTER, make_members, watch_owner
from tests.support_mqtt import mosquitto_tls

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]


async def test_owner_steps_down_without_mqtt_and_a_member_is_elected_after(tmp_path: Path) -> None:
    """Mosquitto stopped: the owner steps down within its lease; Mosquitto back: a new owner
    with a higher epoch, and the old record is never re-published."""
    pki = make_pki(tmp_path / "pki")
    mqtt_cert = pki.store.issue_broker(CLUSTER, "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    nodes = [Identity.broker(CLUSTER, "b1"), Identity.broker(CLUSTER, "b2")]
    port = free_port()
    members, _ = make_members(tmp_path, pki, tmp_path / "store", port, 2)
    try:
        async with watch_owner(pki, port) as watch:
            with mosquitto_tls(tmp_path, mqtt_cert, nodes, port=port):
                for m in members:
                    m.start()
                    await m.wait_up()
                _, first = await watch.new_owner(0, 30)
                owner = next(m for m in members if m.node == first.node)
            lost = time.monotonic()
            deadline = lost + 15
            while not owner.events("owner_stepped_down"):
                assert time.monotonic() < deadline, f"the owner never stepped down: {owner.log}"
                await asyncio.sleep(0.05)
            assert time.monotonic() - lost < 5
            (down,) = owner.events("owner_stepped_down")
            assert "not renewed" in str(down["reason"])
            back = len(watch.seen)
            with mosquitto_tls(tmp_path, mqtt_cert, nodes, port=port):
                _, second = await watch.new_owner(first.epoch, 30)
                await asyncio.sleep(1.0)
                after = [rec for _, rec in watch.seen[back:]]
    finally:
        for m in members:
            m.stop()
    assert second.epoch > first.epoch
    assert all(rec.epoch > first.epoch for rec in after), after
