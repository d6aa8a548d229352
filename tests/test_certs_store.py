"""The certificate helper's CA directory: init, issue, list, rotate, file modes and identities."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.errors import CertsError
from common.cli import cli
from common.tls import Identity, TLSIdentityError, identity_from_cert
from tests.fixtures_pki import Pki, make_pki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl binary")


def run(*args: str) -> Result:
    """Run `replikant certs ARGS` in-process, logging only warnings and above."""
    return CliRunner().invoke(cli, ["--log-level", "warning", "certs", *args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def spki(cert_or_key: x509.Certificate) -> bytes:
    return cert_or_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA with broker c1/b1, agent h1 and admin alice."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
def pki_dir(pki: Pki) -> Path:
    """The fresh CA's directory."""
    return pki.root


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Run with umask 000, so only an explicit creation mode keeps keys private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- init


def test_init_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    """A second init fails with a message naming the directory and --force; the CA is intact."""
    ca_dir = tmp_path / "pki"
    assert run("init", "--dir", str(ca_dir)).exit_code == 0
    before = (ca_dir / "ca.crt").read_bytes()

    result = run("init", "--dir", str(ca_dir))

    assert result.exit_code == 1
    assert "already holds a CA" in result.output
    assert str(ca_dir) in result.output
    assert "--force" in result.output
    assert (ca_dir / "ca.crt").read_bytes() == before


def test_init_force_replaces_the_ca_and_keeps_the_old_one(tmp_path: Path) -> None:
    """--force writes a new CA and keeps the previous certificate and key under backup/."""
    ca_dir = tmp_path / "pki"
    run("init", "--dir", str(ca_dir))
    before = (ca_dir / "ca.crt").read_bytes()

    result = run("init", "--dir", str(ca_dir), "--force", "--name", "Second CA")

    assert result.exit_code == 0, result.output
    assert (ca_dir / "ca.crt").read_bytes() != before
    backups = list((ca_dir / "backup").glob("*/ca.crt"))
    assert [b.read_bytes() for b in backups] == [before]
    assert mode(backups[0].with_suffix(".key")) == 0o600
    subject = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes()).subject
    assert "Second CA" in subject.rfc4514_string()


@pytest.mark.usefixtures("loose_umask")
def test_keys_are_created_mode_0600_even_with_umask_000(tmp_path: Path) -> None:
    """Every private key (CA, broker, agent, admin) is 0600; certificates are world-readable."""
    p = make_pki(tmp_path / "pki")
    keys = [p.store.ca_key_path, p.broker.key_path, p.agent.key_path, p.admin.key_path]
    assert [mode(k) for k in keys] == [0o600] * 4
    assert mode(p.broker.cert_path) == 0o644
    assert mode(p.root) == 0o700


@pytest.mark.parametrize("key_type", ["p384", "rsa3072"])
def test_init_supports_other_key_types(tmp_path: Path, key_type: str) -> None:
    """--key-type p384 and rsa3072 produce a CA of that kind."""
    result = run("init", "--dir", str(tmp_path), "--key-type", key_type, "--days", "30")
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    assert key.key_size == {"p384": 384, "rsa3072": 3072}[key_type]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30


# -- issue


