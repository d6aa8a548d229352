"""NBD conformance: libnbd's own client library (python3-libnbd) runs every check of
``tests/nbd_conformance.py`` against our plain file export and the agent's tracked export, over a
unix socket and over TCP with STARTTLS and our certificates (TLS 1.3, and TLS 1.2 as GnuTLS
clients such as nbd-client speak it when told to).

The servers run in the test's event loop; each check runs as a ``/usr/bin/python3`` subprocess
(the bindings live in Debian's Python, not in our virtualenv). After a check that changes data,
the image on the server's side must equal the client's model byte for byte, and for the tracked
export every block whose contents changed must be marked in the dirty map.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agents.disk import TrackedExport
from common.nbd.backend import FileExport
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
TARGETS = ["plain-unix", "tracked-unix", "tracked-tls13", "tracked-tls12"]
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
    """A server under test, the images behind it and what a client needs to reach it."""

    uri: str
    image: Path
    tracked: TrackedExport | None
    tls_version: str | None = None  # what every TLS session must have negotiated
    env: dict[str, str] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)


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
    ro = FileExport(ro_image, "ro", read_only=True)
    tracked: TrackedExport | None = None
    if target == "plain-unix":
        disk: FileExport | TrackedExport = FileExport(image, "disk")
    else:
        tracked = TrackedExport(image, "disk", block_size=BLOCK, map_path=tmp_path / "d.map")
        tracked.open()
        disk = tracked
    env = dict(os.environ)
    tls_version = None
    with capture_logs() as logs:
        if target.endswith("unix"):
            server = NBDServer([disk, ro], default_export="disk")
            sock = tmp_path / "nbd.sock"
            await server.serve_unix(sock)
            uri = f"nbd+unix:///disk?socket={sock}"
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
            uri = f"nbds://localhost:{port}/disk?tls-certificates={creds}"
            tls_version = "TLSv1.3"
            if target == "tracked-tls12":
                tls_version = "TLSv1.2"
                priorities = tmp_path / "gnutls-tls12.cfg"
                priorities.write_text(GNUTLS_TLS12)
                env["GNUTLS_SYSTEM_PRIORITY_FILE"] = os.fspath(priorities)
        try:
            yield Served(uri, image, tracked, tls_version, env, logs)
        finally:
            await server.close()
            disk.close()
            ro.close()


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
        env=served.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"libnbd check {check} failed:\n{text}"


@pytest.mark.parametrize(("served", "check"), CASES, indirect=["served"])
async def test_libnbd_conformance(check: str, served: Served, tmp_path: Path) -> None:
    """The libnbd check passes, and the server-side image equals the client's model of it."""
    before = served.image.read_bytes()
    start = tmp_path / "start.img"
    start.write_bytes(before)
    model = tmp_path / "model.img"
    await _run_check(check, served, start, model)
    if served.tls_version is not None:
        versions = {e["tls_version"] for e in served.logs if e["event"] == "nbd_tls_established"}
        assert versions == {served.tls_version}
    if not model.exists():
        return  # checks that keep no model verify their few bytes themselves
    after = served.image.read_bytes()
    assert after == model.read_bytes(), "the image differs from what the client wrote"
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
