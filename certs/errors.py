"""The certificate helper's errors: every one names the file or identity at fault and the fix."""

from __future__ import annotations

from common.errors import ReplikantError


class CertsError(ReplikantError):
    """A CA directory, certificate or key cannot be created, read or used as asked."""
