"""Initial replication benchmark: Replikant vs nbdcopy between two qemu-nbd exports over TLS.

    .venv/bin/python bench/broker_initial.py [--size-gib 4] [--dir DIR] [--verify]

One mixed image (program binaries and libraries, text, incompressible data, zero-filled and
unallocated regions) is copied:

- peer: `nbdcopy nbds://src nbds://dst` between two `qemu-nbd` servers with x509 TLS (client
  certificates verified), bytes on the wire measured as what the source qemu-nbd wrote to its
  socket;
- ours: FULL batches of at most 256 MiB of allocated data, shipped like the agent ships them
  (holes skipped, zero blocks as ZERO extents, zstd level 1 compressed in a thread pool) to a real
  `replikant broker run` over mTLS, then one delta batch that completes the sync; the clock stops
  when the broker has *applied* everything (journaled, verified, in the replica image). Bytes on
  the wire: the HTTP bodies.

Targets: time ≤ 1.5× nbdcopy's, bytes ≤ 0.5× nbdcopy's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import (
    Broker,
    GiB,
    MiB,
    Shipper,
    data_ranges,
    free_port,
    human,
    make_pki,
    proc_cpu,
    save_result,
)

REGION = 64 * MiB
FULL_BATCH = 256 * MiB
BLOCK = 64 * 1024


def corpus(paths: list[str], limit: int, suffixes: tuple[str, ...] | None = None) -> bytes:
    """Up to ``limit`` bytes of real files under ``paths``."""
    out = bytearray()
    for root in paths:
        for dirpath, _dirs, files in os.walk(root):
            for name in sorted(files):
                if suffixes and not name.endswith(suffixes):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    with open(p, "rb") as fh:
                        out += fh.read(8 * MiB)
                except OSError:
                    continue
                if len(out) >= limit:
                    return bytes(out[:limit])
    return bytes(out)


def make_mixed_image(path: Path, size: int, rng: random.Random) -> dict[str, int]:
    """Regions of 64 MiB: 30 % binaries, 30 % text, 10 % random, 15 % zero-filled, 15 % holes."""
    binaries = corpus(["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"], 96 * MiB)
    text = corpus(
        ["/usr/share/doc", "/usr/lib/python3", str(Path(sys.prefix) / "lib")],
        96 * MiB,
        (".py", ".txt", ".md", "copyright", ".html", ".rst", ".c", ".h", ".json"),
    )
    kinds = ["bin"] * 30 + ["text"] * 30 + ["random"] * 10 + ["zero"] * 15 + ["hole"] * 15
    counts: dict[str, int] = {}
    with path.open("wb") as fh:
        fh.truncate(size)
        for off in range(0, size, REGION):
            kind = rng.choice(kinds)
            counts[kind] = counts.get(kind, 0) + 1
            n = min(REGION, size - off)
            if kind == "hole":
                continue
            fh.seek(off)
            if kind == "zero":
                fh.write(bytes(n))
            elif kind == "random":
                fh.write(rng.randbytes(n))
            else:
                src = binaries if kind == "bin" else text
                start = rng.randrange(0, max(1, len(src) - n)) if len(src) > n else 0
                piece = src[start : start + n]
                while len(piece) < n:
                    piece += src[: n - len(piece)]
                fh.write(piece)
    return counts


def openssl_pki(root: Path) -> tuple[Path, Path]:
    """An x509 CA, a server and a client certificate in qemu's and libnbd's file layout."""
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
        ("server", srv, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
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


def qemu_nbd(image: Path, port: int, srv: Path, *, read_only: bool) -> subprocess.Popen[bytes]:
    """A qemu-nbd TLS server on 127.0.0.1:port."""
    cmd = [
        "qemu-nbd",
        "-f",
        "raw",
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=server,dir={srv},verify-peer=on",
        "--tls-creds",
        "tls0",
        "-b",
        "127.0.0.1",
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
    proc = subprocess.Popen([*cmd, str(image)], stderr=subprocess.PIPE)
    for _ in range(200):
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("qemu-nbd did not start")


class CountingRelay:
    """A TCP relay that counts the bytes the server sends (only for the bytes measurement: the
    timed nbdcopy run connects directly)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server_bytes = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 18):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.server_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def run_nbdcopy(
    src_img: Path, dst_img: Path, size: int, work: Path, *, count_bytes: bool
) -> tuple[float, int, float]:
    """Time nbdcopy between two qemu-nbd TLS exports; returns (seconds, wire bytes, CPU s)."""
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
                f"nbds://127.0.0.1:{src_port}/disk?tls-certificates={cli}",
                f"nbds://127.0.0.1:{pb}/disk?tls-certificates={cli}",
            ],
            check=True,
        )
        return time.perf_counter() - start

    try:
        cpu0 = proc_cpu(a.pid) + proc_cpu(b.pid) + _children_cpu()
        seconds = copy(pa)
        cpu = proc_cpu(a.pid) + proc_cpu(b.pid) + _children_cpu() - cpu0
        wire = 0
        if count_bytes:
            relay = CountingRelay(pa)  # another copy, through the counter, for the bytes only
            copy(relay.port)
            relay.close()
            wire = relay.server_bytes
    finally:
        for p in (a, b):
            p.terminate()
            p.wait()
    return seconds, wire, cpu


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_ours(src_img: Path, size: int, work: Path) -> tuple[float, int, Path, float]:
    """Time our initial replication until applied; returns (seconds, wire, replica, CPU s)."""
    pki = make_pki(work / "pki")
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
    return seconds, wire, store / str(vm) / "disk0" / "replica.img", cpu


