"""One simulated cluster member for tests/test_placement_sim.py, run as its own process.

It runs the broker's real control-plane code (``broker.membership.Membership``, the placement
rounds of ``broker.placing.ClusterPlacement`` over ``broker.placements.PlacementBook`` on the
shared store) on a real MQTT server over mutual TLS with signed records, without HTTPS ingest
or appliers: 1,000 VMs x 3 full brokers (an engine each) would not fit the suite's time budget,
and placement is what is simulated here.
``python -m tests.sim_member STORE PORT CLUSTER NODE CA CERT KEY [--owner]`` prints ``ready``
once connected and runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from broker.membership import Membership
from broker.placement import Placer
from broker.placements import PlacementBook
from broker.placing import ClusterPlacement
from broker.store import Store
from common import topics
from common.config import TLSFiles
from common.mqtt import MQTTLink

HEARTBEAT = 1.0
ROUND = 0.5


async def main(argv: list[str]) -> None:
    """Run one member until killed."""
    root, port, cluster, node, ca, cert, key = argv[:7]
    owner = "--owner" in argv
    store = Store(Path(root))
    epoch = store.claim_next_epoch(node) if owner else 0
    book = PlacementBook(store, node)
    store.vm_fence = book.check
    # Signed and checked like a broker's own link: the message sizes are the real ones.
    link = MQTTLink.for_daemon(
        f"mqtts://127.0.0.1:{port}",
        client_id=f"sim-{node}",
        tls=TLSFiles(ca=Path(ca), cert=Path(cert), key=Path(key)),
        use_tls=True,
    )
    url = f"https://sim-{node}.invalid:8443"
    membership = Membership(
        link,
        node=node,
        cluster=cluster,
        site="recovery",
        url=url,
        epoch=lambda: epoch,
        snapshot=list,
        interval=HEARTBEAT,
    )
    link.set_will(topics.member(cluster, node), membership.member_record(online=False))

    def owner_epoch() -> int | None:
        return epoch if owner and store.stored_epoch() == epoch else None

    placing = ClusterPlacement(
        link,
        book,
        cluster=cluster,
        url=url,
        owner_epoch=owner_epoch,
        placer=Placer(),
        interval=ROUND,
    )
    tasks = [asyncio.create_task(t) for t in (link.run(), membership.run())]
    await link.wait_connected()
    print("ready", flush=True)
    await placing.run()
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
