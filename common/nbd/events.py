"""What the sans-I/O NBD core (:mod:`common.nbd.protocol`) tells its driver: the connection's state
and the events :meth:`~common.nbd.protocol.ServerConnection.next_event` returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from common.nbd.backend import Export


class State(enum.Enum):
    """Where a connection is in the protocol."""

    CLIENT_FLAGS = "client_flags"  # greeting sent, waiting for the client's 32-bit flags
    OPTIONS = "options"  # option haggling
    TLS_PENDING = "tls_pending"  # STARTTLS acknowledged; the I/O layer must upgrade the transport
    TRANSMISSION = "transmission"
    CLOSED = "closed"  # aborted, disconnected, or broken: no more input is accepted


class NeedData:
    """The type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
"""Returned by :meth:`ServerConnection.next_event` when it needs more bytes."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The client asked for TLS and we acknowledged: upgrade the transport, then call
    :meth:`ServerConnection.tls_established`. Stop reading plaintext until then."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client ended negotiation with ``NBD_OPT_ABORT``; send what is pending, then close."""


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """The client chose an export (``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME``)."""

    export: Export
    transmission_flags: int
    structured_replies: bool
    base_allocation: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client sent ``NBD_CMD_DISC``: finish outstanding requests, then close."""


class Request(NamedTuple):
    """A validated transmission request the server must execute.

    ``data`` is the WRITE payload as a view into the receive buffer: it is valid only until the
    next call that feeds bytes in (``get_buffer`` / ``receive_data``), so execute the request (or
    copy the payload) before returning to the event loop.
    """

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    data: memoryview | None


Event = StartTLS | Aborted | TransmissionStarted | Disconnect | Request


class TLSMode(enum.Enum):
    """How a listener treats TLS (the spec's NOTLS and FORCEDTLS modes)."""

    NONE = "none"  # STARTTLS is refused with NBD_REP_ERR_POLICY
    REQUIRED = "required"  # every option but STARTTLS/ABORT gets NBD_REP_ERR_TLS_REQD until then
