"""NBD errors: one root, :class:`NBDError`, for protocol errors and export (backend) errors, and the
mapping of a backend's exception to the NBD error value sent on the wire."""

from __future__ import annotations

import errno
from typing import Final

from common.nbd.constants import Errno


class NBDError(Exception):
    """Base of every NBD error: the protocol's (:class:`ProtocolError`) and the exports'
    (:class:`ExportError`)."""


class ProtocolError(NBDError):
    """Base of NBD protocol errors."""


class RemoteProtocolError(ProtocolError):
    """The client broke the protocol in a way we cannot answer; the connection must be dropped.

    ``reason`` is a short snake_case tag for logs and metrics; the message says what was seen.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """The server-side code used this class wrongly (a bug in the caller, not in the client)."""


class ExportError(NBDError):
    """A backend refusing a request with a specific NBD error value (an :class:`Errno`)."""

    def __init__(self, error: Errno, message: str = "") -> None:
        super().__init__(message or error.name)
        self.error = error
        self.message = message


_ERRNO_MAP: Final = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_error_for(exc: BaseException) -> Errno:
    """The NBD error value to send for a backend exception (EIO when nothing fits better)."""
    if isinstance(exc, ExportError):
        return exc.error
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, Errno.EIO)
    return Errno.EIO
