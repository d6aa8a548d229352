"""The broker's errors, each with its HTTP status and stable machine code (docs/protocol/http.md).

Handlers raise these; the ingest app turns any :class:`BrokerError` into the JSON refusal body
``{"error", "message", "fix", "details"}`` with :attr:`BrokerError.status`, and logs it once. The
CLI prints them like any other :class:`~common.errors.ReplikantError`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from common.errors import ReplikantError, refusal_body


class BrokerError(ReplikantError):
    """Base of every error the broker raises on purpose.

    ``code`` is the stable machine code of the HTTP body, ``status`` its HTTP status and
    ``details`` the structured facts (identities, sequence numbers, byte counts) behind the message.
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, fix: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, fix=fix)
        self.details: dict[str, Any] = details or {}

    def body(self) -> dict[str, Any]:
        """The JSON refusal body of http.md."""
        return refusal_body(self, self.code, self.details)


class BadRequest(BrokerError):
    """The request itself is malformed (bad JSON, bad query parameter)."""

    status = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, fix: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(
            message,
            fix=fix
            or "correct the request as the message says (docs/protocol/http.md lists each "
            "endpoint's parameters and body); from the replikant agent or CLI, check that its "
            "version matches the broker's",
            details=details,
        )


class MalformedBatch(BrokerError):
    """The upload is not a well-formed batch (names the codec error class, field and position)."""

    status = 400
    code = "malformed_batch"


class CorruptExtent(BrokerError):
    """An extent's data does not match its checksum (names the disk offset)."""

    status = 400
    code = "corrupt_extent"


class NotAuthorised(BrokerError):
    """The peer's certificate identity may not do this (names the identity and the rule)."""

    status = 403
    code = "not_authorised"


class IdentityMismatch(BrokerError):
    """A batch, seed or import names another ``(vm_uuid, disk_id)`` than its target (names both)."""

    status = 403
    code = "wrong_identity"


class UnknownVM(BrokerError):
    """The VM/disk is not enabled for replication here."""

    status = 404
    code = "unknown_vm"


class UnknownPoint(BrokerError):
    """The recovery point does not exist (any more)."""

    status = 404
    code = "unknown_point"


class StaleGeneration(BrokerError):
    """A batch or announcement carries another generation than the replica's."""

    status = 409
    code = "stale_generation"


class GenerationAhead(BrokerError):
    """An agent announces a higher generation than the replica's: only failover raises one."""

    status = 409
    code = "generation_ahead"


class SequenceGap(BrokerError):
    """A batch is not the next one in sequence (names expected and received seq)."""

    status = 409
    code = "sequence_gap"


class IdentityConflict(BrokerError):
    """A replica exists for this identity with another VM name or disk size."""

    status = 409
    code = "identity_conflict"


class UploadInProgress(BrokerError):
    """Another upload for the same disk holds its journal (a stalled or duplicate sender)."""

    status = 409
    code = "upload_in_progress"


class BatchTooLarge(BrokerError):
    """The upload exceeds the broker's limits."""

    status = 413
    code = "batch_too_large"


class FencedError(BrokerError):
    """A write is stamped with an older owner epoch than the store holds (invariant 7)."""

    status = 503
    code = "fenced"


class NotOwner(BrokerError):
    """This broker does not own the cluster and may not accept or apply batches."""

    status = 503
    code = "not_owner"


class StorageFullError(BrokerError):
    """The store has less free space than the batch needs plus the configured reserve."""

    status = 507
    code = "storage_full"


class StoreCorrupt(BrokerError):
    """A replica's on-disk state is inconsistent in a way the broker cannot repair by itself."""

    status = 500
    code = "store_corrupt"


class ApplyVerifyError(BrokerError):
    """Data read back from the replica after a write does not match the batch's checksum."""

    status = 500
    code = "apply_verify_failed"
