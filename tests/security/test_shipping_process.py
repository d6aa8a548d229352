"""The agent's shipping process (decision 029): what sits in the agent's working directory is
never imported by it, it listens on nothing, and the image descriptor it gets cannot write.

The agent starts it as ``python -P -m agents.shipd``; without ``-P``, ``-m`` puts the working
directory first on the module path, so an ``agents`` package planted there would run as the
agent's user with the agent's certificate.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agents.disk import TrackedExport
from tests.security.rows import Door
from tests.support_agent import MiB, make_image, wait_for
from tests.test_agent_ship import make_rig
from tests.test_shipproc import _tcp_ports

pytestmark = pytest.mark.timeout(120)


async def test_a_planted_agents_package_is_never_run(
    tmp_path: Path, door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``agents/shipd.py`` in the working directory never runs; the real process ships."""
    planted = tmp_path / "cwd"
    (planted / "agents").mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "agents" / "__init__.py").write_text("")
    (planted / "agents" / "shipd.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    )
    monkeypatch.chdir(planted)
    rig = await make_rig(tmp_path / "rig")
    try:
        await rig.start()
        await rig.write(("write", 2 * MiB, os.urandom(64 * 1024)))
        await wait_for(rig.settled, "the replica to converge through the shipping process", 60)
        assert rig.agent is not None
        assert rig.agent.uploader is not None
        pid = rig.agent.uploader.shipper.pid
        assert pid is not None
        door.attempt(
            "agent's shipping process",
            "plant agents/shipd.py in the agent's working directory",
            expected="never imported; batches shipped by the real process",
            observed="ran" if marker.exists() else "not run, replica converged",
            refused=not marker.exists(),
        )
        listening = _tcp_ports(pid, listening=True)
        door.attempt(
            "agent's shipping process",
            "find a TCP listener of the shipping process",
            expected="none",
            observed=f"{len(listening)} TCP listening sockets",
            refused=not listening,
        )
    finally:
        await rig.halt()
        await rig.rx.stop()


def test_the_image_descriptor_the_process_gets_cannot_write(tmp_path: Path, door: Door) -> None:
    """The image descriptor a cut hands the shipping process (duplicated as
    ``Shipper._descriptors`` does) is opened read-only: a write through it fails with EBADF and
    the image keeps its bytes, so a process that misbehaves can read the disk, never change it."""
    image = make_image(tmp_path / "d.img", 4 * MiB, fill=lambda i: bytes([i + 1]) * MiB)
    before = image.read_bytes()
    export = TrackedExport(image, "d")
    try:
        cut = export.begin_cut()
        fd = os.dup(cut.image_fd)
        try:
            os.pwrite(fd, b"planted", 0)
            observed = "the write went through"
        except OSError as exc:
            observed = f"{errno.errorcode.get(exc.errno or 0, exc.errno)}"
        finally:
            os.close(fd)
        export.end_cut(acked=False)
    finally:
        export.close()
    door.attempt(
        "agent's shipping process",
        "write the disk image through the image descriptor a cut hands the process",
        expected="EBADF (read-only descriptor), image unchanged",
        observed=f"{observed}, image {'unchanged' if image.read_bytes() == before else 'CHANGED'}",
        refused=observed == "EBADF" and image.read_bytes() == before,
    )
