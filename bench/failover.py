"""Failover timing and reverse-replication bytes in the two-site lab, against issue 13's targets.

    .venv/bin/python bench/failover.py [--vms 20] [--singles 5] [--rounds 2] [--dir DIR] [--keep]

Real daemons (`replikant lab up`: both sites, mTLS, MQTT) and real qemu guests (the test kernel
and busybox initramfs of :mod:`tests.support_guest`, TCG or KVM as the driver finds). Two labs:

1. ``--singles`` VMs, each with a guest at both sites. Planned failover of an idle guest
   (``--rounds`` times, there and back): the command's wall time minus the source guest's
   shutdown, which is reported apart (target ≤ 10 s). Then a write at the primary that may not
   reach the replica, kill -9 of the whole primary site, and an unplanned failover of each VM one
   after the other: command to guest process started, per VM (target ≤ 5 s). Then random writes
   at the recovery site, commit, the old site restarted (FENCED) and `reverse` by selector: bytes
   shipped against the bytes in the 64 KiB blocks that differ between the two images (target
   ≤ 1.1×).
2. ``--vms`` VMs with guests at the recovery site: kill -9 of the primary site, one `failover
   unplanned --selector tier=demo` for all of them (target ≤ 15 s), each VM's own time to its
   guest started from the same document.

"Command to guest started" is the command's wall time from launch to exit (its last step starts
the guest, and the exit waits for nothing else but the marker's removal): an upper bound. Each
figure is printed as a ratio to its target with the absolute values and percentiles. Results:
``bench/results/failover-*.json``. Not a test: the suite runs its parts (tests/test_bench_parts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_common import add_workdir_arguments, cleanup, save_result
from broker_lag import pct

from agents.hypervisor.qemu import kvm_usable
from tests.support_guest import GuestImage, guest_image, wait_console

REPLIKANT = str(Path(sys.executable).with_name("replikant"))
BLOCK = 64 * 1024
TARGETS = {
    "unplanned_one_s": 5.0,
    "unplanned_selector_s": 15.0,
    "planned_idle_s": 10.0,
    "reverse_ratio": 1.1,
}
SHUTDOWN_STEP = "guest shut down"
STARTED_STEP = "guest started"


# -- the pure parts (tests/test_bench_parts.py)
def figures(values: list[float]) -> dict[str, float]:
    """n, min, p50, p90, max of ``values``."""
    return {
        "n": float(len(values)),
        "min": min(values, default=float("nan")),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "max": max(values, default=float("nan")),
    }


def step_seconds(steps: list[dict[str, Any]], suffix: str) -> float | None:
    """The elapsed time of the first step whose name ends with ``suffix``."""
    return next((float(s["elapsed_seconds"]) for s in steps if s["step"].endswith(suffix)), None)


def shutdown_seconds(steps: list[dict[str, Any]]) -> float:
    """How long the source guest's shutdown took (the driver's ``seconds``; 0 without one)."""
    return next(
        (float(s.get("seconds", 0.0)) for s in steps if s["step"].endswith(SHUTDOWN_STEP)), 0.0
    )


def shipped_bytes(steps: list[dict[str, Any]]) -> int:
    """What a `reverse` shipped, from its steps."""
    return sum(int(s["bytes_shipped"]) for s in steps if "bytes_shipped" in s)


def differing_bytes(a: Path, b: Path, block: int = BLOCK) -> int:
    """Bytes in the ``block``-sized blocks where two images differ."""
    n = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if not x and not y:
                return n
            n += max(len(x), len(y)) if x != y else 0


def verdicts(doc: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, target, holds) for each target; a time target holds on its p90."""
    rows = [
        ("unplanned, per VM (p90)", doc["unplanned_one"]["p90"], TARGETS["unplanned_one_s"]),
        (
            "unplanned, VMs by selector",
            doc["unplanned_selector_s"],
            TARGETS["unplanned_selector_s"],
        ),
        ("planned, idle guest (p90)", doc["planned"]["p90"], TARGETS["planned_idle_s"]),
        ("reverse shipped / differing", doc["reverse_ratio"], TARGETS["reverse_ratio"]),
    ]
    return [(what, got, want, got <= want) for what, got, want in rows]


