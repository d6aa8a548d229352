"""The agent's local doors: control socket, NBD unix sockets, state files and seed media.

The agent runs as its real process (``replikant agent run``, as root like CI) in a directory
other users may traverse, so that only the agent's own modes stand between a local user and its
files. The local user is ``nobody`` (uid/gid 65534, no supplementary groups), via ``setpriv``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.control import open_control_socket, read_status
from agents.errors import AgentError
from agents.startup import check_config
from common.config import AgentConfig, load_config
from tests.fixtures_pki import make_pki
from tests.security.rows import Door
from tests.support_agent import (
    DiskSpec,
    MiB,
    ReplikantProc,
    VMSpec,
    control_request,
    make_image,
    write_agent_config,
)

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
ROUTES = [
    ("GET", "/v1/status"),
    ("POST", "/v1/vms/vm1/verify"),
    ("POST", "/v1/vms/vm1/repair"),
    ("POST", "/v1/seed/export"),
    ("POST", "/v1/seed/cancel"),
    ("GET", "/v1/guests"),
    ("POST", "/v1/guests/vm1/start"),
    ("POST", "/v1/guests/vm1/stop"),
    ("POST", "/v1/guests/vm1/test"),
    ("DELETE", "/v1/guests/vm1/test"),
]
SECRET = b"root only: must never change\n"
BROWSER_ATTEMPTS = [
    (
        "with Origin: http://evil.example, text/plain",
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        403,
        "browser_request",
    ),
    ("with Sec-Fetch-Site: cross-site", {"Sec-Fetch-Site": "cross-site"}, 403, "browser_request"),
    (
        "as a simple text/plain request (no Origin)",
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
]


@dataclass
class Running:
    """A running agent and where its files are."""

    base: Path
    proc: ReplikantProc
    control: Path
    socket_dir: Path
    state_dir: Path
    image: Path


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Running]:
    """An agent protecting one 8 MiB disk, its broker unreachable, under a 0755 directory."""
    # tmp_path's parents are root-only (0700): they would refuse `nobody` before our modes do.
    base = Path(tempfile.mkdtemp(prefix="rk-sec-", dir="/tmp"))
    base.chmod(0o755)
    pki = make_pki(tmp_path / "pki")
    image = make_image(base / "vm1.img", 8 * MiB, fill=lambda i: os.urandom(MiB) if i < 2 else b"")
    image.chmod(0o600)
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=["https://127.0.0.1:1"],
        vms=[VMSpec("vm1", [DiskSpec("disk0", image)])],
        state_dir=base / "state",
        socket_dir=base / "run",
    )
    proc = ReplikantProc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")
    control = base / "run" / "control" / "agent.sock"
    proc.start()
    try:
        wait_sync(lambda: control.is_socket() and _answers(control), proc)
        yield Running(base, proc, control, base / "run", base / "state", image)
    finally:
        proc.stop()
        shutil.rmtree(base, ignore_errors=True)


def _answers(sock: Path) -> bool:
    try:
        read_status(sock, timeout=2)
    except OSError:
        return False
    return True


def wait_sync(check: Any, proc: ReplikantProc, within: float = 30.0) -> None:
    """Poll ``check`` until true; fail with the agent's log if it exits or time runs out."""
    deadline = time.monotonic() + within
    while not check():
        assert proc.proc is not None
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the agent did not come up:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.1)


def as_nobody(code: str, *args: str) -> dict[str, Any]:
    """Run Python ``code`` as uid/gid 65534 without groups; it prints one JSON object."""
    out = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


_CONNECT = """
import errno, json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print(json.dumps({"errno": 0}))
except OSError as e:
    print(json.dumps({"errno": e.errno, "name": errno.errorcode.get(e.errno, "?")}))
"""

_OPEN = """
import errno, json, os, sys
try:
    os.close(os.open(sys.argv[1], int(sys.argv[2])))
    print(json.dumps({"errno": 0}))
except OSError as e:
    print(json.dumps({"errno": e.errno, "name": errno.errorcode.get(e.errno, "?")}))
"""


def expect_eacces(door: Door, surface: str, attempt: str, got: dict[str, Any], path: Path) -> None:
    """Record what uid 65534 got trying ``attempt`` on ``path``: EACCES is the refusal."""
    door.attempt(
        surface,
        f"uid 65534 {attempt}",
        expected="EACCES",
        observed=f"{got.get('name', 'allowed')} (mode {os.stat(path).st_mode & 0o777:04o})",
        refused=got["errno"] == 13,
    )


