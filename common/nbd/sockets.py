"""Socket chores of the NBD server: stale unix socket files, and naming the client for logs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from pathlib import Path


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; raise if a server still accepts connections there."""
    if not path.is_socket():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


def peer_name(transport: asyncio.BaseTransport, kind: str) -> str:
    """``host:port`` of a TCP client; ``pid:P,uid:U`` of a unix-socket one (``SO_PEERCRED``)."""
    if kind == "tcp":
        peer = transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "tcp:?"
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "SO_PEERCRED"):
        with contextlib.suppress(OSError, AttributeError, struct.error):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return f"pid:{pid},uid:{uid}"
    return "unix:?"
