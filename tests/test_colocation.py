"""Replication inside one site (issue 12 point 7): agent and broker on one host and one site
replicate as usual, and a broker refuses a store on the storage of the disks it protects."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from broker.colocation import backing_disks, colocation_problems
from common.config import BrokerConfig
from tests.fixtures_pki import Pki, make_pki
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
    replikant_exe,
    wait_for,
)

SIZE = 4 * MiB


def _broker(pki: Pki, store: Path, agent_toml: Path, **extra: object) -> BrokerConfig:
    tls = pki.broker.tls
    return BrokerConfig.model_validate(
        {
            "broker": {
                "node": "b1",
                "cluster": "c1",
                "store": str(store),
                "host_agent_config": str(agent_toml),
                **extra,
            },
            "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
        }
    )


def _agent_toml(tmp_path: Path, pki: Pki, image: Path) -> Path:
    proc = agent_process(
        tmp_path,
        pki=pki,
        broker_urls=["https://127.0.0.1:1"],
        vms=[VMSpec("vm1", [DiskSpec("d0", image)])],
    )
    return Path(proc.args[-1])


def test_a_store_beside_a_protected_disk_is_refused(tmp_path: Path) -> None:
    """A store on the file system of a disk this host's agent protects stops `replikant broker
    run` with the disk, the path and the fix named; a store on other storage (tmpfs) passes."""
    pki = make_pki(tmp_path / "pki")
    image = make_image(tmp_path / "vm1.img", SIZE)
    agent_toml = _agent_toml(tmp_path, pki, image)
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    (problem,) = colocation_problems(_broker(pki, store, agent_toml))
    assert "disk d0 of vm vm1" in problem
    assert "same file system" in problem
    assert "separate storage" in problem
    elsewhere = Path("/dev/shm") / f"replikant-test-{os.getpid()}-store"
    assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
    assert colocation_problems(_broker(pki, elsewhere, agent_toml)) == []
    assert colocation_problems(_broker(pki, store, agent_toml, allow_shared_storage=True)) == []
    # The daemon itself refuses, before it creates anything.
    conf = tmp_path / "broker.toml"
    tls = pki.broker.tls
    conf.write_text(
        f'[broker]\nnode = "b1"\ncluster = "c1"\nstore = "{store}"\n'
        f'host_agent_config = "{agent_toml}"\n'
        f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
    )
    run = subprocess.run(
        [replikant_exe(), "broker", "run", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode != 0
    assert "disk d0 of vm vm1" in run.stdout + run.stderr
    assert not (store / "store.json").exists()


def test_backing_disks_follow_partitions_and_device_mapper(tmp_path: Path) -> None:
    """A partition counts as its disk and an LVM volume as the disks under it, so a store on
    another volume of the same disk is caught. (A sysfs tree built in tmp_path: making real
    device-mapper volumes here would need disks the test machine does not have.)"""
    sys_block = tmp_path / "sys" / "dev" / "block"
    devices = tmp_path / "sys" / "devices"
    sda = devices / "sda"
    (sda / "sda1").mkdir(parents=True)
    (sda / "sda1" / "partition").write_text("1\n")
    (sda / "sda2").mkdir()
    (sda / "sda2" / "partition").write_text("2\n")
    for name in ("dm-0", "dm-1"):
        (devices / name / "slaves").mkdir(parents=True)
        (devices / name / "slaves" / "sda2").symlink_to(sda / "sda2")
    sys_block.mkdir(parents=True)
    for number, target in (("8:1", sda / "sda1"), ("253:0", devices / "dm-0")):
        (sys_block / number).symlink_to(target)
    (sys_block / "253:1").symlink_to(devices / "dm-1")
    assert backing_disks(os.makedev(8, 1), sys_block) == {"sda"}
    assert backing_disks(os.makedev(253, 0), sys_block) == {"sda"}
    assert backing_disks(os.makedev(253, 1), sys_block) == {"sda"}
    assert backing_disks(os.makedev(0, 27), sys_block) == set()  # tmpfs, NFS: no disk


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_agent_and_broker_in_one_site_replicate_byte_identically(tmp_path: Path) -> None:
    """A real agent and a real broker on this host, both in site dc1, the store apart from the
    image: the initial copy and a later write reach the replica byte for byte."""
    pki = make_pki(tmp_path / "pki")
    store = Path("/dev/shm") / f"replikant-{os.getpid()}-{time.monotonic_ns()}"
    port = free_port()
    bconf = broker_config(tmp_path / "b.toml", pki, store, port)
    bconf.write_text(bconf.read_text().replace('cluster = "c1"', 'cluster = "c1"\nsite = "dc1"'))
    image = make_image(tmp_path / "vm1.img", SIZE, fill=lambda i: bytes([i + 1]) * MiB)
    vm = VMSpec("vm1", [DiskSpec("d0", image)])
    agent = agent_process(tmp_path, pki=pki, broker_urls=[f"https://127.0.0.1:{port}"], vms=[vm])
    aconf = tmp_path / "agent.toml"
    aconf.write_text(aconf.read_text().replace('host = "h1"', 'host = "h1"\nsite = "dc1"'))
    broker = ReplikantProc(["broker", "run", "--config", str(bconf)], tmp_path / "broker.log")
    replica = store / str(vm.uuid) / "d0" / "replica.img"
    broker.start()
    agent.start()
    try:
        await wait_for(
            lambda: replica.exists() and replica.read_bytes() == image.read_bytes(), "copy", 60
        )
        sock = tmp_path / "sock" / "vm1-d0.sock"
        await wait_for(lambda: export_ready(sock, "vm1-d0"), "the export", 20)
        nbd = MiniNBD(sock, "vm1-d0")
        try:
            nbd.write(MiB + 4096, b"same site " * 400, fua=True)
        finally:
            nbd.close()
        await wait_for(lambda: replica.read_bytes() == image.read_bytes(), "the write", 30)
        assert b"same site " in replica.read_bytes()
        meta = (store / str(vm.uuid) / "d0" / "meta.json").read_text()
        assert '"source_site": "dc1"' in meta
        assert agent.stop() == 0
        assert broker.stop() == 0
    finally:
        agent.kill9()
        broker.kill9()
        shutil.rmtree(store, ignore_errors=True)
