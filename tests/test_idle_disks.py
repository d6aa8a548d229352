"""Idle disks ship nothing, yet every cycle makes a VM point (issue 10, points 4 and 6).

A real ``replikant agent run`` protects a VM with a busy and an idle disk, and two VMs with only
an idle disk, at 0.25 s cycles and ships to a real ``replikant broker run``. The idle disks'
batches stop after the initial copy (their ``applied.log`` does not grow, nothing is journaled
or logged at info for them), while the first VM's newest point moves on with every cut
(decision 004, rule 3: the agent's statement that the idle disk is unchanged), every VM's
status lag stays below a second, the two idle VMs' statements share requests (``POST
/v1/current``), and the newest point reads back the busy disk's last write and the idle disk's
bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from common.tls import client_context
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    ReplikantProc,
    VMSpec,
    agent_process,
    broker_config,
    export_ready,
    free_port,
    make_image,
)
from tests.test_multidisk_points import Admin, _wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 8 * MiB
BLOCK = 4096


def _block(k: int) -> bytes:
    return struct.pack(">Q", k) * (BLOCK // 8)


def _writer(sock: Path, stop: threading.Event, last: list[int]) -> None:
    nbd = MiniNBD(sock, "vm1-busy", timeout=10)
    try:
        while not stop.is_set():
            k = last[0] + 1
            nbd.write(0, _block(k), fua=True)
            last[0] = k
            time.sleep(0.01)
    finally:
        nbd.close()


def _applied_lines(path: Path) -> int:
    return len([x for x in path.read_text().splitlines() if x.strip()])


async def _read_point(admin: Admin, point: str, disk: str, length: int) -> bytes:
    made = await admin.json("POST", "/v1/vms/vm1/exports", json={"point": point})
    try:
        e = {x["disk"]: x for x in made["exports"]}[disk]
        nbd = await asyncio.to_thread(MiniNBD, Path(e["socket"]), e["name"])
        try:
            return await asyncio.to_thread(nbd.read, 0, length)
        finally:
            nbd.close()
    finally:
        for x in made["exports"]:
            await admin.json("DELETE", f"/v1/exports/{x['name']}")


async def test_idle_disk_ships_nothing_and_points_keep_coming(tmp_path: Path) -> None:
    """At 0.25 s cycles a VM with one busy and one idle disk gets a new VM point several times
    a second while the idle disk journals no batch, and the newest point reads back right."""
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    url = f"https://127.0.0.1:{bport}"
    broker = ReplikantProc(
        # at debug: each request of statements is one event naming how many VMs it carried
        [
            "--log-level",
            "debug",
            "broker",
            "run",
            "--config",
            str(broker_config(tmp_path / "b.toml", pki, store, bport)),
        ],
        tmp_path / "broker.log",
    )
    idle_image = make_image(tmp_path / "idle.img", SIZE, fill=lambda i: bytes([i % 251 + 1]) * 512)
    vm = VMSpec(
        "vm1",
        [DiskSpec("busy", make_image(tmp_path / "busy.img", SIZE)), DiskSpec("idle", idle_image)],
    )
    quiet = [
        VMSpec(f"still{i}", [DiskSpec("disk0", make_image(tmp_path / f"still{i}.img", MiB))])
        for i in (1, 2)
    ]
    agent = agent_process(
        tmp_path,
        pki=pki,
        broker_urls=[url],
        vms=[vm, *quiet],
        interval=0.25,
        policy_extra="block_size = 4096",
    )
    sock = tmp_path / "sock" / "vm1-busy.sock"
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls)))
    admin = Admin(url, http)
    stop = threading.Event()
    last = [0]
    writing: asyncio.Task[None] | None = None
    broker.start()
    agent.start()
    try:

        async def has_point() -> bool:
            if not await admin.up() or not await asyncio.to_thread(export_ready, sock, "vm1-busy"):
                return False
            docs = (await admin.json("GET", "/v1/status"))["vms"]
            return len(docs) == 3 and all(d["last_point"] is not None for d in docs)

        await _wait("a first VM point", has_point, 40, agent, broker)
        writing = asyncio.create_task(asyncio.to_thread(_writer, sock, stop, last))
        await asyncio.sleep(1.0)  # the idle disk's first delta (completing its copy) is acked
        idle_logs = [store / str(vm.uuid) / "idle" / "applied.log"] + [
            store / str(q.uuid) / "disk0" / "applied.log" for q in quiet
        ]
        idle_batches = [_applied_lines(log) for log in idle_logs]
        infos_before = len(broker.events("batch_journaled"))
        newest: list[int] = []
        lags = []
        started = time.monotonic()
        while time.monotonic() - started < 4.0:
            for doc in (await admin.json("GET", "/v1/status"))["vms"]:
                if doc["name"] == "vm1":
                    newest.append(int(doc["last_point"]["cut_id"]))
                lags.append(doc["lag_seconds"])  # every VM's, the wholly idle ones' too
            await asyncio.sleep(0.5)
        stop.set()
        await writing
        writing = None
        # Points keep coming (cuts every 0.25 s), with the idle disk in each. Not per poll: on
        # a loaded machine one apply may take longer than the half second between two polls.
        assert all(b >= a for a, b in itertools.pairwise(newest)), newest
        assert newest[-1] - newest[0] >= 8, newest
        assert max(lags) < 1.0, lags
        assert [_applied_lines(log) for log in idle_logs] == idle_batches, "idle disks shipped"
        idle_infos = [
            e
            for e in broker.events("batch_journaled")[infos_before:]
            if e.get("disk") != "busy" and e.get("level") == "info"
        ]
        assert not idle_infos, "idle cycles logged at info"
        # The idle VMs cut on one tick and state it in one request, not one each.
        shared = [e["vms"] for e in broker.events("agent_current_noted")]
        assert shared.count(2) + shared.count(3) >= 8, shared
        assert not broker.events("vm_current_noted"), "a statement went per VM"

        async def has_last() -> bool:
            doc = (await admin.json("GET", "/v1/vms/vm1/points"))["points"][0]
            data = await _read_point(admin, doc["id"], "busy", BLOCK)
            return data == _block(last[0])

        await _wait("the last write in the newest point", has_last, 10, agent, broker)
        point = (await admin.json("GET", "/v1/vms/vm1/points"))["points"][0]
        assert await _read_point(admin, point["id"], "idle", SIZE) == idle_image.read_bytes()
        assert agent.stop() == 0
        assert broker.stop() == 0
    finally:
        stop.set()
        if writing is not None:
            await writing
        await http.close()
        agent.kill9()
        broker.kill9()
