"""How the operator's CLI shows things: times, sizes, roles (PRIMARY, REPLICA and TEST each
have their own word, symbol and colour so they can never be confused) and merged status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.text import Text

ROLE_STYLE: dict[str, tuple[str, str]] = {
    "PRIMARY": ("▲ PRIMARY", "bold green"),
    "REPLICA": ("▽ REPLICA", "bold cyan"),
    "TEST": ("◆ TEST", "bold magenta reverse"),
    "FAILED-OVER": ("△ FAILED-OVER", "bold yellow"),
    "FENCED": ("✕ FENCED", "bold red reverse"),
}
HEALTH_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red"}


def when(ts: float | None) -> str:
    """A UNIX time as local ``YYYY-MM-DD HH:MM:SS`` ("-" for none)."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def size_text(n: int) -> str:
    """A byte count in IEC units (``1.5 MiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def role_text(site: str, role: str) -> Text:
    """``site: ▲ PRIMARY`` in the role's own colour."""
    label, style = ROLE_STYLE.get(role, (f"? {role}", "bold red"))
    text = Text(f"{site}: ")
    text.append(label, style=style)
    return text


def merge_status(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One status document from every broker's (roles of a VM merged across sites)."""
    by_uuid: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for vm in doc.get("vms", []):
            seen = by_uuid.get(vm["uuid"])
            if seen is None:
                by_uuid[vm["uuid"]] = dict(vm)
            elif vm.get("generation", 0) >= seen.get("generation", 0):
                # The broker at the newer generation knows the newer truth (after a failover).
                by_uuid[vm["uuid"]] = {**vm, "roles": {**seen["roles"], **vm["roles"]}}
            else:
                seen["roles"] = {**vm["roles"], **seen["roles"]}
    vms = sorted(by_uuid.values(), key=lambda v: v["name"])
    return {"vms": vms, "brokers": [d.get("broker") for d in docs]}