# -- the lab
def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """One `replikant` command."""
    return subprocess.run(
        [REPLIKANT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def timed_json(config: str, *args: str) -> tuple[float, dict[str, Any]]:
    """Run a failover command with ``--json``: (its wall seconds, its document)."""
    t0 = time.monotonic()
    res = cli("--config", config, *args, "--json")
    took = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"`replikant {' '.join(args)}` failed:\n{res.stdout}{res.stderr}")
    doc: dict[str, Any] = json.loads(res.stdout)
    return took, doc


def lab_up(root: Path, vms: int, guest: GuestImage, *, both_sites: bool) -> dict[str, Any]:
    """A two-site lab of ``vms`` VMs (one 8 MiB disk each is the lab's smallest) whose guests
    are configured at the recovery site (and the primary's with ``both_sites``)."""
    cleanup(root)
    up = cli("lab", "up", "--dir", str(root), "--vms", str(vms), "--disk-mib", "8",
             "--interval", "0.5", "--detach")  # fmt: skip
    if up.returncode != 0:
        raise SystemExit(f"lab up failed: {up.stderr}")
    configs = [root / "agent-recovery.toml"] + ([root / "agent.toml"] if both_sites else [])
    for config in configs:
        doc = tomllib.loads(config.read_text())
        for vm in doc["vms"]:
            vm["hypervisor"] = guest.settings(op="idle")
        config.write_text(tomli_w.dumps(doc))
    restart_agents(root)
    lab: dict[str, Any] = json.loads((root / "lab.json").read_text())
    lab["root"] = str(root)
    return lab


def restart_agents(root: Path) -> None:
    """Stop both agents and start each site again (they read their new guest sections)."""
    pids = json.loads((root / "lab.json").read_text())["processes"]
    for name in ("agent", "agent-recovery"):
        os.kill(pids[name], signal.SIGTERM)
    for name in ("agent", "agent-recovery"):
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pids[name]}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    for site in ("primary", "recovery"):
        res = cli("lab", "start", "--dir", str(root), "--site", site)
        if res.returncode != 0:
            raise SystemExit(f"lab start --site {site} failed: {res.stderr}")


def kill_site(root: Path, site: str) -> None:
    """kill -9 every daemon of ``site`` (its guests die with their agent's NBD exports)."""
    for pid in json.loads((root / "lab.json").read_text())["pids"][site]:
        os.kill(pid, signal.SIGKILL)


def wait_synced(lab: dict[str, Any], limit: float = 120) -> None:
    """Until every replica image equals its source (the initial copies are done)."""
    deadline = time.monotonic() + limit
    disks = [d for vm in lab["vms"] for d in vm["disks"]]
    while any(differing_bytes(Path(d["source_image"]), Path(d["replica_image"])) for d in disks):
        if time.monotonic() > deadline:
            raise SystemExit("the replicas did not catch up with their sources")
        time.sleep(0.5)


def nbd_write(uri: str, offset: int, data: bytes, scratch: Path) -> None:
    """Write ``data`` at ``offset`` through an NBD export with qemu-io."""
    src = scratch / "write.bin"
    src.write_bytes(data)
    res = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} {len(data)}", uri],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0 or "failed" in res.stdout + res.stderr:
        raise SystemExit(f"write to {uri} failed: {res.stdout}{res.stderr}")


def guest_console(root: Path, site: str, vm: str) -> Path:
    """Where the agent at ``site`` keeps ``vm``'s guest console."""
    return root / site / "state" / "guests" / vm / "main" / "console.log"


