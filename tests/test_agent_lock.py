"""One writer per image: the agent holds an exclusive OFD lock on every tracked image.

A second agent, a VM or a qemu tool opening the image directly for writing would change it
behind the dirty map and the replica would silently diverge; they are refused instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.disk import Flock, TrackedExport
from agents.errors import TrackingError
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    ReplikantProc,
    VMSpec,
    export_ready,
    make_image,
    replikant_exe,
    run_tool,
    wait_for,
    write_agent_config,
)

IN_USE = "is in use by another process (another replikant agent, or a VM or qemu tool"


def test_flock_layout_is_the_glibc_struct() -> None:
    """short, short, [pad], off_t, off_t, pid_t, [pad] (x86_64 and aarch64 glibc)."""
    assert ctypes.sizeof(Flock) == 32
    assert (Flock.l_type.offset, Flock.l_whence.offset) == (0, 2)
    assert (Flock.l_start.offset, Flock.l_len.offset, Flock.l_pid.offset) == (8, 16, 24)


def test_second_tracked_export_is_refused(tmp_path: Path) -> None:
    """Two exports on one image (even in one process): the second is refused, the first kept."""
    img = make_image(tmp_path / "a.img", MiB)
    first = TrackedExport(img, "a", map_path=tmp_path / "a.map")
    first.open()
    try:
        with pytest.raises(TrackingError) as err:
            TrackedExport(img, "b", map_path=tmp_path / "b.map")
        assert f"image {img} {IN_USE}" in err.value.message
        assert "replikant agent attach-args VM" in (err.value.fix or "")
        with img.open("rb") as fh:  # a plain read takes no lock and still works
            fh.read(4096)
    finally:
        first.close()
    TrackedExport(img, "c", map_path=tmp_path / "c.map").close()  # released on close


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _agent_config(tmp_path: Path, pki: Pki, img: Path, name: str) -> Path:
    return write_agent_config(
        tmp_path / f"{name}.toml",
        pki=pki,
        broker_urls=["https://127.0.0.1:1"],
        vms=[VMSpec("vm1", [DiskSpec("d0", img)])],
        state_dir=tmp_path / f"{name}-state",
        socket_dir=tmp_path / f"{name}-s",
    )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[Path, Path]]:
    """A real agent process serving one image; yields (image, tmp dir)."""
    tmp = tmp_path_factory.mktemp("lock")
    img = make_image(tmp / "disk.img", MiB)
    agent = ReplikantProc(
        ["agent", "run", "--config", str(_agent_config(tmp, pki, img, "a1"))], tmp / "a1.log"
    )
    agent.start()
    try:
        asyncio.run(wait_for(lambda: export_ready(tmp / "a1-s" / "vm1-d0.sock", "vm1-d0"), "a1"))
        yield img, tmp
    finally:
        agent.stop()


def test_second_agent_is_refused(running: tuple[Path, Path], pki: Pki) -> None:
    """Another agent (own state_dir) on the same image refuses to start, naming it."""
    img, tmp = running
    proc = run_tool(
        replikant_exe(), "agent", "run", "--config", str(_agent_config(tmp, pki, img, "a2"))
    )
    assert proc.returncode == 1, proc.stderr
    assert f"image {img} {IN_USE}" in proc.stderr
    assert "replikant agent attach-args VM" in proc.stderr
    assert not (tmp / "a2-s" / "vm1-d0.sock").exists()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed")
def test_qemu_cannot_write_the_image_directly(running: tuple[Path, Path]) -> None:
    """QEMU's own image locking meets the agent's lock: a direct write is refused."""
    img, _ = running
    before = img.read_bytes()[:4096]
    proc = run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", str(img))
    assert proc.returncode != 0
    assert "lock" in (proc.stdout + proc.stderr)
    assert img.read_bytes()[:4096] == before


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_reads_without_locking_still_work(running: tuple[Path, Path]) -> None:
    """`qemu-img info -U` (force share) and plain reads are not blocked."""
    img, _ = running
    proc = run_tool("qemu-img", "info", "-U", "-f", "raw", str(img))
    assert proc.returncode == 0, proc.stderr
    assert "virtual size: 1 MiB" in proc.stdout
    assert len(img.read_bytes()) == MiB
