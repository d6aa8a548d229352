"""The agent's error hierarchy: every error the agent raises on purpose derives from AgentError."""

from __future__ import annotations

from common.errors import ReplikantError


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
