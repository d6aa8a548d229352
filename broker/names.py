"""Names from outside, checked before they touch a path, the store or a topic.

Every name the broker receives (a URL parameter, a query parameter, a JSON body, a seed media
manifest) passes one of these checks at its entry point. Each refusal is a
:class:`~broker.errors.BadRequest` whose details name the field and the rule, so the caller
knows what to change. The disk id rule is the batch decoder's own (:func:`check_disk_id` of
``common.hrl.format``): a disk the broker accepts in a URL is exactly a disk a batch may name.

The store builds paths only from names checked here, and checks the result again
(:func:`inside`): a name that slipped past a check still cannot leave the store.
"""

from __future__ import annotations

import json
import re
import uuid as uuid_mod
from pathlib import Path
from typing import Final

from broker.errors import BadRequest
from common.config import NAME_PATTERN
from common.hrl import DEFAULT_LIMITS, BatchFormatError
from common.hrl.format import MAX_DISK_ID_LEN, check_disk_id

_NAME: Final = re.compile(NAME_PATTERN)
NAME_RULE: Final = "[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
DISK_ID_RULE: Final = f"[A-Za-z0-9][A-Za-z0-9._-]*, 1..{MAX_DISK_ID_LEN} characters"
UUID_RULE: Final = "a UUID (8-4-4-4-12 hex digits)"
_POINT: Final = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")
POINT_RULE: Final = "GENERATION-SEQ or SEQ, decimal (e.g. 1-42)"
_VM_POINT: Final = re.compile(r"[0-9]{1,19}:[0-9]{1,19}")
VM_POINT_RULE: Final = (
    "GENERATION:CUT, decimal (e.g. 1:1042, as `replikant points VM` lists them), or latest; "
    "a disk's GENERATION-SEQ names no point of a whole VM"
)
_EXPORT: Final = re.compile(r"pit-[A-Za-z0-9._-]{1,250}")
EXPORT_RULE: Final = "pit-[A-Za-z0-9._-]{1,250} (a name from POST /v1/vms/{vm}/exports)"


MAX_LABELS: Final = 64
MAX_LABEL_KEY: Final = 63
MAX_LABEL_VALUE: Final = 256
MAX_LABELS_BYTES: Final = 16 * 1024
LABELS_RULE: Final = (
    f"at most {MAX_LABELS} string labels, keys 1..{MAX_LABEL_KEY} and values at most "
    f"{MAX_LABEL_VALUE} characters, {MAX_LABELS_BYTES} bytes in all"
)


def labels_problem(value: object) -> str | None:
    """What makes ``value`` unfit as a replica's labels (they live in meta.json, which is
    rewritten on every batch, so they stay small), or ``None``."""
    if not isinstance(value, dict):
        return "labels must be an object of strings"
    if len(value) > MAX_LABELS:
        return f"{len(value)} labels, more than the limit of {MAX_LABELS}"
    for key, text in value.items():
        if not isinstance(key, str) or not isinstance(text, str):
            return "labels must be an object of strings"
        if not 1 <= len(key) <= MAX_LABEL_KEY:
            return f"label key {key[:40]!r} must be 1..{MAX_LABEL_KEY} characters"
        if len(text) > MAX_LABEL_VALUE:
            return f"label {key!r} has {len(text)} characters, more than {MAX_LABEL_VALUE}"
    total = len(json.dumps(value).encode())
    if total > MAX_LABELS_BYTES:
        return f"{total} bytes of labels, more than the limit of {MAX_LABELS_BYTES}"
    return None


def labels(value: object, field: str = "labels") -> dict[str, str]:
    """Labels within the limits of :func:`labels_problem`."""
    problem = labels_problem(value)
    if problem is not None:
        raise BadRequest(
            f"{field}: {problem}",
            fix=f"send {LABELS_RULE}",
            details={"field": field, "rule": LABELS_RULE},
        )
    assert isinstance(value, dict)
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(field: str, value: object, rule: str) -> BadRequest:
    """The refusal of ``value`` in ``field``: names the field, the value and the rule."""
    return BadRequest(
        f"{field} {_shown(value)} is not valid: it must be {rule}",
        fix=f"send a {field} that matches {rule}",
        details={"field": field, "rule": rule, "value": _shown(value)},
    )


def vm_uuid(value: object, field: str = "vm_uuid") -> str:
    """The canonical text of a VM UUID (lower case, hyphenated)."""
    if not isinstance(value, str) or len(value) > 45:
        raise refuse(field, value, UUID_RULE)
    try:
        canonical = str(uuid_mod.UUID(value))
    except ValueError:
        raise refuse(field, value, UUID_RULE) from None
    # UUID() also takes "{...}", "urn:uuid:..." and bare hex: only the canonical form is a name.
    if value.lower() != canonical:
        raise refuse(field, value, UUID_RULE)
    return canonical


def disk_id(value: object, field: str = "disk_id") -> str:
    """A disk id, by the batch decoder's rule."""
    try:
        check_disk_id(value, DEFAULT_LIMITS)
    except BatchFormatError:
        raise refuse(field, value, DISK_ID_RULE) from None
    assert isinstance(value, str)
    return value


def name(value: object, field: str) -> str:
    """A VM, host or site name (also a VM given by name or UUID)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise refuse(field, value, NAME_RULE)
    return value


def point_id(value: object, field: str = "point") -> str:
    """A recovery point id as text (parse it with ``broker.points.parse_key``)."""
    if not isinstance(value, str) or not _POINT.fullmatch(value):
        raise refuse(field, value, POINT_RULE)
    return value


def vm_point_id(value: object, field: str = "point") -> str:
    """A VM point id as text, or ``latest`` (parse it with ``broker.points.parse_cut``)."""
    if not isinstance(value, str) or not (value == "latest" or _VM_POINT.fullmatch(value)):
        raise refuse(field, value, VM_POINT_RULE)
    return value


def export_name(value: object, field: str = "name") -> str:
    """The name of a point-in-time export."""
    if not isinstance(value, str) or not _EXPORT.fullmatch(value):
        raise refuse(field, value, EXPORT_RULE)
    return value


def inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused unless it resolves to a path under ``root``.

    Defence in depth: callers pass only checked names, so this fails only on a bug or on a
    symlink planted inside the store.
    """
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise refuse("path", "/".join(parts), f"a path inside {root}")
    return path
