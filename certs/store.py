"""The CA directory on disk: the thin file layer over :mod:`certs.ca`, :mod:`certs.issue` and
:mod:`certs.check`, and the Python API that tests and the lab launcher use to build a PKI fast.

Layout of a CA directory::

    DIR/ca.crt  DIR/ca.key               the CA (key mode 0600, directory mode 0700)
    DIR/brokers/<cluster>-<node>.crt|.key
    DIR/agents/<host>.crt|.key
    DIR/admins/<user>.crt|.key
    DIR/backup/<UTC timestamp>/...       whatever init --force, issue --force or rotate replaced
    DIR/index.json                       every certificate ever issued (serial, identity, dates)

The certificate files are the truth: :meth:`CertStore.certificates` and :meth:`CertStore.rotate`
read them, so a directory assembled by hand or restored without its index still works. Private
keys are created with mode 0600 from the first byte (``os.open(..., 0o600)``) and every file is
replaced atomically (write to a temporary file, fsync, rename).

Example::

    store = CertStore.init(tmp_path / "pki")
    broker = store.issue_broker("c1", "b1", ips=["127.0.0.1"])
    agent = store.issue_agent("h1")
    ctx = common.tls.server_context(broker.tls)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certs.ca import CLOCK_SKEW, DEFAULT_CA_DAYS, DEFAULT_CA_NAME, build_ca, utcnow
from certs.check import (
    DEFAULT_WARN_DAYS,
    CheckReport,
    Problem,
    check_certificate,
    days_left,
)
from certs.errors import CertsError
from certs.issue import DEFAULT_LEAF_DAYS, IPAddress, LeafSpec, build_leaf
from certs.keys import (
    DEFAULT_KEY_TYPE,
    KeyType,
    PrivateKey,
    describe_key,
    generate_key,
    key_from_pem,
    key_to_pem,
    key_type_of,
    weak_key_reason,
)
from certs.records import CertInfo, IssuedCert, Rotation, iso_time
from common.config import current_user
from common.fsio import atomic_write
from common.logs import get_logger
from common.tls import ROLES, Identity, Role, TLSIdentityError, identity_from_cert

ROLE_DIRS: Final[dict[Role, str]] = {"broker": "brokers", "agent": "agents", "admin": "admins"}
INDEX_VERSION: Final = 1

_log = get_logger("certs.store")


# --------------------------------------------------------------------------------------------
# Files


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate, or raise :class:`CertsError` naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertsError(
            f"certificate file {path} does not exist",
            fix="check the path, or `replikant certs list`",
        ) from None
    except OSError as exc:
        raise CertsError(f"cannot read certificate file {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertsError(
            f"{path} is not a PEM certificate",
            fix="pass the .crt file written by `replikant certs issue`",
        ) from None


def load_private_key(path: Path) -> PrivateKey:
    """Read an unencrypted PEM private key, or raise :class:`CertsError` naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertsError(f"private key file {path} does not exist") from None
    except PermissionError as exc:
        user = current_user()
        raise CertsError(
            f"cannot read private key file {path} as user {user}: {exc.strerror}",
            fix=f"the key belongs to the daemon that uses it, mode 0600: `chown {user} {path}` "
            '(docs/operations.md, "Files the daemons use")',
        ) from None
    except OSError as exc:
        raise CertsError(f"cannot read private key file {path}: {exc.strerror}") from None
    return key_from_pem(data, source=str(path))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


# --------------------------------------------------------------------------------------------
# The store


