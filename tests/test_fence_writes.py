"""Every store write of the broker runs inside the owner fence, and a step-down leaves no
engine open (decision 031, issue 12)."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.errors import FencedError
from broker.fence import NO_FENCE
from broker.handover import _reset_as_replica
from broker.store import Replica, Store
from tests.support_broker import make_pki, running_broker

ROOT = Path(__file__).resolve().parent.parent
VM = "6f1b0c36-3a3e-4d53-9d7e-1f8f4e0a9b21"

# The writes of the store: a call of one of these must sit in a write section.
WRITES = {
    "update_meta",
    "append_applied",
    "commit_applied",
    "apply_retention",
    "drop_oldest",
    "drop_all",
    "create_replica",
    "copy_image",
    "_roll_back",
    "_reset_as_replica",
}
# Functions whose body writes but that run only inside a section their caller holds; each
# reference to one must itself be fenced (checked below), or it is listed with its reason.
INSIDE = {
    ("broker/direct.py", "commit"): "DirectApply.begin entered the section; release leaves it",
    ("broker/direct.py", "begin"): "drop_all after entering the section on the line above",
    ("broker/apply.py", "_apply_fenced"): "called only inside Store.writing by apply_next",
    ("broker/handover.py", "_reset_as_replica"): "passed to service.fenced by every caller",
    ("broker/fence.py", "check_epoch"): "the fence itself stamping the epoch it checked",
    ("broker/store.py", "_recover_counters"): "load: the new owner holds every .fence exclusively",
    ("broker/fence.py", "fenced"): "the section itself",
    ("broker/store.py", "commit_applied"): "a write itself: each call of it is held to a section",
    ("broker/points.py", "*"): "the index's own methods, run by apply and retention sections",
}
CREATE_OK = {"broker/store.py"}  # create_replica checks the epoch under the fence lock itself


def _writes(tree: ast.AST) -> list[tuple[ast.Call, str, list[ast.AST]]]:
    """Every call of a write, and every call a write is handed to (``to_thread(w, ...)``) other
    than ``fenced(replica, w, ...)``, with the write's name and the ancestors (outermost first)."""
    out: list[tuple[ast.Call, str, list[ast.AST]]] = []

    def walk(node: ast.AST, up: list[ast.AST]) -> None:
        if isinstance(node, ast.Call):
            if _name(node) in WRITES:
                out.append((node, _name(node), up))
            handed = [] if _name(node) == "fenced" else node.args
            for arg in handed:
                if isinstance(arg, ast.Attribute | ast.Name) and _ref(arg) in WRITES:
                    out.append((node, _ref(arg), up))
        for child in ast.iter_child_nodes(node):
            walk(child, [*up, node])

    walk(tree, [])
    return out


def _ref(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _name(call: ast.Call) -> str:
    return _ref(call.func)


def _in_section(call: ast.Call, up: list[ast.AST]) -> bool:
    """Inside a ``with`` that holds ``.writing(...)`` (as an item, or entered before the call)."""
    for node in up:
        if isinstance(node, ast.With | ast.AsyncWith):
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Call)
                    and _name(sub) == "writing"
                    and sub.lineno <= call.lineno
                ):
                    return True
    return False


def test_every_store_write_under_broker_is_fenced() -> None:
    """Each call of a store write in broker/ sits in a write section, is create_replica with an
    epoch, or is inside a function listed (with its reason) as run only within one."""
    unfenced = []
    for path in sorted((ROOT / "broker").glob("*.py")):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        for call, name, up in _writes(tree):
            funcs = [n.name for n in up if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            if name == "create_replica" and any(k.arg == "epoch" for k in call.keywords):
                continue
            if _in_section(call, up):
                continue
            if (rel, "*") in INSIDE or any((rel, f) in INSIDE for f in funcs):
                continue
            unfenced.append(f"{rel}:{call.lineno} {name} in {'.'.join(funcs)}")
    assert not unfenced, "store writes outside a write section:\n" + "\n".join(unfenced)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in {".lock", ".fence"}
    }


def deposed_store(tmp_path: Path) -> tuple[Store, Replica]:
    """A store whose replica was created by owner epoch 1, then owner b claimed epoch 2."""
    store = Store(tmp_path / "store")
    store.claim_epoch(1, "a")
    replica = _create(store, "disk0", 1)
    store.claim_epoch(2, "b")
    return store, replica


def _create(store: Store, disk_id: str, epoch: int) -> Replica:
    return store.create_replica(
        vm_uuid=VM,
        disk_id=disk_id,
        vm_name="web1",
        disk_size=1 << 20,
        block_size=4096,
        generation=1,
        epoch=epoch,
    )[0]


def _create_another(store: Store, replica: Replica) -> Replica:
    return _create(store, "disk1", 1)


def _fenced(write: Callable[[Store, Replica], object]) -> Callable[[Store, Replica], object]:
    return lambda store, replica: store.fenced(replica, 1, write, store, replica)


# One row per kind of write the broker does outside apply and journal, as the broker does it
# (retention's segment deletions go through the same Store.fenced: the AST test holds them to it).
PATHS: dict[str, Callable[[Store, Replica], object]] = {
    "replica creation (PUT, seed, adopt)": _create_another,
    "meta change (re-announce, source change, promote, settle)": _fenced(
        lambda s, r: r.update_meta(source_host="other", generation=9)
    ),
    "failover reset (adopt, cancel)": _fenced(lambda s, r: _reset_as_replica(r, 9)),
    "seed commit line": _fenced(lambda s, r: r.path.joinpath("applied.log").write_bytes(b"x")),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_deposed_owner_writes_nothing(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write path of a deposed owner (epoch 1 under a store at 2) is refused before it
    writes a byte; with the fence disabled the same write goes through (the fence stops it)."""
    store, replica = deposed_store(tmp_path)
    before = snapshot(store.root)
    with pytest.raises(FencedError) as err:
        PATHS[path](store, replica)
    assert err.value.details == {"epoch": 1, "stored_epoch": 2}
    assert snapshot(store.root) == before
    assert not (store.root / VM / "disk1").exists()
    assert not list((store.root / VM).glob(".*creating"))

    monkeypatch.setenv(NO_FENCE, "1")
    open_store = Store(store.root)
    PATHS[path](open_store, open_store.get(VM, "disk0") or replica)
    assert snapshot(store.root) != before


async def test_a_step_down_closes_an_uploading_engine_when_the_upload_ends(
    tmp_path: Path,
) -> None:
    """end_owning returns at once although an upload holds a replica's engine, and the engine's
    descriptors are closed as soon as that upload lets go (never left open)."""
    pki = make_pki(tmp_path / "pki")
    async with running_broker(pki, tmp_path / "store") as svc:
        busy = svc.engine_for(_create(svc.store, "disk0", svc.epoch))
        idle = svc.engine_for(_create(svc.store, "disk1", svc.epoch))
        fd = busy.image_fd
        # Held as an upload in flight holds it (broker/ingest.py): a real upload cannot be
        # paused at this point from outside.
        await busy.ingest_lock.acquire()
        started = time.monotonic()
        await svc.end_owning()
        assert time.monotonic() - started < 2.0
        assert idle.image_fd == -1, "an idle engine was not closed at once"
        assert busy.image_fd == fd, "closed under the upload in flight"
        assert os.fstat(fd).st_size == 1 << 20
        busy.ingest_lock.release()
        for _ in range(100):
            if busy.image_fd == -1:
                break
            await asyncio.sleep(0.01)
        assert busy.image_fd == -1, "the engine stayed open after its upload ended"
