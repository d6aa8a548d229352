"""What the broker's security tests share: a raw HTTPS client that sends a request line exactly
as written (no client-side normalisation of ``..`` or ``%2F``), and a snapshot of a tree."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import TLSFiles
from common.tls import client_context


@dataclass(frozen=True)
class Answer:
    """A response: status, the JSON body's error code and details (empty when not JSON)."""

    status: int
    body: dict[str, Any]

    @property
    def error(self) -> str | None:
        """The refusal's machine code."""
        code = self.body.get("error")
        return str(code) if code is not None else None

    @property
    def field(self) -> str | None:
        """The field a bad_request names."""
        details = self.body.get("details") or {}
        value = details.get("field")
        return str(value) if value is not None else None

    def text(self) -> str:
        """How a door row shows it."""
        return f"{self.status} {self.error} field={self.field}"


async def raw_request(
    url: str,
    tls: TLSFiles,
    method: str,
    target: str,
    *,
    body: bytes = b"",
    content_type: str = "application/json",
) -> Answer:
    """Send ``METHOD target HTTP/1.1`` over mutual TLS with ``target`` byte for byte."""
    host, _, port = url.removeprefix("https://").rpartition(":")
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=client_context(tls), server_hostname=host
    )
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    data = await reader.read()
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = {}
    return Answer(int(status_line.split()[1]), doc if isinstance(doc, dict) else {})


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), links not followed."""
    out = set()
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(str((Path(top) / name).relative_to(root)))
    return out