class CertStore:
    """A CA directory: create it, issue, list, check and rotate certificates.

    Methods that write take an exclusive lock on ``DIR/.lock``, so two processes (say, the lab
    launcher issuing in parallel) never interleave their updates of ``index.json``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._ca: tuple[x509.Certificate, PrivateKey] | None = None

    def __repr__(self) -> str:
        return f"CertStore({str(self.root)!r})"

    # -- paths

    @property
    def ca_cert_path(self) -> Path:
        """``DIR/ca.crt``: what every process's ``[tls] ca`` points at."""
        return self.root / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        """``DIR/ca.key``: keep it on the machine that issues certificates only."""
        return self.root / "ca.key"

    @property
    def index_path(self) -> Path:
        """``DIR/index.json``: the issuance history."""
        return self.root / "index.json"

    def cert_path(self, identity: Identity) -> Path:
        """Where the certificate of ``identity`` lives."""
        return self.root / ROLE_DIRS[identity.role] / f"{identity.label}.crt"

    def key_path(self, identity: Identity) -> Path:
        """Where the private key of ``identity`` lives."""
        return self.cert_path(identity).with_suffix(".key")

    def exists(self) -> bool:
        """Whether this directory holds a CA."""
        return self.ca_cert_path.exists() or self.ca_key_path.exists()

    # -- locking, backup, index

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _new_backup_dir(self, now: dt.datetime) -> Path:
        base = self.root / "backup" / f"{now:%Y%m%dT%H%M%SZ}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path

    def _backup(self, files: Iterable[Path], backup_dir: Path) -> None:
        for src in files:
            if not src.exists():
                continue
            dest = backup_dir / src.relative_to(self.root)
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Copied through write_atomic so a backed-up key is 0600 from its first byte too.
            atomic_write(dest, src.read_bytes(), mode=0o600)

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {"version": INDEX_VERSION, "certificates": []}
        except (OSError, ValueError) as exc:
            raise CertsError(
                f"{self.index_path} is unreadable ({exc})",
                fix="move it aside: the certificate files are the truth and `list` still works",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("certificates"), list):
            raise CertsError(
                f"{self.index_path} is not a Replikant certificate index",
                fix="move it aside: the certificate files are the truth and `list` still works",
            )
        return data

    def _record(self, cert: x509.Certificate, path: Path, *, replaces: str | None) -> None:
        index = self._read_index()
        entries: list[dict[str, Any]] = index["certificates"]
        if replaces is not None:
            for entry in entries:
                if entry.get("serial") == replaces:
                    entry["status"] = "replaced"
        info = CertInfo.from_certificate(cert, path)
        entries.append(
            {
                "serial": info.serial,
                "identity": info.identity.uri,
                "role": info.identity.role,
                "name": info.identity.name,
                "cluster": info.identity.cluster,
                "file": str(path.relative_to(self.root)),
                "sans": info.sans,
                "not_before": iso_time(info.not_before),
                "not_after": iso_time(info.not_after),
                "issued_at": iso_time(utcnow()),
                "key": info.key,
                "status": "current",
            }
        )
        atomic_write(self.index_path, json.dumps(index, indent=2).encode() + b"\n", mode=0o644)

    # -- CA

    @classmethod
    def init(
        cls,
        root: str | os.PathLike[str],
        *,
        common_name: str = DEFAULT_CA_NAME,
        days: int = DEFAULT_CA_DAYS,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        force: bool = False,
        now: dt.datetime | None = None,
    ) -> CertStore:
        """Create a CA in ``root`` (created mode 0700 if absent) and return its store.

        Refuses to replace an existing CA unless ``force``; the replaced CA goes to ``backup/``.
        """
        store = cls(root)
        if days < 1:
            raise CertsError(f"--days must be at least 1, not {days}")
        store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = now or utcnow()
        with store._locked():
            existing = [p for p in (store.ca_cert_path, store.ca_key_path) if p.exists()]
            if existing and not force:
                raise CertsError(
                    f"{store.root} already holds a CA ({', '.join(p.name for p in existing)}); "
                    "replacing it would invalidate every certificate it signed",
                    fix="pass --force to replace it (the old CA is kept in backup/), or choose "
                    "another --dir",
                )
            if existing:
                store._backup(existing, store._new_backup_dir(now))
            key = generate_key(key_type)
            cert = build_ca(
                key,
                common_name=common_name,
                not_before=now - CLOCK_SKEW,
                not_after=now + dt.timedelta(days=days),
            )
            atomic_write(store.ca_key_path, key_to_pem(key), mode=0o600)
            atomic_write(store.ca_cert_path, _pem(cert), mode=0o644)
        _log.debug("ca_created", dir=str(store.root), subject=common_name, replaced=bool(existing))
        return store

    def load_ca(self) -> tuple[x509.Certificate, PrivateKey]:
        """The CA certificate and key (cached), or :class:`CertsError` if there is no CA."""
        if self._ca is None:
            if not self.ca_cert_path.exists():
                raise CertsError(
                    f"{self.root} holds no CA ({self.ca_cert_path} does not exist)",
                    fix=f"create one with `replikant certs init --dir {self.root}`, or pass the "
                    "--dir that holds ca.crt",
                )
            self._ca = (load_certificate(self.ca_cert_path), load_private_key(self.ca_key_path))
        return self._ca

    def ca_certificate(self) -> x509.Certificate:
        """The CA certificate alone (does not need the CA key)."""
        if self._ca is not None:
            return self._ca[0]
        if not self.ca_cert_path.exists():
            raise CertsError(
                f"{self.root} holds no CA ({self.ca_cert_path} does not exist)",
                fix="pass the --dir that holds ca.crt",
            )
        return load_certificate(self.ca_cert_path)

    # -- issuing

    def issue(
        self,
        identity: Identity,
        *,
        dns: Iterable[str] = (),
        ips: Iterable[str | IPAddress] = (),
        key_type: KeyType = DEFAULT_KEY_TYPE,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
        overwrite: bool = False,
    ) -> IssuedCert:
        """Issue a certificate and a new key (or ``key``) for ``identity`` and write both.

        Validity runs from ``not_before`` (default: now minus 5 minutes of clock skew) to
        ``not_after`` (default: now plus ``days``), capped at the CA's own expiry. Both may lie
        in the past, which is how tests make expired certificates. An existing certificate for
        the identity is replaced only with ``overwrite`` and kept in ``backup/``.
        """
        spec = LeafSpec.for_identity(identity, dns=dns, ips=ips)
        ca_cert, ca_key = self.load_ca()
        now = utcnow()
        start = not_before if not_before is not None else now - CLOCK_SKEW
        end = not_after if not_after is not None else now + dt.timedelta(days=days)
        if end > ca_cert.not_valid_after_utc:
            _log.warning(
                "certificate_lifetime_capped",
                identity=identity.uri,
                requested=iso_time(end),
                ca_not_after=iso_time(ca_cert.not_valid_after_utc),
            )
            end = ca_cert.not_valid_after_utc
        private = key if key is not None else generate_key(key_type)
        cert = build_leaf(
            spec,
            private.public_key(),
            ca_cert=ca_cert,
            ca_key=ca_key,
            not_before=start,
            not_after=end,
        )
        with self._locked():
            return self._install(identity, cert, private, overwrite=overwrite, now=now)

    def _install(
        self,
        identity: Identity,
        cert: x509.Certificate,
        key: PrivateKey,
        *,
        overwrite: bool,
        now: dt.datetime,
        backup_dir: Path | None = None,
    ) -> IssuedCert:
        cert_path, key_path = self.cert_path(identity), self.key_path(identity)
        replaces: str | None = None
        if cert_path.exists():
            old = self._describe(cert_path)
            if old is not None and old.identity != identity:
                raise CertsError(
                    f"{cert_path} already holds {old.identity}, and {identity} maps to the same "
                    "file name",
                    fix="choose cluster and node names whose '<cluster>-<node>' differs",
                )
            if not overwrite:
                raise CertsError(
                    f"{cert_path} already exists ({identity}"
                    + (f", expires {old.not_after:%Y-%m-%d}" if old else "")
                    + ")",
                    fix="pass --force to replace it (the old files are kept in backup/), or "
                    "renew it with `replikant certs rotate`",
                )
            replaces = old.serial if old else None
            self._backup([cert_path, key_path], backup_dir or self._new_backup_dir(now))
        cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # Key first: a crash between the two renames leaves a new key with the old certificate,
        # which `certs check` reports as key_mismatch, never a certificate without its key.
        atomic_write(key_path, key_to_pem(key), mode=0o600)
        atomic_write(cert_path, _pem(cert), mode=0o644)
        self._record(cert, cert_path, replaces=replaces)
        _log.debug("certificate_issued", identity=identity.uri, file=str(cert_path))
        return IssuedCert(identity, cert_path, key_path, self.ca_cert_path, cert)

    def issue_broker(
        self,
        cluster: str,
        node: str,
        *,
        dns: Iterable[str] = (),
        ips: Iterable[str | IPAddress] = (),
        **options: Any,
    ) -> IssuedCert:
        """Issue broker ``node`` of ``cluster`` (DNS SANs ``node``, ``cluster``, ``node.cluster``
        plus ``dns``/``ips``); ``options`` as for :meth:`issue`."""
        return self.issue(Identity.broker(cluster, node), dns=dns, ips=ips, **options)

    def issue_agent(
        self,
        host: str,
        *,
        dns: Iterable[str] = (),
        ips: Iterable[str | IPAddress] = (),
        **options: Any,
    ) -> IssuedCert:
        """Issue the agent on ``host`` (DNS SAN ``host`` plus ``dns``/``ips``)."""
        return self.issue(Identity.agent(host), dns=dns, ips=ips, **options)

    def issue_admin(self, user: str, **options: Any) -> IssuedCert:
        """Issue admin ``user`` (client-only, no host SANs)."""
        return self.issue(Identity.admin(user), **options)

    # -- reading

    def _describe(self, path: Path) -> CertInfo | None:
        try:
            return CertInfo.from_certificate(load_certificate(path), path)
        except (CertsError, TLSIdentityError) as exc:
            _log.warning("certificate_unreadable", file=str(path), error=str(exc))
            return None

    def certificates(self) -> list[CertInfo]:
        """Every certificate file under ``brokers/``, ``agents/`` and ``admins/``, read from the
        files themselves (unreadable ones are logged as ``certificate_unreadable``)."""
        found: list[CertInfo] = []
        for role in ROLES:
            folder = self.root / ROLE_DIRS[role]
            for path in sorted(folder.glob("*.crt")) if folder.is_dir() else []:
                info = self._describe(path)
                if info is not None:
                    found.append(info)
        return found

    def due(
        self, within_days: int = DEFAULT_WARN_DAYS, *, now: dt.datetime | None = None
    ) -> list[CertInfo]:
        """Certificates that expire within ``within_days`` (or already have)."""
        limit = (now or utcnow()) + dt.timedelta(days=within_days)
        return [info for info in self.certificates() if info.not_after <= limit]

    # -- rotating

    def rotate(
        self,
        within_days: int = DEFAULT_WARN_DAYS,
        *,
        days: int | None = None,
        now: dt.datetime | None = None,
    ) -> list[Rotation]:
        """Re-issue every certificate expiring within ``within_days`` with a new key.

        The new certificate keeps the identity and SANs; its key type is the old one's (P-256 if
        the old key is weak or of a kind we do not generate); its lifetime is ``days`` or the old
        certificate's. The old certificate and key go to one ``backup/<timestamp>/`` folder.
        """
        now = now or utcnow()
        ca_cert, ca_key = self.load_ca()
        due = self.due(within_days, now=now)
        if not due:
            return []
        backup_dir = self._new_backup_dir(now)
        done: list[Rotation] = []
        with self._locked():
            for info in due:
                old = load_certificate(info.cert_path)
                old_key = old.public_key()
                key_type = key_type_of(old_key) if weak_key_reason(old_key) is None else None
                key = generate_key(key_type or DEFAULT_KEY_TYPE)
                lifetime = (
                    dt.timedelta(days=days)
                    if days is not None
                    else max(info.not_after - info.not_before, dt.timedelta(days=1))
                )
                end = min(now + lifetime, ca_cert.not_valid_after_utc)
                cert = build_leaf(
                    LeafSpec.from_certificate(old, info.identity),
                    key.public_key(),
                    ca_cert=ca_cert,
                    ca_key=ca_key,
                    not_before=now - CLOCK_SKEW,
                    not_after=end,
                )
                issued = self._install(
                    info.identity, cert, key, overwrite=True, now=now, backup_dir=backup_dir
                )
                done.append(
                    Rotation(
                        identity=info.identity,
                        cert_path=issued.cert_path,
                        old_serial=info.serial,
                        new_serial=issued.serial,
                        old_not_after=info.not_after,
                        new_not_after=issued.not_after,
                        backup_dir=backup_dir,
                        key=describe_key(key),
                    )
                )
                _log.info(
                    "certificate_rotated",
                    identity=info.identity.uri,
                    old_serial=info.serial,
                    new_serial=issued.serial,
                    not_after=iso_time(issued.not_after),
                )
        return done

    # -- checking

    def check(
        self,
        cert_path: Path,
        *,
        role: Role,
        name: str | None = None,
        key_path: Path | None = None,
        warn_days: int = DEFAULT_WARN_DAYS,
        now: dt.datetime | None = None,
    ) -> CheckReport:
        """Check ``cert_path`` for ``role`` against this CA (see :mod:`certs.check`).

        The key checked is ``key_path`` or else the ``.key`` next to the certificate; a missing
        implicit key is only a warning, since certificates are also checked where keys are not.
        """
        now = now or utcnow()
        report = CheckReport(file=str(cert_path), role=role, name=name)
        try:
            cert = load_certificate(cert_path)
        except CertsError as exc:
            report.problems.append(
                Problem("unreadable", "error", exc.message, exc.fix or "check the path")
            )
            return report
        ca_cert = self.ca_certificate()
        with contextlib.suppress(TLSIdentityError):
            report.identity = identity_from_cert(cert).uri
        report.not_after = cert.not_valid_after_utc
        report.days_left = days_left(report.not_after, now)
        key_problems, key = self._check_key(cert_path, key_path)
        report.problems += check_certificate(
            cert,
            ca_cert=ca_cert,
            role=role,
            name=name,
            key=key,
            now=now,
            warn_days=warn_days,
            label=str(cert_path),
            ca_label=str(self.ca_cert_path),
            key_label=str(key_path or cert_path.with_suffix(".key")),
            ca_dir=str(self.root),
        )
        report.problems += key_problems
        return report

    @staticmethod
    def _check_key(
        cert_path: Path, key_path: Path | None
    ) -> tuple[list[Problem], PrivateKey | None]:
        path = key_path or cert_path.with_suffix(".key")
        if not path.exists():
            return [
                Problem(
                    "key_missing",
                    "error" if key_path is not None else "warning",
                    f"private key {path} does not exist, so it was not compared with the "
                    "certificate",
                    "pass --key with the key file deployed with this certificate",
                )
            ], None
        problems: list[Problem] = []
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            problems.append(
                Problem(
                    "key_permissions",
                    "warning",
                    f"private key {path} is readable by group or others (mode {mode:04o})",
                    f"chmod 600 {path}",
                )
            )
        try:
            return problems, load_private_key(path)
        except CertsError as exc:
            problems.append(
                Problem(
                    "key_unreadable",
                    "error",
                    exc.message,
                    exc.fix or "deploy the .key written with the certificate",
                )
            )
            return problems, None
