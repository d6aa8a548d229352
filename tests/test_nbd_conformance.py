"""NBD conformance: libnbd's own client library (python3-libnbd) runs every check of
``tests/nbd_conformance.py`` against our plain file export, the agent's tracked export (over a
unix socket, and over TCP with STARTTLS and our certificates at TLS 1.3 and at TLS 1.2, as GnuTLS
clients such as nbd-client speak it when told to) and the broker's point-in-time export.

The servers run in the test's event loop; each check runs as a ``/usr/bin/python3`` subprocess
(the bindings live in Debian's Python, not in our virtualenv). After a check that changes data,
the disk as the server's backend sees it must equal the client's model byte for byte; for the
tracked export every block whose contents changed must be marked in the dirty map, and for the
point-in-time export the replica image underneath must not have changed at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agents.disk import TrackedExport
from broker.pitexport import PointInTimeExport
from broker.points import PointsIndex, StateInfo
from common.nbd.backend import Export, FileExport
from common.nbd.server import NBDServer
from common.tls import nbd_server_context
from tests.fixtures_pki import make_pki
from tests.support_agent import MiB, make_image

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(60)]

SCRIPT = Path(__file__).with_name("nbd_conformance.py")
DEBIAN_PYTHON = "/usr/bin/python3"
SIZE = 34 * MiB  # a 32 MiB request must fit, with room for the checks' separate regions
BLOCK = 64 * 1024
CHECKS = [
    "handshake",
    "raw",
    "limits",
    "unaligned",
    "fua_flush",
    "trim_zero",
    "block_status",
    "multi_conn",
    "mixed",
]
TARGETS = ["plain-unix", "tracked-unix", "tracked-tls13", "tracked-tls12", "pit-unix"]
# GnuTLS's system priority override: how an administrator (or nbd-client's defaults) ends up at
# TLS 1.2. Our raw check speaks Python's ssl, so it is not part of the TLS 1.2 run.
GNUTLS_TLS12 = "[overrides]\ndisabled-version = tls1.3\n"


def _fill(i: int) -> bytes:
    """Random data, a written zero run and holes, and data in the last MiB (the end matters)."""
    if i in (0, 1, 2, 3, 20, 21, SIZE // MiB - 1):
        return random.Random(i).randbytes(MiB)
    if i == 4:
        return bytes(MiB)
    return b""


@dataclass
class Served:
    """A server under test, the disk behind it and what a client needs to reach it."""

    uri: str
    contents: Callable[[], bytes]  # the whole disk as the server's backend sees it now
    tracked: TrackedExport | None = None
    replica: Path | None = None  # an image that must never change (under a point-in-time view)
    tls_version: str | None = None  # what every TLS session must have negotiated
    options: list[str] = field(default_factory=list)  # for the check script
    env: dict[str, str] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)


def _point_in_time(
    image: Path, name: str, overlay: Path, stack: contextlib.ExitStack, *, read_only: bool
) -> PointInTimeExport:
    """``image`` as the broker serves a recovery point: a view of the replica (here the applied
    state itself, with no undo data) under a private overlay. ``stack`` closes the replica's
    descriptor after the export."""
    state = StateInfo(generation=1, seq=1, cut_ns=0, consistency=0, full=False)
    view = PointsIndex(overlay.with_suffix(".points")).open_view(state.key, state)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    view.attach_image(fd)
    export = PointInTimeExport(
        name, view, image.stat().st_size, overlay, read_only=read_only, image_fd=fd
    )
    stack.callback(export.close)
    return export


def _file(image: Path, name: str, stack: contextlib.ExitStack, *, read_only: bool) -> FileExport:
    export = FileExport(image, name, read_only=read_only)
    stack.callback(export.close)
    return export


CASES = [(t, c) for t in TARGETS for c in CHECKS if (t, c) != ("tracked-tls12", "raw")]


@pytest.fixture(scope="module", autouse=True)
def _python3_libnbd() -> None:
    """Fail (not skip) when the bindings are missing."""
    found = subprocess.run([DEBIAN_PYTHON, "-c", "import nbd"], capture_output=True, check=False)
    assert found.returncode == 0, (
        f"{DEBIAN_PYTHON} cannot import libnbd's bindings ({found.stderr.decode().strip()}): "
        "run deploy/bootstrap.sh test, which installs python3-libnbd"
    )


@pytest.fixture
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    """``disk`` (writable, default) and ``ro`` (read-only) served as the target names."""
    target: str = request.param
    image = make_image(tmp_path / "disk.img", SIZE, fill=_fill)
    ro_image = make_image(tmp_path / "ro.img", MiB, fill=_fill)
    env = dict(os.environ)
    with contextlib.ExitStack() as stack, capture_logs() as logs:
        disk: Export
        if target == "plain-unix":
            disk = _file(image, "disk", stack, read_only=False)
            ro: Export = _file(ro_image, "ro", stack, read_only=True)
            result = Served("", image.read_bytes)
        elif target == "pit-unix":
            pit = _point_in_time(image, "disk", tmp_path / "disk.overlay", stack, read_only=False)
            ro = _point_in_time(ro_image, "ro", tmp_path / "ro.overlay", stack, read_only=True)
            disk = pit
            result = Served(
                "",
                lambda: bytes(pit.read(0, SIZE)),
                replica=image,
                options=["--without", "can_cache"],
            )
        else:
            tracked = TrackedExport(image, "disk", block_size=BLOCK, map_path=tmp_path / "d.map")
            tracked.open()
            stack.callback(tracked.close)
            disk = tracked
            ro = _file(ro_image, "ro", stack, read_only=True)
            result = Served("", image.read_bytes, tracked=tracked)
        result.env, result.logs = env, logs
        if target.endswith("unix"):
            server = NBDServer([disk, ro], default_export="disk")
            sock = tmp_path / "nbd.sock"
            await server.serve_unix(sock)
            result.uri = f"nbd+unix:///disk?socket={sock}"
        else:
            pki = make_pki(tmp_path / "pki")
            creds = tmp_path / "client-creds"  # the layout libnbd's set_tls_certificates wants
            creds.mkdir(mode=0o700)
            shutil.copy(pki.ca, creds / "ca-cert.pem")
            shutil.copy(pki.broker.cert_path, creds / "client-cert.pem")
            shutil.copy(pki.broker.key_path, creds / "client-key.pem")
            server = NBDServer(
                [disk, ro],
                default_export="disk",
                tls_context=partial(nbd_server_context, pki.agent.tls),
            )
            _host, port = await server.serve_tcp("127.0.0.1", 0)
            result.uri = f"nbds://localhost:{port}/disk?tls-certificates={creds}"
            result.tls_version = "TLSv1.3"
            if target == "tracked-tls12":
                result.tls_version = "TLSv1.2"
                priorities = tmp_path / "gnutls-tls12.cfg"
                priorities.write_text(GNUTLS_TLS12)
                env["GNUTLS_SYSTEM_PRIORITY_FILE"] = os.fspath(priorities)
        try:
            yield result
        finally:
            await server.close()


async def _run_check(check: str, served: Served, start: Path, model: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        DEBIAN_PYTHON,
        os.fspath(SCRIPT),
        check,
        "--uri",
        served.uri,
        "--model-in",
        os.fspath(start),
        "--model-out",
        os.fspath(model),
        *served.options,
        env=served.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"libnbd check {check} failed:\n{text}"


@pytest.mark.parametrize(("served", "check"), CASES, indirect=["served"])
async def test_libnbd_conformance(check: str, served: Served, tmp_path: Path) -> None:
    """The libnbd check passes, and the disk on the server's side equals the client's model."""
    before = served.contents()
    replica = served.replica.read_bytes() if served.replica is not None else None
    start = tmp_path / "start.img"
    start.write_bytes(before)
    model = tmp_path / "model.img"
    await _run_check(check, served, start, model)
    if served.tls_version is not None:
        versions = {e["tls_version"] for e in served.logs if e["event"] == "nbd_tls_established"}
        assert versions == {served.tls_version}
    if served.replica is not None:
        assert served.replica.read_bytes() == replica, "a write reached the replica"
    if not model.exists():
        return  # checks that keep no model verify their few bytes themselves
    after = served.contents()
    assert after == model.read_bytes(), "the disk differs from what the client wrote"
    if served.tracked is not None:
        changed = {
            b
            for b in range(SIZE // BLOCK)
            if after[b * BLOCK : (b + 1) * BLOCK] != before[b * BLOCK : (b + 1) * BLOCK]
        }
        marked = {
            b for start, end, _kind in served.tracked.map.active.runs() for b in range(start, end)
        }
        assert changed, "the check changed nothing: it proves nothing about tracking"
        assert changed <= marked, f"changed but not tracked: {sorted(changed - marked)[:10]}"
