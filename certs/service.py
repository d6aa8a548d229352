"""Is a service's own ``[tls]`` certificate fit to start with? (agent and broker startup)

A wrong-role, foreign-CA or other-name certificate would let the service start and then fail
every connection with a vague error; :func:`service_cert_problems` finds these before it starts.
"""

from __future__ import annotations

import datetime as dt

from certs.check import Problem, check_certificate
from certs.errors import CertsError
from certs.store import load_certificate, load_private_key
from common.config import TLSFiles
from common.logs import get_logger
from common.tls import Identity, TLSIdentityError, identity_from_cert

_log = get_logger("certs.service")


def _issue_command(identity: Identity) -> str:
    if identity.role == "broker":
        return f"replikant certs issue broker --cluster {identity.cluster} --node {identity.name}"
    return f"replikant certs issue {identity.role} --host {identity.name}"


def service_cert_problems(
    tls: TLSFiles, expected: Identity, *, now: dt.datetime | None = None
) -> list[Problem]:
    """Every fault of ``tls.cert`` for the service ``expected`` (errors and warnings).

    Checked against ``tls.ca``: role, identity (``expected``), key match, validity, issuer,
    usages and strength (:func:`certs.check.check_certificate`).
    """
    try:
        cert = load_certificate(tls.cert)
        ca_cert = load_certificate(tls.ca)
        key = load_private_key(tls.key)
    except CertsError as exc:
        return [Problem("unreadable", "error", exc.message, exc.fix or "check the path")]
    issue = _issue_command(expected)
    problems = check_certificate(
        cert,
        ca_cert=ca_cert,
        role=expected.role,
        key=key,
        now=now or dt.datetime.now(dt.UTC),
        label=f"certificate {tls.cert}",
        ca_label=str(tls.ca),
        key_label=str(tls.key),
        ca_dir=str(tls.ca.parent),
    )
    try:
        actual = identity_from_cert(cert)
    except TLSIdentityError:
        return problems  # reported as no_identity
    if actual.role == expected.role and actual != expected:
        problems.append(
            Problem(
                "wrong_identity",
                "error",
                f"certificate {tls.cert} identifies {actual}, but this {expected.role} is "
                f"{expected} (from its configuration)",
                f"deploy the certificate issued for {expected} (`{issue}`), or correct the "
                "name in the configuration",
            )
        )
    return problems


def startup_problems(tls: TLSFiles, expected: Identity) -> list[str]:
    """The errors as ``tls: ...`` config-problem lines; warnings (expiring soon) are logged."""
    lines = []
    for problem in service_cert_problems(tls, expected):
        if problem.severity == "error":
            lines.append(f"tls: {problem.line()}")
        else:
            _log.warning(
                "certificate_warning",
                code=problem.code,
                identity=str(expected),
                message=problem.message,
                fix=problem.fix,
            )
    return lines
