"""The agent's error hierarchy: every error the agent raises on purpose derives from AgentError."""

from __future__ import annotations

from typing import Any

from common.errors import ReplikantError, refusal_body


class AgentError(ReplikantError):
    """Base of every error raised on purpose by the agent (source side)."""


class TrackingError(AgentError):
    """The dirty map cannot be opened, persisted or trusted."""


class ShipError(AgentError):
    """A batch could not be delivered; ``retryable`` says whether a later attempt may succeed."""

    def __init__(
        self,
        message: str,
        *,
        fix: str | None = None,
        retryable: bool = True,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, fix=fix)
        self.retryable = retryable
        self.code = code
        self.status = status


class FencedError(ShipError):
    """The broker refuses us for good: our generation is stale or the identity conflicts."""

    def __init__(self, message: str, *, fix: str | None = None, code: str | None = None) -> None:
        super().__init__(message, fix=fix, retryable=False, code=code)


class HookError(AgentError):
    """A freeze/thaw hook failed or timed out (the cut falls back to crash-consistent)."""


class SeedError(AgentError):
    """An export refused or failed; ``code`` and ``status`` become the HTTP error."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int = 409,
        fix: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, fix=fix)
        self.code = code
        self.status = status
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body (the broker's shape: error, message, fix, details)."""
        return refusal_body(self, self.code, self.details)
