"""Initial replication benchmark: Replikant vs nbdcopy between two qemu-nbd exports over TLS.

    .venv/bin/python bench/broker_initial.py [--quick] [--size-gib 4] [--repeat 3]
                                              [--mode agent|model|both] [--verify] [--keep]
                                              [--profile DIR] [--dir DIR]

One mixed image (program binaries and libraries, text, incompressible data, zero-filled and
unallocated regions) is copied:

- peer: `nbdcopy nbds://src nbds://dst` between two `qemu-nbd` servers with x509 TLS (client
  certificates verified). Bytes on the wire: what crosses the source export's connections (both
  directions), counted by a relay in a second, untimed copy (the timed copy connects directly).
  Timed twice a round: plain (the target), and `--flush` (ends when the copy is on stable
  storage, as ours does: the broker fdatasyncs every batch before it acks);
- ours, `--mode agent` (the default): the real thing end to end. `replikant agent run` protects
  the image (fresh state) and ships it to `replikant broker run` over mTLS; the clock runs from
  the agent's exec to the broker reporting `initial_sync: complete` with everything durable
  applied; the agent connects to the broker directly. Bytes on the wire: a second, untimed run
  through a counting relay in this process (splice(2)), both directions, as for the peer.
  After each run (untimed) the broker's block hashes of the replica must equal the source's.
  `--profile DIR` attaches py-spy to the agent and the broker;
- ours, `--mode model`: the agent's shipping modelled in-process (bench/broker_common.Shipper:
  FULL batches of at most 256 MiB, zstd level 1 in a thread pool, standard asyncio loop) to the
  same real broker, for trying shipping strategies without touching the agent; `--mode both`
  runs all three, interleaved.

``--link veth`` (or ``both``, the default) also runs the agent and nbdcopy over a 1 Gbit/s link
(``--link-rate``): two network namespaces the bench creates, joined by a veth pair shaped with
tbf on both ends (bench/shaped_link.py; needs root). The agent and the source `qemu-nbd` (and
nbdcopy) live in one, the broker and the target `qemu-nbd` in the other; bytes on the wire are
the veth's counters (frames, both directions). The namespaces go away at the end. Each agent
run over the link also prints both processes' CPU seconds, when the data flowed and how much of
the run the link sat below half its rate; ``--profile`` works there too.

Targets: on loopback, time ≤ 1.2× nbdcopy's and bytes ≤ 0.5× nbdcopy's; over the 1 Gbit/s
link, time ≤ 0.6× nbdcopy's over the same link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import (
    REGION,
    Agent,
    Broker,
    DiskSpec,
    GiB,
    MiB,
    Pki,
    Shipper,
    add_workdir_arguments,
    check_free_space,
    children_cpu,
    data_ranges,
    free_port,
    human,
    make_mixed_image,
    make_pki,
    proc_cpu,
    save_result,
    wait_until,
)
from shaped_link import ShapedLink

from common.blockhash import file_block_hashes

FULL_BATCH = 256 * MiB
BLOCK = 64 * 1024
TARGET_TIME = 1.2  # ÷ nbdcopy on loopback
TARGET_BYTES = 0.5
TARGET_LINK_TIME = 0.6  # ÷ nbdcopy over the shaped link


def openssl_pki(root: Path, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """An x509 CA, a server (IP SANs ``server_ips``) and a client certificate in qemu's and
    libnbd's file layout."""
    sans = ",".join(f"IP:{ip}" for ip in server_ips)
    srv = root / "srv"
    cli = root / "cli"
    srv.mkdir(parents=True, exist_ok=True)
    cli.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca_crt = root / "ca-key.pem", root / "ca-cert.pem"
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
        "-days",
        "2",
        "-subj",
        "/CN=bench CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=keyCertSign",
    )
    for name, where, ext in (
        (
            "server",
            srv,
            f"subjectAltName={sans},DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("client", cli, "extendedKeyUsage=clientAuth"),
    ):
        key, csr, crt = where / f"{name}-key.pem", root / f"{name}.csr", where / f"{name}-cert.pem"
        extfile = root / f"{name}.ext"
        extfile.write_text(ext + "\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_crt),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(crt),
            "-days",
            "2",
            "-extfile",
            str(extfile),
        )
        (where / "ca-cert.pem").write_bytes(ca_crt.read_bytes())
    return srv, cli


def qemu_nbd_argv(image: Path, host: str, port: int, srv: Path, *, read_only: bool) -> list[str]:
    """The command line of a qemu-nbd TLS server (client certificates verified) on host:port."""
    cmd = [
        "qemu-nbd",
        "-f",
        "raw",
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=server,dir={srv},verify-peer=on",
        "--tls-creds",
        "tls0",
        "-b",
        host,
        "-p",
        str(port),
        "-x",
        "disk",
        "--shared",
        "8",
        "-t",
    ]
    if read_only:
        cmd.append("-r")
    return [*cmd, str(image)]


def qemu_nbd(image: Path, port: int, srv: Path, *, read_only: bool) -> subprocess.Popen[bytes]:
    """A qemu-nbd TLS server on 127.0.0.1:port."""
    argv = qemu_nbd_argv(image, "127.0.0.1", port, srv, read_only=read_only)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    for _ in range(200):
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("qemu-nbd did not start")


class CountingRelay:
    """A TCP relay to ``127.0.0.1:target_port`` that counts the bytes crossing it each way."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.to_server = 0
        self.to_client = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def total(self) -> int:
        """Bytes relayed in both directions."""
        return self.to_server + self.to_client

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        # splice(2) through a pipe: the bytes never enter this process, so the relay costs
        # little CPU (it runs in the timed copy of ours, on a machine with few cores).
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # fewer, larger splices
        try:
            while n := os.splice(src.fileno(), w, 1 << 20):
                with self._lock:
                    if to_server:
                        self.to_server += n
                    else:
                        self.to_client += n
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def run_nbdcopy(
    src_img: Path, dst_img: Path, size: int, work: Path, *, count_bytes: bool, flush: bool = False
) -> tuple[float, int, float]:
    """Time nbdcopy between two qemu-nbd TLS exports; returns (seconds, wire bytes, CPU s).
    ``flush``: ``nbdcopy --flush``, which ends when the copy is on stable storage, as ours does
    (without it the copy may still sit in the target's page cache when nbdcopy exits)."""
    srv, cli = openssl_pki(work / "x509")
    pa, pb = free_port(), free_port()
    a = qemu_nbd(src_img, pa, srv, read_only=True)
    with dst_img.open("wb") as fh:
        fh.truncate(size)
    b = qemu_nbd(dst_img, pb, srv, read_only=False)

    def copy(src_port: int) -> float:
        start = time.perf_counter()
        subprocess.run(
            [
                "nbdcopy",
                *(["--flush"] if flush else []),
                f"nbds://127.0.0.1:{src_port}/disk?tls-certificates={cli}",
                f"nbds://127.0.0.1:{pb}/disk?tls-certificates={cli}",
            ],
            check=True,
        )
        return time.perf_counter() - start

    try:
        cpu0 = proc_cpu(a.pid) + proc_cpu(b.pid) + children_cpu()
        seconds = copy(pa)
        cpu = proc_cpu(a.pid) + proc_cpu(b.pid) + children_cpu() - cpu0
        wire = 0
        if count_bytes:
            relay = CountingRelay(pa)  # another copy, through the counter, for the bytes only
            copy(relay.port)
            relay.close()
            wire = relay.total
    finally:
        for p in (a, b):
            p.terminate()
            p.wait()
    return seconds, wire, cpu


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Run(NamedTuple):
    """One timed copy."""

    seconds: float
    wire: int
    cpu: float
    replica: Path
    same: bool | None = None  # replica hashes == source hashes (agent mode checks)


def spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` (on-CPU samples, without pausing it) of ``pid`` until it exits."""
    exe = Path(sys.executable).with_name("py-spy")
    cmd = [str(exe), "record", "--pid", str(pid), "--format", "raw", "--nonblocking"]
    return subprocess.Popen(
        [*cmd, "--rate", "250", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def run_agent(
    src_img: Path, size: int, work: Path, pki: Pki, hashes: bytes, profile: Path | None = None
) -> Run:
    """The real agent ships ``src_img`` to the real broker; timed from the agent's exec until
    the broker reports the initial sync complete and applied, the agent connected directly (as
    nbdcopy's timed copy is). The bytes on the wire come from a second, untimed run through a
    counting relay (as nbdcopy's do). ``profile``: a directory for py-spy's collapsed stacks of
    both processes of the timed run (they slow the run down a little)."""
    timed = _agent_run(src_img, work, pki, hashes, counted=False, profile=profile)
    counted = _agent_run(src_img, work, pki, hashes, counted=True, profile=None)
    assert counted.wire is not None
    print(
        f"  agent: {timed.seconds:.2f} s, CPU s: agent {timed.cpu[0]:.1f} broker "
        f"{timed.cpu[1]:.1f}; shipped {human(timed.shipped)}; the untimed run through the "
        f"relay: {human(counted.wire)} counted (its bytes_shipped {human(counted.shipped)})",
        flush=True,
    )
    same = timed.same and counted.same
    return Run(timed.seconds, counted.wire, sum(timed.cpu), counted.replica, same)


class _AgentRun(NamedTuple):
    seconds: float
    cpu: tuple[float, float]  # agent, broker
    shipped: int  # the agent's own bytes_shipped
    same: bool  # replica hashes == source hashes
    replica: Path  # the next run's start removes it
    wire: int | None = None  # counted by the relay (counted runs only)


def _agent_run(
    src_img: Path, work: Path, pki: Pki, hashes: bytes, *, counted: bool, profile: Path | None
) -> _AgentRun:
    run = work / "agent-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    broker = Broker(run, pki, run / "store")
    broker.start()
    relay = CountingRelay(broker.port) if counted else None
    disk = DiskSpec("bench", src_img)
    port = relay.port if relay is not None else broker.port
    agent = Agent(run, pki, f"https://127.0.0.1:{port}", [disk], interval=1.0)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        assert broker.proc is not None
        cpu0 = proc_cpu(broker.proc.pid)
        agent.start()
        spies = _spies(profile, agent.pid, broker.proc.pid)
        wait_until(
            "the initial sync", lambda: broker.synced(disk.vm_uuid, disk.disk_id), 3600, 0.05
        )
        seconds = time.perf_counter() - agent.started
        cpu = (proc_cpu(agent.pid), proc_cpu(broker.proc.pid) - cpu0)
        shipped = sum(d["bytes_shipped"] for d in agent.status()["disks"])
        remote = broker_hashes(broker, disk)
    finally:
        agent.stop()
        broker.stop()
        if relay is not None:
            relay.close()
        for proc in spies:
            proc.wait(60)
    replica = run / "store" / str(disk.vm_uuid) / disk.disk_id / "replica.img"
    wire = relay.total if relay is not None else None
    return _AgentRun(seconds, cpu, shipped, remote == hashes, replica, wire)


def broker_hashes(broker: Broker, disk: DiskSpec) -> bytes:
    """The replica's block hashes, as the broker computes them (``GET .../hashes``)."""
    return broker.get(f"/v1/vms/{disk.vm_uuid}/hashes?disk={disk.disk_id}&block_size={BLOCK}")


async def run_model(src_img: Path, size: int, work: Path, pki: Pki) -> Run:
    """Time the modelled shipping until applied."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    broker = Broker(work, pki, store)
    url = broker.start()
    vm = uuid.uuid4()
    try:
        async with Shipper(
            url,
            pki.agent,
            vm_uuid=vm,
            disk_id="disk0",
            disk_size=size,
            block_size=BLOCK,
            threads=2,
        ) as ship:
            await ship.enable()
            fd = os.open(src_img, os.O_RDONLY)
            try:
                assert broker.proc is not None
                cpu0 = proc_cpu(broker.proc.pid) + _self_cpu()
                start = time.perf_counter()
                ranges = data_ranges(fd, size)
                extents = ship.plan(fd, ranges)
                seq = 0
                batch: list[tuple[int, int]] = []
                budget = 0
                for ext in extents:
                    batch.append(ext)
                    budget += ext[1]
                    if budget >= FULL_BATCH:
                        seq += 1
                        await ship.ship(fd, batch, seq, full=True)
                        batch, budget = [], 0
                if batch:
                    seq += 1
                    await ship.ship(fd, batch, seq, full=True)
                seq += 1
                await ship.ship(fd, [], seq, full=False)  # the first delta: sync complete
                await ship.wait_applied(seq)
                seconds = time.perf_counter() - start
                cpu = proc_cpu(broker.proc.pid) + _self_cpu() - cpu0
                state = await ship.state()
                assert state["initial_sync"] == "complete", state
            finally:
                os.close(fd)
            wire = ship.body_bytes
    finally:
        broker.stop()
    return Run(seconds, wire, cpu, store / str(vm) / "disk0" / "replica.img")


def nbdcopy_link(
    link: ShapedLink, src_img: Path, dst_img: Path, size: int, work: Path, *, flush: bool
) -> Run:
    """nbdcopy in the source namespace from its local qemu-nbd to the target's across the link;
    timed, ``flush``: with ``--flush`` (the broker acks only what is on stable storage)."""
    srv, cli = openssl_pki(work / "x509-link", (link.addr["src"], link.addr["dst"]))
    with dst_img.open("wb") as fh:
        fh.truncate(size)
    pa, pb = free_port(), free_port()
    procs = [
        subprocess.Popen(
            link.argv("src", qemu_nbd_argv(src_img, link.addr["src"], pa, srv, read_only=True)),
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            link.argv("dst", qemu_nbd_argv(dst_img, link.addr["dst"], pb, srv, read_only=False)),
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        link.wait_listening("src", pa)
        link.wait_listening("dst", pb)
        wire0, start = link.wire_bytes(), time.perf_counter()
        subprocess.run(
            link.argv(
                "src",
                [
                    "nbdcopy",
                    *(["--flush"] if flush else []),
                    f"nbds://{link.addr['src']}:{pa}/disk?tls-certificates={cli}",
                    f"nbds://{link.addr['dst']}:{pb}/disk?tls-certificates={cli}",
                ],
            ),
            check=True,
        )
        seconds = time.perf_counter() - start
        wire = link.wire_bytes() - wire0
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    return Run(seconds, wire, 0.0, dst_img)


def agent_link(
    link: ShapedLink,
    src_img: Path,
    size: int,
    work: Path,
    hashes: bytes,
    profile: Path | None = None,
) -> Run:
    """The agent in the source namespace ships to the broker in the target's, across the link;
    timed from the agent's exec until a non-FULL batch (the one that completes the sync, after
    every FULL one) is in the replica's applied.log (the bench cannot reach the broker's HTTPS
    from outside its namespace; the file says the same). Also prints both processes' CPU
    seconds and how much of the run the link sat below half its rate (the agent or the broker,
    not the link, set the pace then)."""
    run = work / "agent-link"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    pki = make_pki(run / "pki", broker_ip=link.addr["dst"])
    broker = Broker(run, pki, run / "store", netns=link.ns["dst"], host=link.addr["dst"])
    broker.start()
    disk = DiskSpec("bench", src_img)
    url = f"https://{link.addr['dst']}:{broker.port}"
    agent = Agent(run, pki, url, [disk], interval=1.0, netns=link.ns["src"])
    log = run / "store" / str(disk.vm_uuid) / disk.disk_id / "applied.log"
    samples: list[tuple[float, int]] = []

    def synced() -> bool:
        samples.append((time.perf_counter(), link.wire_bytes()))
        return log.exists() and any(
            not r["full"] for r in broker.applied_log(disk.vm_uuid, "disk0")
        )

    spies: list[subprocess.Popen[bytes]] = []
    try:
        assert broker.proc is not None
        broker_cpu0 = proc_cpu(broker.proc.pid)
        wire0 = link.wire_bytes()
        agent.start()
        spies = _spies(profile, agent.pid, broker.proc.pid)
        wait_until("the initial sync over the link", synced, 3600, 0.05)
        seconds = time.perf_counter() - agent.started
        wire = link.wire_bytes() - wire0
        cpu = (proc_cpu(agent.pid), proc_cpu(broker.proc.pid) - broker_cpu0)
    finally:
        agent.stop()
        broker.stop()
        for proc in spies:
            proc.wait(60)
    replica = log.parent / "replica.img"
    same = file_block_hashes(str(replica), block_size=BLOCK) == hashes
    print(
        f"  agent over the link: {seconds:.2f} s, {human(wire)} on the wire; CPU s: agent "
        f"{cpu[0]:.1f} broker {cpu[1]:.1f}; link below half its rate "
        f"{_slow_share(samples, link.rate):.0%} of the time; data flowed from "
        f"{_flow(samples, wire0, 0.01, agent.started):.2f} s to "
        f"{_flow(samples, wire0, 0.99, agent.started):.2f} s",
        flush=True,
    )
    return Run(seconds, wire, sum(cpu), replica, same)


def _spies(profile: Path | None, agent: int, broker: int) -> list[subprocess.Popen[bytes]]:
    """py-spy recorders of the agent and the broker into ``profile``, if asked for."""
    if profile is None:
        return []
    profile.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    return [
        spy(agent, profile / f"agent-{stamp}.txt"),
        spy(broker, profile / f"broker-{stamp}.txt"),
    ]


def _flow(samples: list[tuple[float, int]], wire0: int, share: float, start: float) -> float:
    """Seconds after ``start`` when ``share`` of the run's bytes had crossed the link."""
    last = samples[-1][1] - wire0
    return next(t for t, b in samples if b - wire0 >= share * last) - start


def _slow_share(samples: list[tuple[float, int]], rate: str) -> float:
    """Share of the sampled time the link carried less than half of ``rate`` (tc units)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    bps = next(float(rate[: -len(u)]) * m for u, m in units.items() if rate.endswith(u)) / 8
    slow = total = 0.0
    for (t0, b0), (t1, b1) in itertools.pairwise(samples):
        total += t1 - t0
        if (b1 - b0) < 0.5 * bps * (t1 - t0):
            slow += t1 - t0
    return slow / total if total else 0.0


def measure_link(
    args: argparse.Namespace, src: Path, size: int, work: Path, hashes: bytes
) -> dict[str, object]:
    """Alternate nbdcopy and the agent over a shaped veth link; print and return the figures."""
    runs: dict[str, list[Run]] = {"nbdcopy": [], "nbdcopy-flush": [], "agent": []}
    with ShapedLink(args.link_rate) as link:
        for i in range(args.repeat):
            order = ("nbdcopy", "nbdcopy-flush", "agent")
            for side in order[i % 3 :] + order[: i % 3]:
                if side == "agent":
                    r = agent_link(link, src, size, work, hashes, args.profile)
                else:
                    flush = side == "nbdcopy-flush"
                    r = nbdcopy_link(link, src, work / "nbdcopy-link.img", size, work, flush=flush)
                    print(f"  {side} over the link: {r.seconds:.2f} s, "
                          f"{human(r.wire)} on the wire", flush=True)  # fmt: skip
                runs[side].append(r)
                r.replica.unlink(missing_ok=True)
    sec = {k: statistics.median(r.seconds for r in v) for k, v in runs.items()}
    wire = {k: statistics.median(r.wire for r in v) for k, v in runs.items()}
    ratio = sec["agent"] / sec["nbdcopy"]
    same = all(r.same for r in runs["agent"])
    print(
        f"\nover a {args.link_rate} veth link (median of {args.repeat}): agent "
        f"{sec['agent']:.2f} s ({human(wire['agent'])}), nbdcopy {sec['nbdcopy']:.2f} s "
        f"({human(wire['nbdcopy'])}), nbdcopy --flush {sec['nbdcopy-flush']:.2f} s; time ratio "
        f"{ratio:.2f} (target ≤ {TARGET_LINK_TIME}: "
        f"{'ok' if ratio <= TARGET_LINK_TIME else 'MISS'};"
        f" vs --flush {sec['agent'] / sec['nbdcopy-flush']:.2f}), bytes ratio "
        f"{wire['agent'] / wire['nbdcopy']:.2f}; replica hashes == source: {same}"
    )
    return {
        "rate": args.link_rate,
        "seconds": sec,
        "wire_bytes": wire,
        "time_ratio": ratio,
        "time_ratio_vs_flush": sec["agent"] / sec["nbdcopy-flush"],
        "replica_matches": same,
        "runs": {k: [r.seconds for r in v] for k, v in runs.items()},
    }


def run(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    size = int(args.size_gib * GiB) // REGION * REGION
    # source + nbdcopy target + replica (+ the model's replica), and room to spare
    check_free_space(work.parent, 4 * size + 2 * GiB)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        measure(args, work, size)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path, size: int) -> None:
    src = work / "source.img"
    print(f"building a {human(size)} mixed image in {work} ...", flush=True)
    counts = make_mixed_image(src, size, random.Random(7))
    fd = os.open(src, os.O_RDONLY)
    allocated = sum(n for _, n in data_ranges(fd, size))
    os.close(fd)
    print(f"regions of 64 MiB: {counts}; allocated {human(allocated)}", flush=True)
    hashes = file_block_hashes(str(src), block_size=BLOCK)  # also warms the page cache
    if args.link == "veth":
        doc: dict[str, object] = {"size_bytes": size, "allocated_bytes": allocated}
        doc["link"] = measure_link(args, src, size, work, hashes)
        print(f"results: {save_result('broker_initial', doc)}")
        return
    pki = make_pki(work / "pki")
    modes = ["agent", "model"] if args.mode == "both" else [args.mode]
    runs: dict[str, list[Run]] = {"nbdcopy": [], "nbdcopy-flush": [], **{m: [] for m in modes}}
    target = work / "nbdcopy-target.img"
    for i in range(args.repeat):
        # Interleaved, so that load from anything else on the machine hits all alike.
        t, w, c = run_nbdcopy(src, target, size, work, count_bytes=i == 0)
        runs["nbdcopy"].append(Run(t, w, c, target))
        tf, _, cf = run_nbdcopy(src, target, size, work, count_bytes=False, flush=True)
        runs["nbdcopy-flush"].append(Run(tf, w, cf, target))
        print(f"  nbdcopy: {t:.2f} s, with --flush {tf:.2f} s", flush=True)
        if "agent" in modes:
            runs["agent"].append(run_agent(src, size, work, pki, hashes, args.profile))
        if "model" in modes:
            runs["model"].append(asyncio.run(run_model(src, size, work, pki)))
            print(f"  model: {runs['model'][-1].seconds:.2f} s", flush=True)
        if not args.verify:  # the next copies should not pay for writing these back
            for name in modes:
                runs[name][-1].replica.unlink(missing_ok=True)
    med = {
        name: Run(
            statistics.median(r.seconds for r in rs),
            max(r.wire for r in rs),  # the peer counts bytes in its first run only
            statistics.median(r.cpu for r in rs),
            rs[-1].replica,
            all(r.same for r in rs) if rs[0].same is not None else None,
        )
        for name, rs in runs.items()
    }
    peer = med["nbdcopy"]
    print(f"\ninitial replication of a {human(size)} mixed image (median of {args.repeat})")
    print(f"{'':<14}{'seconds':>10}{'wire':>14}{'MiB/s':>9}{'CPU s':>8}  runs")
    for name, m in med.items():
        each = " ".join(f"{r.seconds:.1f}" for r in runs[name])
        print(
            f"{name:<14}{m.seconds:>10.2f}{human(m.wire):>14}{size / MiB / m.seconds:>9.0f}"
            f"{m.cpu:>8.1f}  {each}"
        )
    doc = {"size_bytes": size, "allocated_bytes": allocated, "regions": counts}
    for name, m in med.items():
        entry: dict[str, object] = {
            "seconds": m.seconds,
            "wire_bytes": m.wire,
            "cpu_seconds": m.cpu,
            "runs": [[r.seconds, r.cpu] for r in runs[name]],
        }
        doc[name] = entry
        if name.startswith("nbdcopy"):
            continue
        rt, rw = m.seconds / peer.seconds, m.wire / max(peer.wire, 1)
        rf = m.seconds / med["nbdcopy-flush"].seconds
        entry |= {
            "time_ratio": rt,
            "time_ratio_vs_flush": rf,
            "bytes_ratio": rw,
            "replica_matches": m.same,
        }
        print(
            f"{name + ' ratio':<16}time {rt:.2f} (target ≤ {TARGET_TIME}: "
            f"{'ok' if rt <= TARGET_TIME else 'MISS'};"
            f" vs nbdcopy --flush {rf:.2f})"
            f"   bytes {rw:.2f} (target ≤ {TARGET_BYTES}: {'ok' if rw <= TARGET_BYTES else 'MISS'})"
        )
    if med.get("agent") is not None:
        print(f"agent replica hashes == source hashes: {med['agent'].same}")
    if args.link in ("veth", "both"):
        doc["link"] = measure_link(args, src, size, work, hashes)
    doc["load_average"] = os.getloadavg()
    print(f"results: {save_result('broker_initial', doc)}")
    if args.verify:
        import filecmp

        for name, m in med.items():
            print(f"{name} target == source: {filecmp.cmp(src, m.replica, shallow=False)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="1 GiB, 2 runs")
    parser.add_argument("--mode", choices=["agent", "model", "both"], default="agent")
    parser.add_argument("--verify", action="store_true", help="also compare the files byte-wise")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs (median)")
    add_workdir_arguments(parser, "initial")
    parser.add_argument(
        "--profile", type=Path, help="write py-spy stacks of the agent and broker here"
    )
    parser.add_argument(
        "--link",
        choices=["loopback", "veth", "both"],
        default="both",
        help="loopback only, the shaped veth link only, or both (the link needs root)",
    )
    parser.add_argument("--link-rate", default="1gbit", help="tbf rate of the veth link")
    args = parser.parse_args()
    if args.quick:
        args.size_gib, args.repeat = min(args.size_gib, 1.0), min(args.repeat, 2)
    if args.link != "loopback" and os.geteuid() != 0:
        parser.error("--link veth/both creates network namespaces: run as root or --link loopback")
    run(args)


if __name__ == "__main__":
    main()
