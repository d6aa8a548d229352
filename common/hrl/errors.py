"""Refusals of the HRL batch codec.

Every refusal is a :class:`BatchFormatError` that names the field at fault (``field``, e.g.
``"header.block_size"`` or ``"extent.stored_len"``) and the byte offset in the batch stream
where it was found (``position``), so an operator can tell a bad agent from a bad network and a
developer can find the byte in a capture. The encoder raises the same classes for requests that
would produce a batch the decoder refuses.
"""

from __future__ import annotations

from typing import ClassVar

from common.errors import ReplikantError

_RESEND = (
    "none needed: the agent resends the batch; if this keeps happening, check the network path "
    "and the source host's memory and disk"
)
_AGENT_BUG = "the agent produced an invalid batch: report it with the agent's version and logs"


class BatchFormatError(ReplikantError):
    """A batch stream (or a request to the encoder) breaks the HRL batch format.

    ``field`` names the field at fault and ``position`` is the byte offset in the batch stream
    at which it was found. The message names the field and its value.
    """

    default_fix: ClassVar[str] = _AGENT_BUG

    def __init__(self, message: str, *, field: str, position: int, fix: str | None = None):
        super().__init__(
            f"HRL batch: {message} [{field} at byte {position}]",
            fix=fix if fix is not None else self.default_fix,
        )
        self.field = field
        self.position = position


class BadMagic(BatchFormatError):
    """The stream does not start with the batch magic, or the trailer magic is missing."""

    default_fix: ClassVar[str] = (
        "check that the sender is a Replikant agent and that nothing between it and the broker "
        "rewrites the body (a text-mode transfer changes the CR LF in the magic)"
    )


class UnsupportedVersion(BatchFormatError):
    """The batch uses a format version this decoder does not speak."""

    default_fix: ClassVar[str] = (
        "run the same Replikant release on the agent and the broker (or upgrade the broker first)"
    )


class HeaderChecksumMismatch(BatchFormatError):
    """The header's xxh3 does not match its bytes: the header was corrupted."""

    default_fix: ClassVar[str] = _RESEND


class BadField(BatchFormatError):
    """A field holds a value the format forbids (out of range, misaligned, out of order...)."""


class LimitExceeded(BatchFormatError):
    """A field is legal for the format but exceeds this decoder's :class:`DecodeLimits`."""

    default_fix: ClassVar[str] = (
        "if the batch is legitimate, raise the broker's decode limits; otherwise check the agent"
    )


class ExtentChecksumMismatch(BatchFormatError):
    """An extent record's checksum, or its data's xxh3, does not match: corruption."""

    default_fix: ClassVar[str] = _RESEND


class Truncated(BatchFormatError):
    """The stream ended before the batch did (a batch without its trailer is incomplete)."""

    default_fix: ClassVar[str] = _RESEND


class TrailingData(BatchFormatError):
    """Bytes follow the trailer; nothing may."""

    default_fix: ClassVar[str] = (
        "check for a proxy or a buggy agent appending to the request body; the agent resends "
        "the batch"
    )


class TrailerMismatch(BatchFormatError):
    """The trailer disagrees with the header or with the extents actually seen."""

    default_fix: ClassVar[str] = _RESEND
