"""The error hierarchy shared by every Replikant package.

Every error carries an operator-facing message that names the thing at fault and, where there
is one, the fix. Packages derive their own hierarchy from :class:`ReplikantError` so that the CLI
can print any of them the same way without a traceback.
"""

from __future__ import annotations

from typing import Any


class ReplikantError(Exception):
    """Base of every error Replikant raises on purpose.

    ``message`` says what went wrong and names the thing; ``fix`` says what the operator can do.
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message} (fix: {self.fix})"
        return self.message


def refusal_body(error: ReplikantError, code: str, details: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of an HTTP refusal (docs/protocol/http.md): code, message, fix, details."""
    return {"error": code, "message": error.message, "fix": error.fix, "details": details}


class ConfigError(ReplikantError):
    """A configuration file is missing, unreadable or fails validation."""

    def __init__(self, message: str, *, problems: list[str] | None = None, fix: str | None = None):
        super().__init__(message, fix=fix)
        self.problems = problems or []

    def __str__(self) -> str:
        lines = [self.message, *(f"  - {p}" for p in self.problems)]
        if self.fix:
            lines.append(f"fix: {self.fix}")
        return "\n".join(lines)


def refuse_to_start(problems: list[str], *, source: str, service: str) -> None:
    """Raise :class:`ConfigError` listing ``problems`` of ``source``, one line each (if any)."""
    if problems:
        raise ConfigError(
            f"{source} has {len(problems)} problem(s); the {service} did not start",
            problems=problems,
        )
