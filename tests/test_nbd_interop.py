"""Real NBD clients from Debian against our server: qemu-io, qemu-img, nbdcopy, nbdinfo, fio.

The server runs in the test's event loop; the clients run as subprocesses, awaited, so the loop
keeps serving them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import uvloop

from common.nbd.backend import FileExport
from common.nbd.server import NBDServer
from common.tls import nbd_server_context
from tests.fixtures_pki import make_pki

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("qemu-io", "qemu-img", "nbdcopy", "nbdinfo", "fio")),
        reason="needs qemu-utils, libnbd-bin and fio",
    ),
]

SIZE = 16 * 1024 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def run(*cmd: str) -> str:
    """Run a client; fail the test with its output if it exits non-zero. Returns stdout+stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{cmd[0]} exited {proc.returncode}:\n{text}"
    return text


def make_source(path: Path) -> None:
    """A 16 MiB image with random data, a zero run and a hole, so copies exercise all three."""
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(5 * 1024 * 1024))
        f.write(bytes(1024 * 1024))
        f.seek(12 * 1024 * 1024)
        f.write(os.urandom(3 * 1024 * 1024 + 4096))


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[tuple[Path, str, Path]]:
    """An empty 16 MiB image served as ``disk``: yields (image, NBD URI, socket path)."""
    image = tmp_path / "target.img"
    with image.open("wb") as f:
        f.truncate(SIZE)
    export = FileExport(image, "disk", description="interop target")
    server = NBDServer([export])
    sock = tmp_path / "nbd.sock"
    await server.serve_unix(sock)
    yield image, f"nbd+unix:///disk?socket={sock}", sock
    await server.close()
    export.close()


async def test_qemu_io_patterns(target: tuple[Path, str, Path]) -> None:
    """qemu-io writes patterns, zeroes and discards, and verifies every read."""
    image, uri, _ = target
    out = await run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xa5 0 1M",
        "-c", "write -P 0x5a 3M 513k",  # not a multiple of 4 KiB
        "-c", "write -f -P 0x11 6M 64k",  # FUA
        "-c", "flush",
        "-c", "read -P 0xa5 0 1M",
        "-c", "read -P 0x5a 3M 513k",
        "-c", "read -P 0x11 6M 64k",
        "-c", "read -P 0 2M 1M",
        "-c", "write -z 0 512k",
        "-c", "read -P 0 0 512k",
        "-c", "read -P 0xa5 512k 512k",
        "-c", "discard 3M 64k",
        "-c", "read -P 0x5a 3136k 64k",
        uri,
    )  # fmt: skip
    assert "Pattern verification failed" not in out
    assert "error" not in out.lower()
    data = image.read_bytes()
    assert data[512 * 1024 : 1024 * 1024] == b"\xa5" * 512 * 1024
    assert data[6 << 20 : (6 << 20) + 65536] == b"\x11" * 65536


async def test_qemu_img_convert_into_the_export(
    tmp_path: Path, target: tuple[Path, str, Path]
) -> None:
    """qemu-img convert -n writes a sparse image into the export byte for byte."""
    image, uri, _ = target
    src = tmp_path / "src.img"
    make_source(src)
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", os.fspath(src), uri)
    assert sha256(image) == sha256(src)
    out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", os.fspath(src), uri)
    assert "Images are identical" in out


async def test_nbdcopy_both_ways(tmp_path: Path, target: tuple[Path, str, Path]) -> None:
    """nbdcopy into the export and back out (multi-conn, extents) gives identical bytes."""
    image, uri, _ = target
    src = tmp_path / "src.img"
    make_source(src)
    await run("nbdcopy", os.fspath(src), uri)
    assert sha256(image) == sha256(src)
    back = tmp_path / "back.img"
    back.touch()
    await run("nbdcopy", uri, os.fspath(back))
    assert sha256(back) == sha256(src)


async def test_nbdinfo_lists_and_describes_the_export(target: tuple[Path, str, Path]) -> None:
    """nbdinfo sees our export, its size, description, flags and base:allocation."""
    _, uri, sock = target
    listed = await run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}")
    exports = json.loads(listed)["exports"]
    assert [e["export-name"] for e in exports] == ["disk"]
    info = json.loads(await run("nbdinfo", "--json", uri))
    [export] = info["exports"]
    assert export["export-size"] == SIZE
    assert export["description"] == "interop target"
    for flag in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero"):
        assert export[flag], flag
    assert not export["is_read_only"]
    assert export["block_size_maximum"] == 32 * 1024 * 1024
    assert "base:allocation" in export["contexts"]
    assert info["protocol"] == "newstyle-fixed"
    mapped = await run("nbdinfo", "--map", uri)
    assert "hole,zero" in mapped


