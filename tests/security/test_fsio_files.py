"""The shared file primitives (common/fsio.py) that every daemon writes its state with create
private files and follow no link planted in their way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from common.fsio import atomic_write, read_json
from tests.security.rows import Door


def test_atomic_write_creates_private_files_and_replaces_planted_links(
    tmp_path: Path, door: Door
) -> None:
    """A new file is 0600, and a link planted at the target is replaced without touching its
    destination."""
    path = tmp_path / "state.json"
    atomic_write(path, b'{"a": 1}')
    mode = path.stat().st_mode & 0o777
    door.attempt(
        "common.fsio.atomic_write",
        "read a new state file as group or other",
        expected="mode 0600",
        observed=f"mode {mode:04o}",
        refused=mode == 0o600,
    )

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "planted.json"
    link.symlink_to(victim)
    atomic_write(link, b"overwrite")
    observed = f"target is_symlink={link.is_symlink()}, victim holds {victim.read_bytes()!r}"
    door.attempt(
        "common.fsio.atomic_write",
        "plant a symlink at the target to make the write land elsewhere",
        expected="link replaced by a regular file, victim unchanged",
        observed=observed,
        refused=not link.is_symlink()
        and victim.read_bytes() == b"precious"
        and link.read_bytes() == b"overwrite",
    )


def test_read_json_does_not_follow_a_planted_link(tmp_path: Path, door: Door) -> None:
    """A JSON state file replaced by a link to another file is refused with ELOOP."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "x"}')
    link = tmp_path / "meta.json"
    link.symlink_to(secret)
    try:
        got = read_json(link)
        observed, refused = f"read {got!r}", False
    except OSError as exc:
        observed, refused = (
            errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            (exc.errno == errno.ELOOP),
        )
    door.attempt(
        "common.fsio.read_json",
        "replace a state file by a symlink to another file",
        expected="ELOOP",
        observed=observed,
        refused=refused,
    )
    os.unlink(link)
