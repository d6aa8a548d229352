"""Resident memory per protected 100 GiB disk while idle: ``python bench/agent_memory.py``.

Starts a real broker and the agent twice, once protecting no disk and once protecting ``--disks``
sparse 100 GiB disks (initial copy done, then idle), and reports the agent's RSS difference per
disk (target: at most 5 MB). The agent's shipping process (decision 029: one per agent, started
with the first batch) is reported apart, as the fixed cost it is, and not divided among the
disks. The peer is qemu-nbd serving one such disk: the memory one more served disk costs with
it (a process per export). Hyper-V Replica quotes about 50 MB per VM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from agents.control import read_status

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GiB = 1024**3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _exe() -> str:
    return str(Path(sys.executable).with_name("replikant"))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _agent_rss(
    tmp: Path, tls: dict[str, Path], broker_url: str, disks: int, idle: float
) -> tuple[int, int]:
    """Run the agent with ``disks`` sparse 100 GiB disks until idle; return its RSS and its
    children's (the shipping process) in KiB."""
    run = tmp / f"agent-{disks}"
    run.mkdir()
    lines = [
        "[agent]", 'host = "h1"', f'state_dir = "{run / "state"}"',
        "[tls]", *(f'{k} = "{v}"' for k, v in tls.items()),
        "[nbd]", f'socket_dir = "{run / "s"}"',
        "[broker]", f'urls = ["{broker_url}"]', 'cluster = "c1"',
        "[policies.default]", "interval_seconds = 5",
    ]  # fmt: skip
    for i in range(disks):
        image = run / f"d{i}.img"
        with image.open("wb") as fh:
            fh.truncate(100 * GiB)
        lines += [
            "[[vms]]", f'name = "vm{i}"', f'uuid = "{uuid.uuid4()}"',
            "[[vms.disks]]", 'id = "disk0"', f'image = "{image}"',
        ]  # fmt: skip
    cfg = run / "agent.toml"
    cfg.write_text("\n".join(lines) + "\n")
    log = (run / "agent.log").open("wb")
    proc = subprocess.Popen([_exe(), "agent", "run", "--config", str(cfg)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited; see {run / 'agent.log'}")
            try:
                doc = read_status(run / "s" / "control" / "agent.sock", timeout=2)
                if all(d["initial_sync"]["done"] and d["batches"] >= 2 for d in doc["disks"]):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not finish the initial copies in time")
            time.sleep(0.2)
        time.sleep(idle)
        return _rss_kib(proc.pid), sum(_rss_kib(c) for c in _children(proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _qemu_nbd_rss(tmp: Path) -> int:
    image = tmp / "q.img"
    with image.open("wb") as fh:
        fh.truncate(100 * GiB)
    sock = tmp / "q.sock"
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "raw",
            "-t",
            "-x",
            "disk",
            "-k",
            str(sock),
            "--cache=writeback",
            "--aio=threads",
            str(image),
        ]
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        time.sleep(1.0)
        return _rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--disks", type=int, default=8)
    parser.add_argument("--idle", type=float, default=6.0, help="idle seconds before measuring")
    parser.add_argument("--quick", action="store_true", help="2 disks, 2 s idle")
    args = parser.parse_args()
    if args.quick:
        args.disks, args.idle = min(args.disks, 2), min(args.idle, 2.0)
    from certs.store import CertStore

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        store = CertStore.init(tmp / "pki")
        broker = store.issue_broker("c1", "b1", ips=["127.0.0.1"])
        agent = store.issue_agent("h1", ips=["127.0.0.1"])
        port = _port()
        (tmp / "broker.toml").write_text(
            f'[broker]\nnode = "b1"\ncluster = "c1"\nlisten = "127.0.0.1:{port}"\n'
            f'store = "{tmp / "store"}"\nmin_free_bytes = 0\n[tls]\n'
            f'ca = "{broker.tls.ca}"\ncert = "{broker.tls.cert}"\nkey = "{broker.tls.key}"\n'
        )
        blog = (tmp / "broker.log").open("wb")
        bproc = subprocess.Popen(
            [_exe(), "broker", "run", "--config", str(tmp / "broker.toml")],
            stdout=blog,
            stderr=blog,
        )
        try:
            time.sleep(2.0)
            tls = {"ca": agent.tls.ca, "cert": agent.tls.cert, "key": agent.tls.key}
            url = f"https://127.0.0.1:{port}"
            base, _ = _agent_rss(tmp, tls, url, 0, args.idle)
            full, shipping = _agent_rss(tmp, tls, url, args.disks, args.idle)
        finally:
            bproc.terminate()
            bproc.wait(30)
            blog.close()
        peer = _qemu_nbd_rss(tmp) if shutil.which("qemu-nbd") else 0
    per_disk = (full - base) / args.disks
    print("idle resident memory per protected 100 GiB sparse disk (initial copy done)")
    print(f"  agent with 0 disks:            {base / 1024:8.1f} MiB")
    print(f"  agent with {args.disks} disks:            {full / 1024:8.1f} MiB")
    print(f"  ours per disk:                 {per_disk / 1024:8.2f} MiB   (target <= 5 MB)")
    print(f"  its shipping process:          {shipping / 1024:8.1f} MiB   (one per agent)")
    if peer:
        print(f"  qemu-nbd serving one disk:     {peer / 1024:8.2f} MiB (one process per export)")
        print(f"  ratio ours / qemu-nbd:         {per_disk / peer:8.2f}")
    print("  (reference: Hyper-V Replica quotes about 50 MB per VM)")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"disks": args.disks, "base_kib": base, "full_kib": full, "per_disk_kib": per_disk,
           "shipping_process_kib": shipping, "qemu_nbd_kib": peer}  # fmt: skip
    path = out / f"agent_memory-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
