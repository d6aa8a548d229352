"""NBD protocol core and server shared by the agent (disk exports) and the broker (point-in-time
exports).

- :mod:`common.nbd.protocol`: the protocol as a sans-I/O state machine and its constants.
- :mod:`common.nbd.backend`: the :class:`Export` interface backends implement, and
  :class:`FileExport`.
- :mod:`common.nbd.server`: :class:`NBDServer`, the asyncio server.
- :mod:`common.nbd.client`: a small client, for tests and tools.
"""

from common.nbd.backend import Export, ExportBase, ExportError, FileExport
from common.nbd.protocol import Errno, ProtocolError, RemoteProtocolError
from common.nbd.server import NBDServer

__all__ = [
    "Errno",
    "Export",
    "ExportBase",
    "ExportError",
    "FileExport",
    "NBDServer",
    "ProtocolError",
    "RemoteProtocolError",
]