def test_a_local_user_cannot_reach_the_agents_sockets(agent: Running, door: Door) -> None:
    """`nobody` cannot connect to the control socket or any NBD export socket (EACCES)."""
    nbd = sorted(agent.socket_dir.glob("*.sock"))
    assert nbd, "the agent serves its disk on a unix socket"
    for sock in [agent.control, *nbd]:
        got = as_nobody(_CONNECT, str(sock))
        where = sock.relative_to(agent.base)
        expect_eacces(door, "agent unix socket", f"connects to {where}", got, sock)
    for directory, want in ((agent.control.parent, 0o750), (agent.socket_dir, 0o750)):
        mode = os.stat(directory).st_mode & 0o777
        door.attempt(
            "agent unix socket",
            f"{directory.relative_to(agent.base)} open to others",
            expected=f"mode {want:04o}",
            observed=f"mode {mode:04o}",
            refused=mode & 0o007 == 0,
        )


def test_a_local_user_cannot_read_or_write_the_agents_files(agent: Running, door: Door) -> None:
    """`nobody` can neither read nor write any file the agent keeps (state, maps, lock)."""
    files = [p for p in agent.state_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".map" for p in files), files
    for path in files:
        for what, flags in (("reads", os.O_RDONLY), ("writes", os.O_WRONLY)):
            got = as_nobody(_OPEN, str(path), str(flags))
            where = path.relative_to(agent.base)
            expect_eacces(door, "agent state files", f"{what} {where}", got, path)


