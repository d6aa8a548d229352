"""NBD protocol core and server shared by the agent (disk exports) and the broker (point-in-time
exports).

- :mod:`common.nbd.constants`: the wire constants (magics, flags, error values, limits).
- :mod:`common.nbd.errors`: :class:`NBDError`, the one root of protocol and export errors.
- :mod:`common.nbd.events`: the connection states and events the core returns.
- :mod:`common.nbd.protocol`: the protocol as a sans-I/O state machine.
- :mod:`common.nbd.backend`: the :class:`Export` interface backends implement, and
  :class:`FileExport`.
- :mod:`common.nbd.server`: ``NBDServer``, the asyncio server (import it from there: this package
  does not load it, so the core imports without asyncio servers or TLS).
- :mod:`common.nbd.client`: a small client, for tests and tools.
"""

from common.nbd.backend import Export, ExportBase, FileExport
from common.nbd.constants import Errno
from common.nbd.errors import (
    ExportError,
    LocalProtocolError,
    NBDError,
    ProtocolError,
    RemoteProtocolError,
)

__all__ = [
    "Errno",
    "Export",
    "ExportBase",
    "ExportError",
    "FileExport",
    "LocalProtocolError",
    "NBDError",
    "ProtocolError",
    "RemoteProtocolError",
]