def run(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = int(args.size_gib * GiB) // REGION * REGION
    src = work / "source.img"
    print(f"building a {human(size)} mixed image in {work} ...", flush=True)
    counts = make_mixed_image(src, size, random.Random(7))
    allocated = sum(n for _, n in data_ranges(os.open(src, os.O_RDONLY), size))
    print(f"regions of 64 MiB: {counts}; allocated {human(allocated)}", flush=True)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    peer_runs: list[tuple[float, float]] = []
    ours_runs: list[tuple[float, float]] = []
    w_peer = w_ours = 0
    replica = src
    for i in range(args.repeat):
        # Interleaved, so that load from anything else on the machine hits both alike.
        t, w, c = run_nbdcopy(src, work / "nbdcopy-target.img", size, work, count_bytes=i == 0)
        peer_runs.append((t, c))
        w_peer = w or w_peer
        t, w_ours, replica, c = asyncio.run(run_ours(src, size, work))
        ours_runs.append((t, c))
    t_peer = statistics.median(t for t, _ in peer_runs)
    t_ours = statistics.median(t for t, _ in ours_runs)
    c_peer = statistics.median(c for _, c in peer_runs)
    c_ours = statistics.median(c for _, c in ours_runs)
    print(f"\ninitial replication of a {human(size)} mixed image (median of {args.repeat})")
    print(f"{'':<10}{'seconds':>10}{'wire':>14}{'MiB/s':>9}{'CPU s':>8}  runs")
    for name, t, w, c, runs in (
        ("nbdcopy", t_peer, w_peer, c_peer, peer_runs),
        ("replikant", t_ours, w_ours, c_ours, ours_runs),
    ):
        each = " ".join(f"{x:.1f}" for x, _ in runs)
        print(f"{name:<10}{t:>10.2f}{human(w):>14}{size / MiB / t:>9.0f}{c:>8.1f}  {each}")
    rt, rw = t_ours / t_peer, w_ours / max(w_peer, 1)
    print(
        f"ratio     time {rt:.2f} (target ≤ 1.50: {'ok' if rt <= 1.5 else 'MISS'})   "
        f"bytes {rw:.2f} (target ≤ 0.50: {'ok' if rw <= 0.5 else 'MISS'})"
    )
    saved = save_result(
        "broker_initial",
        {
            "size_bytes": size,
            "allocated_bytes": allocated,
            "regions": counts,
            "nbdcopy": {
                "seconds": t_peer,
                "wire_bytes": w_peer,
                "cpu_seconds": c_peer,
                "runs": peer_runs,
            },
            "replikant": {
                "seconds": t_ours,
                "wire_bytes": w_ours,
                "cpu_seconds": c_ours,
                "runs": ours_runs,
            },
            "time_ratio": rt,
            "bytes_ratio": rw,
        },
    )
    print(f"results: {saved}")
    if args.verify:
        import filecmp

        print(f"replica == source: {filecmp.cmp(src, replica, shallow=False)}")
        print(
            f"nbdcopy target == source: "
            f"{filecmp.cmp(src, work / 'nbdcopy-target.img', shallow=False)}"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--dir", default="/var/tmp/replikant-bench-initial")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs (median)")
    parser.add_argument("--keep", action="store_true")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