async def test_fio_random_writes_then_verified_writes(target: tuple[Path, str, Path]) -> None:
    """fio's nbd engine: 4 KiB random writes at QD 32, then a write+crc32c verify pass."""
    _, uri, _ = target
    common = ["fio", "--ioengine=nbd", f"--uri={uri}", f"--size={SIZE}", "--output-format=json"]
    out = await run(
        *common, "--name=rand", "--rw=randwrite", "--bs=4k", "--iodepth=32",
        "--runtime=2", "--time_based",
    )  # fmt: skip
    result = json.loads(out[out.index("{") :])
    assert result["jobs"][0]["error"] == 0
    assert result["jobs"][0]["write"]["iops"] > 1000
    out = await run(
        *common, "--name=verify", "--rw=write", "--bs=64k", "--iodepth=8",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
    )  # fmt: skip
    result = json.loads(out[out.index("{") :])
    assert result["jobs"][0]["error"] == 0
    assert result["jobs"][0]["read"]["io_bytes"] == SIZE  # every block read back and verified


async def test_libnbd_and_qemu_over_starttls(tmp_path: Path) -> None:
    """nbdinfo/nbdcopy (GnuTLS via libnbd) and qemu-io (QEMU's TLS) negotiate STARTTLS."""
    pki = make_pki(tmp_path / "pki")
    creds = tmp_path / "client-creds"  # the layout libnbd and QEMU's tls-creds-x509 expect
    creds.mkdir()
    shutil.copy(pki.ca, creds / "ca-cert.pem")
    shutil.copy(pki.broker.cert_path, creds / "client-cert.pem")
    shutil.copy(pki.broker.key_path, creds / "client-key.pem")
    image = tmp_path / "tls.img"
    make_source(image)
    export = FileExport(image, "disk")
    async with NBDServer(
        [export], tls_context=partial(nbd_server_context, pki.agent.tls)
    ) as server:
        host, port = await server.serve_tcp("127.0.0.1", 0)
        uri = f"nbds://{host}:{port}/disk?tls-certificates={creds}"
        info = json.loads(await run("nbdinfo", "--json", uri))
        assert info["TLS"] is True
        assert info["exports"][0]["export-size"] == SIZE
        copy = tmp_path / "copy.img"
        copy.touch()
        await run("nbdcopy", uri, os.fspath(copy))
        assert sha256(copy) == sha256(image)
        out = await run(
            "qemu-io",
            "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
            "export=disk,tls-creds=tls0",
            "-c", "write -P 0x77 0 64k",
            "-c", "read -P 0x77 0 64k",
        )  # fmt: skip
        assert "Pattern verification failed" not in out
        # Plain nbd:// against a TLS-only listener is refused during negotiation.
        proc = await asyncio.create_subprocess_exec(
            "nbdinfo",
            f"nbd://{host}:{port}/disk",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await proc.wait() != 0
    export.close()


def test_the_same_clients_under_uvloop(tmp_path: Path) -> None:
    """Production runs uvloop: its BufferedProtocol and start_tls paths serve the same clients."""
    pki = make_pki(tmp_path / "pki")
    creds = tmp_path / "client-creds"
    creds.mkdir()
    shutil.copy(pki.ca, creds / "ca-cert.pem")
    shutil.copy(pki.admin.cert_path, creds / "client-cert.pem")
    shutil.copy(pki.admin.key_path, creds / "client-key.pem")
    src = tmp_path / "src.img"
    make_source(src)
    image = tmp_path / "target.img"
    with image.open("wb") as f:
        f.truncate(SIZE)

    async def scenario() -> None:
        export = FileExport(image, "disk")
        async with NBDServer(
            [export], tls_context=partial(nbd_server_context, pki.agent.tls)
        ) as server:
            sock = tmp_path / "nbd.sock"
            await server.serve_unix(sock)
            host, port = await server.serve_tcp("127.0.0.1", 0)
            await run("nbdcopy", os.fspath(src), f"nbd+unix:///disk?socket={sock}")
            out = await run(
                "qemu-io", "-f", "raw",
                "-c", "write -P 0x3c 1M 3M",
                "-c", "read -P 0x3c 1M 3M",
                f"nbd+unix:///disk?socket={sock}",
            )  # fmt: skip
            assert "Pattern verification failed" not in out
            back = tmp_path / "back.img"
            back.touch()
            await run("nbdcopy", f"nbds://{host}:{port}/disk?tls-certificates={creds}", f"{back}")
            assert sha256(back) == sha256(image)
        export.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
    expected = bytearray(src.read_bytes())
    expected[1 << 20 : 4 << 20] = b"\x3c" * (3 << 20)
    assert image.read_bytes() == expected