async def test_browser_requests_are_refused_on_every_route(agent: Running, door: Door) -> None:
    """A cross-origin request as a web page sends it (Origin, text/plain) changes nothing."""
    media = agent.base / "browser-media"
    bodies = {
        "/v1/seed/export": {"dir": str(media), "vms": ["vm1"], "force": True},
        "/v1/seed/cancel": {"vms": ["vm1"]},
        "/v1/vms/vm1/repair": {"disks": [{"disk_id": "disk0", "ranges": [[0, 4096]]}]},
    }
    for method, path in ROUTES:
        data = json.dumps(bodies.get(path, {}))
        for label, headers, want, code in BROWSER_ATTEMPTS:
            if method == "GET" and want == 415:
                continue  # reading status changes nothing: any content type will do
            status, doc = await control_request(
                agent.control, method, path, None, data=data, headers=headers
            )
            door.attempt(
                "agent control socket",
                f"{method} {path} {label}",
                expected=f"{want} {code}",
                observed=f"{status} {doc.get('error')}",
                refused=status == want and doc.get("error") == code,
            )
    assert not media.exists()
    refusals = agent.proc.events("control_request_refused")
    # Two browser attempts on a read, three (the non-JSON one too) on every other route.
    assert len(refusals) == sum(2 if m == "GET" else 3 for m, _ in ROUTES)
    assert all(e["peer_uid"] == 0 and e["peer_pid"] > 0 for e in refusals)


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def test_no_tcp_listener_remains(agent: Running, door: Door, tmp_path: Path) -> None:
    """The agent listens on no TCP port (no nbd.tcp_listen), and status_listen is refused."""
    assert agent.proc.proc is not None
    pid = agent.proc.proc.pid
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    listening = mine & _listening_inodes()
    door.attempt(
        "agent control socket",
        "find a TCP listener of the agent process",
        expected="none",
        observed=f"{len(listening)} TCP listening sockets",
        refused=not listening,
    )
    old = tmp_path / "old.toml"
    text = (tmp_path / "agent.toml").read_text()
    old.write_text(text.replace("[agent]\n", '[agent]\nstatus_listen = "127.0.0.1:8741"\n', 1))
    run = subprocess.run(
        [str(Path(sys.executable).with_name("replikant")), "agent", "run", "--config", str(old)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    named = "status_listen was removed" in run.stderr and "control_socket" in run.stderr
    door.attempt(
        "agent control socket",
        "start an agent with the old status_listen = 127.0.0.1:8741",
        expected="refused, naming control_socket",
        observed=f"exit {run.returncode}" + (", message names the fix" if named else ""),
        refused=run.returncode != 0 and named,
    )


@pytest.fixture
def secret() -> Iterator[Path]:
    """A root-only file the seed export must never write."""
    fd, name = tempfile.mkstemp(prefix="rk-root-only-")
    os.write(fd, SECRET)
    os.close(fd)
    path = Path(name)
    path.chmod(0o600)
    yield path
    path.unlink()


def _untouched(secret: Path) -> bool:
    return secret.read_bytes() == SECRET and secret.stat().st_mode & 0o777 == 0o600


async def _export(agent: Running, media: Path, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"dir": str(media), "vms": ["vm1"], "force": True, **extra}
    status, doc = await control_request(agent.control, "POST", "/v1/seed/export", body)
    return status, doc


def _plant(media: Path, target: Path, *, owner: int, export_id: str) -> None:
    """The finding's plant: an export marker and vm1/disk0.img -> target."""
    (media / "vm1").mkdir(parents=True)
    marker = {
        "format": "replikant-seed-export",
        "export_id": export_id,
        "files": ["vm1/disk0.img", "vm1/disk0.xxh3"],
    }
    (media / ".replikant-export.json").write_text(json.dumps(marker))
    (media / "vm1" / "disk0.img").symlink_to(target)
    for p in (media, media / "vm1", media / ".replikant-export.json"):
        os.chown(p, owner, owner)
    os.lchown(media / "vm1" / "disk0.img", owner, owner)


async def test_planted_links_in_seed_media_are_never_written(
    agent: Running, door: Door, secret: Path
) -> None:
    """A marker and a link to a root-only file in the media directory leave the file untouched,
    whoever planted them, and a directory others own or may write to is refused."""
    cases = []
    # The finding: `nobody` made the directory and planted the marker and the link.
    theirs = agent.base / "m-nobody"
    _plant(theirs, secret, owner=NOBODY, export_id="x")
    cases.append(("directory of uid 65534 with marker + link", theirs, {}, "403 media_not_owned"))
    # The same plant in a directory of ours, but marker and link by `nobody`.
    planted = agent.base / "m-planted"
    _plant(planted, secret, owner=NOBODY, export_id="x")
    os.chown(planted, 0, 0)
    os.chown(planted / "vm1", 0, 0)
    planted.chmod(0o700)
    cases.append(("foreign marker + link, --resume", planted, {"resume": True}, "409"))
    # Even a marker that looks like the agent's own: the link itself is never followed.
    forged = agent.base / "m-forged"
    _plant(forged, secret, owner=0, export_id="same")
    forged.chmod(0o700)
    cases.append(
        ("own-looking marker + link, same export id", forged, {"export_id": "same"}, "409")
    )
    cases.append(("own-looking marker + link, --resume", forged, {"resume": True}, "409"))
    shared = agent.base / "m-shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    cases.append(("a world-writable directory", shared, {}, "403 media_unsafe"))
    link = agent.base / "m-link"
    link.symlink_to(planted)
    cases.append(("the media directory itself a link", link, {}, "403 media_unsafe"))
    for what, media, extra, expected in cases:
        status, doc = await _export(agent, media, **extra)
        untouched = _untouched(secret)
        door.attempt(
            "agent seed export",
            f"export vm1 into {what}",
            expected=f"{expected}, target untouched",
            observed=f"{status} {doc.get('error')}, target "
            + ("untouched" if untouched else "CHANGED"),
            refused=status >= 400 and untouched,
        )
    events = agent.proc.events("seed_export_requested")
    assert len(events) == len(cases)
    assert all(e["peer_uid"] == 0 and e["pauses_replication"] for e in events)


async def test_seed_media_is_private(agent: Running, door: Door) -> None:
    """Exported media: files 0600 and directories 0700, unreadable by `nobody`."""
    media = agent.base / "media"
    status, doc = await _export(agent, media)
    assert status == 200, doc
    entries = [media, *media.rglob("*")]
    assert any(p.suffix == ".img" for p in entries)
    for path in entries:
        mode = path.lstat().st_mode & 0o777
        want = 0o700 if path.is_dir() else 0o600
        door.attempt(
            "agent seed media",
            f"mode of {path.relative_to(agent.base)}",
            expected=f"{want:04o}",
            observed=f"{mode:04o}",
            refused=mode == want,
        )
    image = media / "vm1" / "disk0.img"
    got = as_nobody(_OPEN, str(image), str(os.O_RDONLY))
    expect_eacces(door, "agent seed media", "reads vm1/disk0.img", got, image)
    status, body = await control_request(agent.control, "GET", "/v1/status")
    (disk,) = body["disks"]
    assert disk["seed"]["state"] == "awaiting_import"
    assert "paused" in disk["seed"]["replication"]


def test_config_paths_with_dot_dot_are_refused(tmp_path: Path, door: Door) -> None:
    """An image, state or socket path with '..' (or relative, or NUL) is refused by name."""
    pki = make_pki(tmp_path / "pki")
    image = make_image(tmp_path / "a.img", MiB)
    cases = [
        ("image", "../../etc/passwd", "vms[0].disks[0].image"),
        ("state_dir", "/var/lib/../../tmp/state", "agent.state_dir"),
        ("socket_dir", "/run/../tmp/x", "nbd.socket_dir"),
        ("control_socket", "/run/rk/../../tmp/a.sock", "agent.control_socket"),
    ]
    for what, value, key in cases:
        vm = VMSpec("vm1", [DiskSpec("d0", image)], uuid=uuid.uuid4())
        cfg = write_agent_config(
            tmp_path / f"{what}.toml",
            pki=pki,
            broker_urls=["https://127.0.0.1:1"],
            vms=[vm],
            state_dir=tmp_path / "state",
            socket_dir=tmp_path / "s",
        )
        text = cfg.read_text()
        if what == "image":
            text = text.replace(f'image = "{image}"', f'image = "{value}"')
        elif what == "state_dir":
            text = text.replace(f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{value}"')
        elif what == "socket_dir":
            text = text.replace(f'socket_dir = "{tmp_path / "s"}"', f'socket_dir = "{value}"')
        else:
            text = text.replace("[agent]\n", f'[agent]\ncontrol_socket = "{value}"\n', 1)
        cfg.write_text(text)
        problems = check_config(load_config(cfg, AgentConfig))
        hit = [p for p in problems if p.startswith(f"{key}:") and "'..'" in p]
        door.attempt(
            "agent config",
            f"{key} = {value!r}",
            expected="refused, naming the key",
            observed=hit[0] if hit else f"accepted ({problems})",
            refused=bool(hit),
        )


def test_control_socket_directory_plants_are_refused(tmp_path: Path, door: Door) -> None:
    """A control socket directory that is a link, someone else's, or group-writable is refused."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o770)
    for what, directory in (("a link", link), ("uid 65534's", theirs), ("group-writable", loose)):
        try:
            sock = open_control_socket(directory / "agent.sock", os.getegid())
        except AgentError as exc:
            observed, refused = exc.message, True
        else:
            sock.close()
            observed, refused = "bound", False
        door.attempt(
            "agent control socket",
            f"control socket in {what} directory",
            expected="refused at start",
            observed=observed,
            refused=refused and not any(target.iterdir()),
        )


async def test_state_changing_requests_name_who_asked(agent: Running, door: Door) -> None:
    """Every accepted state-changing request is logged once with the caller's pid/uid/gid."""
    status, doc = await control_request(agent.control, "POST", "/v1/seed/cancel", {"vms": ["vm1"]})
    assert status == 200, doc
    (event,) = [e for e in agent.proc.events("control_request") if e["path"] == "/v1/seed/cancel"]
    door.attempt(
        "agent control socket",
        "POST /v1/seed/cancel without a trace",
        expected="control_request logged with peer pid/uid/gid",
        observed=f"pid {event.get('peer_pid')} uid {event.get('peer_uid')} gid "
        f"{event.get('peer_gid')}",
        refused=event.get("peer_pid") == os.getpid() and event.get("peer_uid") == os.getuid(),
    )


async def test_reverse_change_maps_are_validated_and_never_name_a_path(
    agent: Running, door: Door
) -> None:
    """Regions handed to the role act must be non-negative pairs, and a disk id from the request
    never names a file: only the configured disks' hints are written (decision 042)."""
    bad = {"act": "replicate", "disks": [{"disk_id": "disk0", "regions": [[-1, 5]]}]}
    status, doc = await control_request(agent.control, "POST", "/v1/vms/vm1/role", bad)
    door.attempt(
        "agent role act",
        "replicate with a negative region",
        expected="400 bad_request, no hint written",
        observed=f"{status} {doc.get('error')}",
        refused=status == 400 and not list(agent.state_dir.rglob("*.reverse.json")),
    )
    planted = {"act": "replicate", "disks": [{"disk_id": "../../planted", "regions": [[0, 1]]}]}
    status, doc = await control_request(agent.control, "POST", "/v1/vms/vm1/role", planted)
    written = sorted(str(p.relative_to(agent.base)) for p in agent.base.rglob("*planted*"))
    door.attempt(
        "agent role act",
        "replicate naming a disk id with ../",
        expected="no file named after it anywhere",
        observed=f"{status}; files: {written}",
        refused=not written,
    )
