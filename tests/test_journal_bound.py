"""The journal bound (issue 11): each disk's recovery-point data stays within its bound at every
capture, thinning merges keep every retained point byte-exact, and exports' pins are honoured."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.apply import ReplicaEngine
from broker.pointview import PointView
from broker.retention import Retainer, bound_for, publish
from common.config import BrokerConfig
from tests.support_broker import FakeSource, MiB
from tests.test_broker_store import enable, journal, make_store

HOT = 128 * 1024
TLS = {"ca": "/x/ca.pem", "cert": "/x/c.pem", "key": "/x/k.pem"}


def config(store: Path, **retention: Any) -> BrokerConfig:
    return BrokerConfig.model_validate(
        {"broker": {"node": "b1", "cluster": "c1", "store": str(store)}, "tls": TLS}
        | {"retention": retention}
    )


def on_disk(points_dir: Path) -> int:
    """Bytes of every file in a replica's points folder, partial ones included."""
    return sum(p.stat().st_size for p in points_dir.iterdir())


def test_bound_holds_at_every_capture_and_merged_points_read_exactly(tmp_path: Path) -> None:
    """150 cuts rewriting a hot region of a 4 MiB disk bounded at 100 %, with retention passes
    thinning to one point per minute: the points folder never exceeds the bound (beyond what
    an open export pins, while it is open), and ten random retained points and the exported one
    read equal to the source at their cut."""
    store = make_store(tmp_path)
    src = FakeSource(disk_size=4 * MiB, block_size=64 * 1024, seed=11)
    replica = enable(store, src)
    engine = ReplicaEngine(store, replica, epoch=lambda: 1)
    # Cuts 2 s apart from a minute boundary on; each pass looks from 20 s after the newest
    # cut: the last minute keeps every point, older ones one per minute.
    src._clock = 1_800_000_000 * 10**9
    retainer = Retainer(config(store.root, any_point_minutes=1))
    retainer.configure(engine)
    assert engine.journal_bound == 4 * MiB
    rng = random.Random(5)
    export: PointView | None = None
    peak = 0
    for n in range(150):
        for _ in range(rng.randrange(1, 8)):  # a hot 128 KiB region, rewritten again and again
            src.write(rng.randrange(0, HOT - 8192) // 512 * 512, rng.randbytes(8192))
        journal(store, replica, src.cut().body)
        assert engine.apply_next()
        # Only an open export's pin may hold data beyond the bound, and only what it pins.
        assert engine.over_bound == 0 or export is not None
        bound = engine.journal_bound + engine.over_bound
        assert engine.points.journal_bytes() <= bound
        assert on_disk(replica.points_dir) <= bound
        peak = max(peak, on_disk(replica.points_dir))
        if n == 100:  # an export of the point before this batch, read while replication goes on
            export = engine.open_view(engine.points.points(engine.state())[1].state.key)
        if n == 104:
            assert export is not None
            assert export.read(0, src.disk_size) == src.cuts[export.key[1]].image
            export.close()
            export = None
        if n % 10 == 9:
            retainer.run([engine], src._clock + 20 * 10**9)
            assert on_disk(replica.points_dir) <= engine.journal_bound
    retainer.run([engine], src._clock + 20 * 10**9)
    names = [p.name for p in replica.points_dir.iterdir()]
    merged = [n for n in names if n.split("-")[1] != n.split("-")[2].removesuffix(".dat")]
    assert merged, f"no merged segment among {names}"
    held = [p.state.seq for p in engine.points.points(engine.state()) if not p.latest]
    assert len(held) >= 10
    assert src.cuts[1].seq not in held  # the bound (or the tiers) let the oldest go
    for seq in rng.sample(held, 10):
        with engine.open_view((1, seq)) as view:
            assert view.read(0, src.disk_size) == src.cuts[seq].image, seq
            assert view.read(777, 100_000) == src.cuts[seq].image[777:100_777], seq
    assert peak > engine.journal_bound // 2  # the churn really filled the bound
    engine.close()


def test_pins_alone_over_the_bound_alert_and_clear(tmp_path: Path) -> None:
    """An export of an old point pins its data: replication goes on past the bound by exactly
    what the pin holds, the journal_over_policy alert says so once (with a fix), and it clears
    once the export ends and a pass finds the policy met."""
    store = make_store(tmp_path)
    src = FakeSource(disk_size=2 * MiB, block_size=64 * 1024, seed=3)
    replica = enable(store, src)
    alerts: list[tuple[str, dict[str, Any]]] = []
    engine = ReplicaEngine(
        store, replica, epoch=lambda: 1, alert=lambda e, f: alerts.append((e, f))
    )
    retainer = Retainer(config(store.root, journal_bound=256 * 1024))
    retainer.configure(engine)
    assert engine.journal_bound == 256 * 1024
    src.mutate(4)
    journal(store, replica, src.cut().body)
    engine.apply_next()
    pinned = engine.open_view(engine.state().key)
    for _ in range(12):
        src.mutate(10)
        journal(store, replica, src.cut().body)
        engine.apply_next()
    assert engine.over_bound > 0
    assert engine.points.journal_bytes() > engine.journal_bound
    assert engine.points.oldest() is not None
    assert engine.points.oldest().key == pinned.key  # type: ignore[union-attr]
    assert pinned.read(0, src.disk_size) == src.cuts[1].image
    for _ in range(2):  # raised once, not once per pass
        publish(retainer.run([engine], time.time_ns()), time.time_ns())
    raised = [f for e, f in alerts if e == "alert_raised"]
    assert len(raised) == 1
    (alert,) = raised
    assert alert["condition"] == "journal_over_policy"
    assert alert["vm_name"] == "web1"
    assert alert["oldest_point"].startswith("1-1 ")
    assert alert["fix"]
    assert "exports pin" in alert["message"]
    pinned.close()
    src.write(0, b"x" * 512)
    journal(store, replica, src.cut().body)
    engine.apply_next()
    assert engine.over_bound == 0
    assert engine.points.journal_bytes() <= engine.journal_bound
    publish(retainer.run([engine], time.time_ns()), time.time_ns())  # dropped for room: still
    publish(retainer.run([engine], time.time_ns()), time.time_ns())  # a quiet pass clears it
    assert [e for e, _f in alerts] == ["alert_raised", "alert_cleared"]
    engine.close()


def test_bound_from_policy_bytes_percent_and_per_vm(tmp_path: Path) -> None:
    """journal_bound takes bytes or a percentage of the disk, a [[vms]] entry overrides it, and
    anything else is refused naming the setting and the accepted forms."""
    vm = "6f1c2d3e-0000-4000-8000-000000000001"
    cfg = config(tmp_path, journal_bound="50%")
    assert bound_for(cfg, vm, 64 * MiB) == 32 * MiB
    assert bound_for(config(tmp_path), vm, 64 * MiB) == 64 * MiB
    cfg = BrokerConfig.model_validate(
        cfg.model_dump(mode="json") | {"vms": [{"uuid": vm, "journal_bound": 1000}]}
    )
    assert bound_for(cfg, vm, 64 * MiB) == 1000
    assert bound_for(cfg, "6f1c2d3e-0000-4000-8000-000000000002", 64 * MiB) == 32 * MiB
    with pytest.raises(ValidationError) as info:
        config(tmp_path, journal_bound="5 GB")
    assert "journal_bound" in str(info.value)
    assert '"100%"' in str(info.value)