def test_broker_certificate_has_node_cluster_and_access_point_names(pki: Pki) -> None:
    """A broker is reachable as node, cluster (the access point) and node.cluster, plus extras."""
    issued = pki.store.issue_broker("prod", "b7", dns=["b7.example.net"], ips=["10.0.0.7"])
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.DNSName) == ["b7", "prod", "b7.prod", "b7.example.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["replikant://broker/prod/b7"]
    assert issued.cert_path == pki.root / "brokers" / "prod-b7.crt"
    assert issued.key_path == pki.root / "brokers" / "prod-b7.key"


def test_each_role_gets_its_identity_uri_and_key_usages(pki: Pki) -> None:
    """Brokers and agents are server+client, admins client only; each carries its identity."""
    server_client = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    expected = {
        "broker": (Identity.broker("c1", "b1"), server_client),
        "agent": (Identity.agent("h1"), server_client),
        "admin": (Identity.admin("alice"), {ExtendedKeyUsageOID.CLIENT_AUTH}),
    }
    for role, issued in (("broker", pki.broker), ("agent", pki.agent), ("admin", pki.admin)):
        identity, usages = expected[role]
        cert = issued.certificate
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert identity_from_cert(cert) == identity
        assert set(eku) == usages
        assert issued.cert_path.parent.name == f"{role}s"


def test_issue_refuses_to_replace_a_certificate_without_force(tmp_path: Path) -> None:
    """Issuing an existing identity again needs --force; with it the old files go to backup/."""
    ca_dir = str(tmp_path)
    run("init", "--dir", ca_dir)
    assert run("issue", "agent", "--dir", ca_dir, "--host", "h1").exit_code == 0
    again = run("issue", "agent", "--dir", ca_dir, "--host", "h1")
    assert again.exit_code == 1
    assert "agents/h1.crt already exists" in again.output
    assert "--force" in again.output

    forced = run("issue", "agent", "--dir", ca_dir, "--host", "h1", "--force", "--ip", "10.1.1.1")
    assert forced.exit_code == 0, forced.output
    assert "IP:10.1.1.1" in forced.output
    assert len(list(tmp_path.glob("backup/*/agents/h1.key"))) == 1


def test_admin_certificates_take_no_host_names(pki: Pki) -> None:
    """An admin is a person: asking for DNS SANs is refused with the fix."""
    with pytest.raises(CertsError, match="take no --dns or --ip"):
        pki.store.issue(Identity.admin("bob"), dns=["bob.example"])


def test_invalid_names_are_refused(pki: Pki) -> None:
    """Names that would break file names or URIs are refused before anything is written."""
    with pytest.raises(TLSIdentityError, match="not a valid name"):
        pki.store.issue_agent("../etc")
    with pytest.raises(CertsError, match="not a valid DNS name"):
        pki.store.issue_agent("h2", dns=["bad name"])
    with pytest.raises(CertsError, match="not an IP address"):
        pki.store.issue_agent("h2", ips=["300.1.1.1"])
    assert not (pki.root / "agents" / "h2.crt").exists()


def test_issue_without_a_ca_names_the_fix(tmp_path: Path) -> None:
    """Issuing into a directory with no CA says to run init."""
    result = run("issue", "admin", "--dir", str(tmp_path), "--name", "bob")
    assert result.exit_code == 1
    assert "holds no CA" in result.output
    assert "replikant certs init" in result.output


@needs_openssl
def test_issued_certificates_pass_openssl_verify(pki_dir: Path) -> None:
    """`openssl verify -CAfile ca.crt -x509_strict` accepts broker, agent and admin certificates."""
    files = [
        pki_dir / "brokers" / "c1-b1.crt",
        pki_dir / "agents" / "h1.crt",
        pki_dir / "admins" / "alice.crt",
    ]
    out = subprocess.run(
        [OPENSSL or "openssl", "verify", "-x509_strict", "-CAfile", pki_dir / "ca.crt", *files],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{f}: OK" for f in files]


@needs_openssl
@pytest.mark.parametrize(
    ("cert", "purpose", "ok"),
    [
        ("brokers/c1-b1.crt", "sslserver", True),
        ("brokers/c1-b1.crt", "sslclient", True),
        ("agents/h1.crt", "sslserver", True),
        ("admins/alice.crt", "sslclient", True),
        ("admins/alice.crt", "sslserver", False),
    ],
)
def test_openssl_agrees_on_each_roles_purposes(
    pki_dir: Path, cert: str, purpose: str, ok: bool
) -> None:
    """OpenSSL's purpose check matches the roles: admin certificates cannot serve."""
    ca, target = str(pki_dir / "ca.crt"), str(pki_dir / cert)
    out = subprocess.run(
        [OPENSSL or "openssl", "verify", "-purpose", purpose, "-CAfile", ca, target],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (out.returncode == 0) is ok, out.stdout + out.stderr


# -- list


def test_list_json_describes_every_certificate(pki: Pki) -> None:
    """list --json gives role, name, identity, SANs, not_after, days left and serial per file."""
    result = run("list", "--dir", str(pki.root), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    by_identity = {c["identity"]: c for c in data["certificates"]}
    assert set(by_identity) == {
        "replikant://broker/c1/b1",
        "replikant://agent/h1",
        "replikant://admin/alice",
    }
    broker = by_identity["replikant://broker/c1/b1"]
    assert (broker["role"], broker["name"], broker["cluster"]) == ("broker", "b1", "c1")
    assert broker["serial"] == pki.broker.serial
    assert broker["not_after"] == pki.broker.not_after.isoformat().replace("+00:00", "Z")
    assert 363 <= broker["days_left"] <= 365
    assert "DNS:b1.c1" in broker["sans"]
    assert "IP:127.0.0.1" in broker["sans"]
    assert by_identity["replikant://admin/alice"]["sans"] == ["URI:replikant://admin/alice"]
    assert data["ca"]["days_left"] >= 3640


def test_list_reads_the_files_not_the_index(pki: Pki) -> None:
    """With index.json gone, list still finds every certificate; the index records issuance."""
    index = json.loads(pki.store.index_path.read_text())
    assert {e["serial"] for e in index["certificates"]} == {
        pki.broker.serial,
        pki.agent.serial,
        pki.admin.serial,
    }
    pki.store.index_path.unlink()

    result = run("list", "--dir", str(pki.root))

    assert result.exit_code == 0, result.output
    for uri in ("replikant://broker/c1/b1", "replikant://agent/h1", "replikant://admin/alice"):
        assert uri in result.output


# -- rotate


def test_rotate_renews_an_expiring_certificate_with_a_new_key(pki: Pki) -> None:
    """A certificate 5 days from expiry is re-issued: same identity and SANs, new key, old kept."""
    now = dt.datetime.now(dt.UTC)
    old = pki.store.issue_agent(
        "h9",
        dns=["h9.example"],
        ips=["192.0.2.9"],
        not_before=now - dt.timedelta(days=85),
        not_after=now + dt.timedelta(days=5),
    )
    old_cert_bytes = old.cert_path.read_bytes()
    untouched = pki.broker.cert_path.read_bytes()

    result = run("rotate", "--dir", str(pki.root), "--within", "30")

    assert result.exit_code == 0, result.output
    assert "rotated replikant://agent/h9" in result.output
    assert "replikant://broker" not in result.output
    new = x509.load_pem_x509_certificate(old.cert_path.read_bytes())
    new_key = serialization.load_pem_private_key(old.key_path.read_bytes(), password=None)
    assert identity_from_cert(new) == Identity.agent("h9")
    old_san = old.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    new_san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert new_san.value == old_san.value
    assert spki(new) != spki(old.certificate)
    assert new_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == spki(new)
    assert new.serial_number != old.certificate.serial_number
    assert new.not_valid_after_utc > now + dt.timedelta(days=85)
    assert mode(old.key_path) == 0o600
    (backup,) = pki.root.glob("backup/*/agents/h9.crt")
    assert backup.read_bytes() == old_cert_bytes
    assert mode(backup.with_suffix(".key")) == 0o600
    assert pki.broker.cert_path.read_bytes() == untouched


def test_rotate_with_nothing_due_changes_nothing(pki: Pki) -> None:
    """With every certificate far from expiry, rotate says so and writes nothing."""
    before = {p: p.read_bytes() for p in pki.root.rglob("*.crt")}
    result = run("rotate", "--dir", str(pki.root))
    assert result.exit_code == 0
    assert "nothing to rotate" in result.output
    assert {p: p.read_bytes() for p in pki.root.rglob("*.crt")} == before
    assert not (pki.root / "backup").exists()


# -- identities


@pytest.mark.parametrize(
    ("uri", "identity"),
    [
        ("replikant://agent/h1", Identity("agent", "h1")),
        ("replikant://broker/c1/b1", Identity("broker", "b1", "c1")),
        ("replikant://admin/alice", Identity("admin", "alice")),
    ],
)
def test_identity_uris_round_trip(uri: str, identity: Identity) -> None:
    """Identity URIs parse to the identity and format back unchanged."""
    assert Identity.from_uri(uri) == identity
    assert identity.uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "https://agent/h1",
        "replikant://agent",
        "replikant://broker/b1",
        "replikant://agent/c1/h1",
        "replikant://root/x",
        "replikant://agent/h 1",
    ],
)
def test_malformed_identity_uris_are_refused(uri: str) -> None:
    """Anything but the three identity forms raises TLSIdentityError."""
    with pytest.raises(TLSIdentityError):
        Identity.from_uri(uri)