def agent_post(sock: str, path: str) -> None:
    """A POST to an agent's control socket (curl: the bench has no event loop)."""
    subprocess.run(
        ["curl", "-s", "--unix-socket", sock, "-X", "POST", "-H", "Content-Type: application/json",
         "-d", "{}", "http://agent" + path],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def planned_rounds(lab: dict[str, Any], rounds: int) -> tuple[list[float], list[float]]:
    """Planned failovers of demo1's idle guest there and back: (times without the shutdown,
    shutdown times)."""
    root, config = Path(lab["root"]), lab["config"]
    agent_post(lab["sites"]["primary"]["agent_control_socket"], "/v1/guests/demo1/start")
    wait_console(guest_console(root, "primary", "demo1"), "RK-READY", timeout=120)
    without, shutdowns = [], []
    for i in range(rounds):
        took, doc = timed_json(config, "failover", "planned", "demo1")
        steps = doc["vms"][0]["steps"]
        shutdowns.append(shutdown_seconds(steps))
        without.append(took - shutdowns[-1])
        print(f"planned #{i + 1}: {took:.2f} s, guest shutdown {shutdowns[-1]:.2f} s")
        here = "recovery" if i % 2 == 0 else "primary"
        wait_console(guest_console(root, here, "demo1"), "RK-READY", timeout=120)
    if rounds % 2:  # back home, so that the unplanned phase starts from the primary site
        cli("--config", config, "failover", "planned", "demo1")
    return without, shutdowns


def unplanned_singles(lab: dict[str, Any], scratch: Path) -> tuple[list[float], float, int]:
    """Unplanned failover of each VM alone, then reverse by selector: (per-VM seconds,
    shipped/differing, differing bytes)."""
    root, config, rng = Path(lab["root"]), lab["config"], random.Random(13)
    wait_synced(lab)
    # The guest would outlive its killed agent; the bench measures the recovery site's side.
    agent_post(lab["sites"]["primary"]["agent_control_socket"], "/v1/guests/demo1/stop")
    for vm in lab["vms"]:  # written just before the crash: may never reach the replica
        nbd_write(vm["disks"][0]["nbd_uris"]["primary"], 4 * BLOCK, rng.randbytes(BLOCK), scratch)
    kill_site(root, "primary")
    times = []
    for vm in lab["vms"]:
        took, _ = timed_json(config, "failover", "unplanned", vm["name"])
        times.append(took)
        print(f"unplanned {vm['name']}: {took:.2f} s")
    for vm in lab["vms"]:
        d = vm["disks"][0]
        for _ in range(8):  # scattered random blocks, written at the new primary
            offset = rng.randrange(0, (8 << 20) // BLOCK) * BLOCK
            nbd_write(d["nbd_uris"]["recovery"], offset, rng.randbytes(BLOCK), scratch)
    timed_json(config, "failover", "commit", "--selector", "tier=demo")
    started = cli("lab", "start", "--dir", str(root), "--site", "primary")
    if started.returncode != 0:
        raise SystemExit(f"lab start --site primary failed: {started.stderr}")
    disks = [d for vm in lab["vms"] for d in vm["disks"]]
    differing = sum(
        differing_bytes(Path(d["source_image"]), Path(d["replica_image"])) for d in disks
    )
    _, doc = timed_json(config, "reverse", "--selector", "tier=demo")
    shipped = sum(shipped_bytes(v["steps"]) for v in doc["vms"])
    print(f"reverse: shipped {shipped} bytes for {differing} differing")
    return times, shipped / max(differing, 1), differing


def unplanned_selector(lab: dict[str, Any]) -> tuple[float, list[float]]:
    """Every VM at once by selector: (the command's seconds, each VM's time to its guest)."""
    wait_synced(lab)
    kill_site(Path(lab["root"]), "primary")
    took, doc = timed_json(lab["config"], "failover", "unplanned", "--selector", "tier=demo")
    each = [step_seconds(v["steps"], STARTED_STEP) or float("nan") for v in doc["vms"]]
    print(f"unplanned --selector ({len(doc['vms'])} VMs): {took:.2f} s")
    return took, each


def stop_guests(lab: dict[str, Any]) -> None:
    """No guest outlives the bench."""
    for site in lab["sites"].values():
        for vm in lab["vms"]:
            agent_post(site["agent_control_socket"], f"/v1/guests/{vm['name']}/stop")


def report(doc: dict[str, Any]) -> None:
    """The ratios to the targets, then the absolute figures."""
    print(f"\nconditions: {doc['conditions']}")
    for what, got, want, holds in verdicts(doc):
        print(f"{what:34s} {got:8.2f} / {want:5.2f} = {got / want:5.2f}x  "
              f"{'holds' if holds else 'MISSED'}")  # fmt: skip
    for key in ("unplanned_one", "unplanned_selector_each", "planned", "planned_shutdown"):
        f = doc[key]
        print(f"{key:26s} n={f['n']:.0f} min {f['min']:.2f} p50 {f['p50']:.2f} "
              f"p90 {f['p90']:.2f} max {f['max']:.2f} s")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both labs, one after the other; the result document."""
    work = Path(args.dir)
    cleanup(work)
    work.mkdir(parents=True)
    guest = guest_image()
    load = os.getloadavg()
    lab = lab_up(work / "singles", args.singles, guest, both_sites=True)
    try:
        planned, shutdowns = planned_rounds(lab, args.rounds)
        singles, ratio, differing = unplanned_singles(lab, work)
    finally:
        stop_guests(lab)
        cli("lab", "down", "--dir", lab["root"])
    lab = lab_up(work / "many", args.vms, guest, both_sites=False)
    try:
        took, each = unplanned_selector(lab)
    finally:
        stop_guests(lab)
        cli("lab", "down", "--dir", lab["root"])
    return {
        "conditions": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in load],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "accel": "kvm" if kvm_usable() else "tcg",  # what the qemu driver chose
            "vms": args.vms,
            "singles": args.singles,
        },
        "planned": figures(planned),
        "planned_shutdown": figures(shutdowns),
        "unplanned_one": figures(singles),
        "unplanned_selector_s": took,
        "unplanned_selector_each": figures(each),
        "reverse_ratio": ratio,
        "reverse_differing_bytes": differing,
    }


def main() -> None:
    """Parse, run, report, save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=20, help="VMs failed over by one selector")
    parser.add_argument("--singles", type=int, default=5, help="VMs failed over one at a time")
    parser.add_argument("--rounds", type=int, default=2, help="planned failovers (there, back)")
    add_workdir_arguments(parser, "failover")
    args = parser.parse_args()
    try:
        doc = run(args)
    finally:
        if not args.keep:
            cleanup(Path(args.dir))
    report(doc)
    print(f"saved {save_result('failover', doc)}")


if __name__ == "__main__":
    main()
