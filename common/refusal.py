"""What a Replikant service said when it refused a request, as the operator should read it.

Brokers and agents refuse with the JSON body of docs/protocol/http.md (``error``, ``message``,
``fix``, ``details``). Every client (the agent's shipper, the operator's CLI) turns that body,
or a peer that does not speak it, into one sentence here, so the wording is the same wherever
an operator meets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """One refusal: HTTP status, error code, message and the fix the service suggested."""

    status: int
    code: str
    message: str
    fix: str | None

    @classmethod
    def from_body(cls, status: int, body: object, *, fallback: str = "") -> Refusal:
        """Read a refusal body; ``fallback`` is the message when the body names none.

        A body that is not a JSON object (a proxy's HTML page, say) keeps only the status.
        """
        if not isinstance(body, dict):
            return cls(status, f"http_{status}", fallback, None)
        code = str(body.get("error") or f"http_{status}")
        message = body.get("message") or body.get("detail") or fallback or json.dumps(body)
        fix = body.get("fix")
        return cls(status, code, str(message), fix if isinstance(fix, str) else None)

    def sentence(self, peer: str) -> str:
        """``PEER refused (STATUS CODE): MESSAGE``."""
        return f"{peer} refused ({self.status} {self.code}): {self.message}"


def member_redirect(status: int, body: object) -> str | None:
    """The base URL a cluster member's 503 ``not_owner`` sends us to (``details.owner_url``),
    or None for any other answer."""
    if status != 503 or not isinstance(body, dict) or body.get("error") != "not_owner":
        return None
    details = body.get("details")
    url = details.get("owner_url") if isinstance(details, dict) else None
    return url.rstrip("/") if isinstance(url, str) and url.startswith("https://") else None


def not_our_service(peer: str, what: str, config_hint: str) -> tuple[str, str]:
    """Message and fix for a peer whose answer is not JSON: it is not the service we meant.

    ``what`` is the service we expected ("broker", "agent"); ``config_hint`` names the setting
    that holds the peer's address and what it must be.
    """
    return (
        f"{peer} did not answer like a Replikant {what} (the reply is not JSON)",
        f"check {config_hint}",
    )
