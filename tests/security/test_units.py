"""The daemons' systemd units: their sandbox scores, and the daemons working inside them.

One test holds each unit to its exposure level on `systemd-analyze security`'s scale; another
starts both daemons with the lab's files as their units' users, under the units' umask, syscall
filter, W^X and read-only file system (tests/security/sandbox.py), replicates a write made through
the agent's NBD socket by a member of the `replikant` group, and shows that each daemon refuses to
start, naming the file and the fix, when a file of its own is not its user's.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from ops.lab import LabPlan, write_lab_files
from tests.security.rows import Door
from tests.security.sandbox import (
    DEPLOY,
    UnitFile,
    ensure_users,
    exposure,
    mount_namespaces,
    sandboxed,
)

REPLIKANT = str(Path(sys.executable).with_name("replikant"))
LIMITS = {"broker": 2.5, "agent": 4.5}


@pytest.mark.parametrize("role", sorted(LIMITS))
def test_unit_exposure_is_within_its_limit(role: str, door: Door) -> None:
    """`systemd-analyze security --offline=true` rates each shipped unit at or below its limit."""
    unit = DEPLOY / f"replikant-{role}.service"
    score, report = exposure(unit)
    # What still counts against the unit, for whoever tightens or loosens it next.
    print("\n".join(line for line in report.splitlines() if line.startswith("✗")))
    print(f"{unit.name}: exposure {score} (limit {LIMITS[role]})")
    door.attempt(
        f"{role} daemon sandbox",
        f"ship {unit.name} with an exposure above {LIMITS[role]}",
        expected=f"exposure <= {LIMITS[role]}",
        observed=f"exposure {score}",
        refused=score <= LIMITS[role],
    )


def _sha(path: Path, length: int | None = None) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read() if length is None else f.read(length)).hexdigest()


def install_lab_files(plan: LabPlan) -> None:
    """Give the lab's files to the daemons' users exactly as docs/operations.md ("Files the
    daemons use") tells an operator to."""
    root = plan.root
    pki = plan.pki
    # The PKI folder holds the CA key only on the machine that issues certificates; on a daemon
    # host it holds ca.crt and that host's certificate. The lab keeps ca.key (0600 root) in it.
    os.chmod(pki, 0o755)  # noqa: S103 - both daemons' users must enter it to read ca.crt
    for key in pki.glob("brokers/*.key"):
        shutil.chown(key, "replikant-broker", "root")
    for key in pki.glob("agents/*.key"):
        shutil.chown(key, "replikant-agent", "root")
    subprocess.run(
        ["install", "-d", "-o", "replikant-broker", "-g", "replikant", "-m", "0700", plan.store],
        check=True,
    )
    for sub in ("primary/images", "primary/state"):
        shutil.chown(root / sub, "replikant-agent", "replikant")
        os.chmod(root / sub, 0o700)
    for image in (root / "primary/images").iterdir():
        shutil.chown(image, "replikant-agent", "replikant")
        os.chmod(image, 0o600)
    # The socket folder: the agent's, and the group `replikant` (QEMU, operators) may enter it.
    shutil.chown(plan.socket_dir, "replikant-agent", "replikant")
    os.chmod(plan.socket_dir, 0o750)  # noqa: S103 - group replikant: QEMU and operators


@pytest.fixture
def lab_files() -> Iterator[tuple[LabPlan, dict[str, object]]]:
    """The lab's PKI, images and configs, in a folder the daemons' users can reach."""
    if os.geteuid() != 0:
        pytest.skip("starting daemons as their units' users needs root")
    ensure_users()
    # Not under pytest's tmp_path: its parents are 0700 root, which no daemon user can enter.
    base = Path(tempfile.mkdtemp(prefix="replikant-units-", dir="/var/tmp"))
    base.chmod(0o755)
    plan = LabPlan(base / "lab", vms=1, disk_mib=8, interval=1.0, mqtt_kind="embedded", brokers=1)
    plan.root.mkdir()
    lab = write_lab_files(plan)
    # No MQTT server here: the broker runs alone (a cluster member would wait to be elected).
    broker_toml = plan.root / "broker.toml"
    doc = tomllib.loads(broker_toml.read_text())
    del doc["mqtt"]
    broker_toml.write_text(tomli_w.dumps(doc))
    install_lab_files(plan)
    try:
        yield plan, lab
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _start(role: str, plan: LabPlan, log: Path) -> subprocess.Popen[bytes]:
    unit = UnitFile.read(DEPLOY / f"replikant-{role}.service")
    if role == "broker":
        paths = {"StateDirectory": [plan.store]}
    else:
        paths = {
            "StateDirectory": [plan.root / "primary/state"],
            "RuntimeDirectory": [plan.socket_dir],
            "ReadWritePaths": [plan.root / "primary/images"],
        }
    with log.open("ab") as out:
        return sandboxed(
            unit,
            [REPLIKANT, "--log-json", role, "run", "--config", str(plan.root / f"{role}.toml")],
            paths=paths,
            log=out,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_equal(
    source: Path, replica: Path, procs: list[subprocess.Popen[bytes]], logs: Path
) -> None:
    deadline = time.monotonic() + 60
    want = _sha(source)
    while not (replica.exists() and _sha(replica, source.stat().st_size) == want):
        for proc in procs:
            assert proc.poll() is None, _tails(logs)
        assert time.monotonic() < deadline, f"{replica} never matched {source}\n{_tails(logs)}"
        time.sleep(0.2)


def _tails(logs: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        for log in sorted(logs.glob("*.log"))
    )


def test_daemons_replicate_as_their_units_users(
    lab_files: tuple[LabPlan, dict[str, object]],
) -> None:
    """Broker and agent run as their units' users inside the units' sandbox and replicate a write
    that a `replikant` group member made through the agent's NBD socket, byte for byte."""
    plan, lab = lab_files
    if not mount_namespaces():
        print("no mount namespaces here: ProtectSystem=strict and PrivateTmp are not emulated")
    logs = plan.root / "logs"
    vm = lab["vms"][0]  # type: ignore[index]
    procs = [_start("broker", plan, logs / "broker.log")]
    try:
        procs.append(_start("agent", plan, logs / "agent.log"))
        for disk in vm["disks"]:
            _wait_equal(Path(disk["source_image"]), Path(disk["replica_image"]), procs, logs)
        disk = vm["disks"][0]
        offset, length = 3 << 20, 256 << 10
        # An operator (here: nobody) in group replikant, as QEMU would be.
        write = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=replikant", "--",
             "qemu-io", "-f", "raw", "-c", f"write -P 0x3c {offset} {length}", disk["nbd_uri"]],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert write.returncode == 0, write.stdout + write.stderr
        source, replica = Path(disk["source_image"]), Path(disk["replica_image"])
        with source.open("rb") as f:
            f.seek(offset)
            assert f.read(length) == b"\x3c" * length
        _wait_equal(source, replica, procs, logs)
        # The unit's UMask=0077: the replica is as private as the disk it copies.
        assert replica.stat().st_mode & 0o077 == 0, oct(replica.stat().st_mode)
        assert pwd.getpwuid(replica.stat().st_uid).pw_name == "replikant-broker"
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_daemons_refuse_files_that_are_not_their_users(
    lab_files: tuple[LabPlan, dict[str, object]], door: Door
) -> None:
    """Each daemon, started as its unit's user, refuses to start when a file it needs belongs to
    someone else, and the message names the file, the user and the fix."""
    plan, lab = lab_files
    disk = Path(lab["vms"][0]["disks"][0]["source_image"])  # type: ignore[index]
    cases = [
        ("broker", plan.pki / "brokers/dr-b1.key", "its TLS key owned by root (0600)",
         "replikant-broker"),
        ("broker", plan.store, "its store owned by root (0700)", "replikant-broker"),
        ("agent", disk, "a disk image owned by root (0600)", "replikant-agent"),
        ("agent", plan.root / "primary/state", "its state_dir owned by root (0700)",
         "replikant-agent"),
    ]  # fmt: skip
    for role, path, what, named in cases:
        owner = path.stat()
        os.chown(path, 0, 0)
        log = plan.root / "logs" / f"{role}-refused.log"
        log.unlink(missing_ok=True)
        proc = _start(role, plan, log)
        try:
            rc = proc.wait(timeout=60)
        finally:
            _stop(proc)
            os.chown(path, owner.st_uid, owner.st_gid)
        text = log.read_text(errors="replace")
        line = next((ln.strip() for ln in text.splitlines() if str(path) in ln), text.strip())
        door.attempt(
            f"{role} files",
            f"start the {role} as its unit's user with {what}",
            expected="exit 1 before serving, naming the file, the user and the fix",
            observed=f"exit {rc}: {line}",
            refused=rc == 1 and str(path) in text and named in text and "fix" in text,
        )
