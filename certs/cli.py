"""`replikant certs`: the whole PKI from the command line (init, issue, check, rotate, list)."""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from certs.ca import DEFAULT_CA_DAYS, DEFAULT_CA_NAME, utcnow
from certs.check import DEFAULT_WARN_DAYS, days_left, sans_of
from certs.issue import DEFAULT_LEAF_DAYS
from certs.keys import DEFAULT_KEY_TYPE, KEY_TYPES, KeyType
from certs.records import IssuedCert
from certs.store import CertStore
from common.errors import ReplikantError
from common.tls import ROLES, Role

P = ParamSpec("P")
R = TypeVar("R")


class _OperatorError(click.ClickException):
    """Prints a ReplikantError the way `replikant` prints it: message and fix, no traceback."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _operator_errors(func: Callable[P, R]) -> Callable[P, R]:
    # Commands also run outside `replikant`'s main() (click's test runner, other groups), so
    # they turn our errors into click's own, which every runner prints without a traceback.
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ReplikantError as exc:
            raise _OperatorError(str(exc)) from None

    return wrapper


_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    envvar="REPLIKANT_CERTS_DIR",
    help="The CA directory (holds ca.crt, ca.key and the issued certificates). "
    "Env: REPLIKANT_CERTS_DIR.",
)
_key_type_option = click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    default=DEFAULT_KEY_TYPE,
    show_default=True,
    help="Key algorithm: ECDSA P-256 / P-384 or RSA 3072.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _date(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


@click.group(name="certs")
def certs() -> None:
    """Create and check the PKI: a CA, broker/agent/admin certificates, checks and rotation."""


@certs.command()
@_dir_option
@click.option("--force", is_flag=True, help="Replace an existing CA (kept in DIR/backup/).")
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=DEFAULT_CA_DAYS,
    show_default=True,
    help="CA lifetime.",
)
@click.option(
    "--name", "common_name", default=DEFAULT_CA_NAME, show_default=True, help="CA common name."
)
@_key_type_option
@_operator_errors
def init(directory: Path, force: bool, days: int, common_name: str, key_type: KeyType) -> None:
    """Create a CA in DIR (refuses to replace one without --force)."""
    store = CertStore.init(
        directory, common_name=common_name, days=days, key_type=key_type, force=force
    )
    ca = store.ca_certificate()
    click.echo(
        f"created CA {common_name!r} in {store.root}: {store.ca_cert_path.name} (give it to "
        f"every process), {store.ca_key_path.name} (mode 0600, keep it here); expires "
        f"{_date(ca.not_valid_after_utc)}"
    )
    if force:
        click.echo("certificates issued by the previous CA no longer verify: re-issue them")


@certs.group()
def issue() -> None:
    """Issue a broker, agent or admin certificate and its key."""


def _issue_options(*, hosts: bool) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        func = _operator_errors(func)
        func = click.option("--force", is_flag=True, help="Replace an existing certificate.")(func)
        func = _key_type_option(func)
        func = click.option(
            "--days",
            type=click.IntRange(min=1),
            default=DEFAULT_LEAF_DAYS,
            show_default=True,
            help="Lifetime (capped at the CA's).",
        )(func)
        if hosts:
            func = click.option(
                "--ip", "ips", multiple=True, metavar="ADDR", help="Extra IP SAN (repeatable)."
            )(func)
            func = click.option(
                "--dns", multiple=True, metavar="NAME", help="Extra DNS SAN (repeatable)."
            )(func)
        return _dir_option(func)

    return decorate


def _report_issued(issued: IssuedCert) -> None:
    click.echo(
        f"issued {issued.identity}: {issued.cert_path} and {issued.key_path} (mode 0600); "
        f"serial {issued.serial}; expires {_date(issued.not_after)}"
    )
    dns, ips, _ = sans_of(issued.certificate)
    if dns or ips:
        click.echo("  SANs: " + ", ".join([*(f"DNS:{d}" for d in dns), *(f"IP:{i}" for i in ips)]))


@issue.command("broker")
@click.option("--cluster", required=True, help="Cluster name (also the access-point DNS SAN).")
@click.option("--node", required=True, help="This broker's node name.")
@_issue_options(hosts=True)
def issue_broker(
    *,
    directory: Path,
    cluster: str,
    node: str,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    days: int,
    key_type: KeyType,
    force: bool,
) -> None:
    """Broker NODE of CLUSTER: serverAuth+clientAuth, DNS SANs NODE, CLUSTER, NODE.CLUSTER."""
    _report_issued(
        CertStore(directory).issue_broker(
            cluster, node, dns=dns, ips=ips, days=days, key_type=key_type, overwrite=force
        )
    )


@issue.command("agent")
@click.option("--host", required=True, help="The agent's host name.")
@_issue_options(hosts=True)
def issue_agent(
    *,
    directory: Path,
    host: str,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    days: int,
    key_type: KeyType,
    force: bool,
) -> None:
    """The agent on HOST: serverAuth+clientAuth (agents also serve NBD over TLS)."""
    _report_issued(
        CertStore(directory).issue_agent(
            host, dns=dns, ips=ips, days=days, key_type=key_type, overwrite=force
        )
    )


@issue.command("admin")
@click.option("--name", required=True, help="The admin's user name.")
@_issue_options(hosts=False)
def issue_admin(directory: Path, name: str, days: int, key_type: KeyType, force: bool) -> None:
    """Admin NAME: clientAuth only, for the `replikant` CLI and the dashboard."""
    _report_issued(
        CertStore(directory).issue_admin(name, days=days, key_type=key_type, overwrite=force)
    )


@certs.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_dir_option
@click.option("--role", type=click.Choice(ROLES), required=True, help="The role it must fit.")
@click.option(
    "--name",
    help="Broker/agent: the host name or IP peers connect to (must be a SAN). "
    "Admin: the user name.",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The private key to compare [default: FILE with .key].",
)
@click.option(
    "--warn-days",
    type=click.IntRange(min=0),
    default=DEFAULT_WARN_DAYS,
    show_default=True,
    help="Warn when it expires within this many days.",
)
@_json_option
@click.pass_context
@_operator_errors
def check(
    ctx: click.Context,
    *,
    file: Path,
    directory: Path,
    role: Role,
    name: str | None,
    key_path: Path | None,
    warn_days: int,
    as_json: bool,
) -> None:
    """Is FILE fit for ROLE? One line per problem with its fix.

    Exit status 0 when fit (warnings such as expiring_soon or key_missing allowed), 1 when any
    error was found.
    """
    report = CertStore(directory).check(
        file, role=role, name=name, key_path=key_path, warn_days=warn_days
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            click.echo(problem.line())
        if report.ok:
            left = f", {report.days_left} days left" if report.days_left is not None else ""
            click.echo(f"ok: {file} is fit for role {role} ({report.identity}{left})")
    if not report.ok:
        ctx.exit(1)


@certs.command()
@_dir_option
@click.option(
    "--within",
    type=click.IntRange(min=0),
    default=DEFAULT_WARN_DAYS,
    show_default=True,
    help="Renew certificates that expire within this many days.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=None,
    help="Lifetime of the renewed certificates [default: the old certificate's].",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be renewed.")
@_json_option
@_operator_errors
def rotate(directory: Path, within: int, days: int | None, dry_run: bool, as_json: bool) -> None:
    """Renew every certificate expiring within --within days: same identity and SANs, new key.

    The old certificate and key are kept in DIR/backup/<timestamp>/. Restart (or reload) each
    renewed process afterwards. The CA itself is never renewed here.
    """
    store = CertStore(directory)
    now = utcnow()
    ca = store.ca_certificate()
    if days_left(ca.not_valid_after_utc, now) < within:
        click.echo(
            f"warning: the CA {store.ca_cert_path} expires {_date(ca.not_valid_after_utc)}; "
            "renewed certificates cannot outlive it. Create a new CA (`replikant certs init "
            "--force`) and re-issue everything.",
            err=True,
        )
    if dry_run:
        due = store.due(within, now=now)
        if as_json:
            click.echo(json.dumps([info.to_json(now) for info in due], indent=2))
            return
        for info in due:
            click.echo(f"would rotate {info.identity}: expires {_date(info.not_after)}")
        if not due:
            click.echo(f"nothing to rotate: no certificate expires within {within} days")
        return
    rotated = store.rotate(within, days=days, now=now)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rotated], indent=2))
        return
    for r in rotated:
        click.echo(
            f"rotated {r.identity}: new key ({r.key}), serial {r.old_serial} -> {r.new_serial}, "
            f"expires {_date(r.old_not_after)} -> {_date(r.new_not_after)}; old files in "
            f"{r.backup_dir}"
        )
    if rotated:
        click.echo("restart the processes that use these certificates to load them")
    else:
        click.echo(f"nothing to rotate: no certificate expires within {within} days")


@certs.command("list")
@_dir_option
@_json_option
@_operator_errors
def list_(directory: Path, as_json: bool) -> None:
    """Every issued certificate: role, name, identity, SANs, expiry, days left, serial."""
    store = CertStore(directory)
    now = utcnow()
    ca = store.ca_certificate()
    infos = store.certificates()
    if as_json:
        out = {
            "ca": {
                "file": str(store.ca_cert_path),
                "subject": ca.subject.rfc4514_string(),
                "not_after": ca.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
                "days_left": days_left(ca.not_valid_after_utc, now),
                "serial": format(ca.serial_number, "x"),
            },
            "certificates": [info.to_json(now) for info in infos],
        }
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(
        f"CA {ca.subject.rfc4514_string()}: expires {_date(ca.not_valid_after_utc)} "
        f"({days_left(ca.not_valid_after_utc, now)} days left)"
    )
    rows = [("ROLE", "NAME", "IDENTITY", "NOT AFTER", "DAYS", "SERIAL", "SANS")]
    rows += [
        (
            i.identity.role,
            i.identity.name,
            i.identity.uri,
            f"{i.not_after:%Y-%m-%d}",
            str(days_left(i.not_after, now)),
            i.serial,
            ",".join(i.sans[1:]) or "-",
        )
        for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )
