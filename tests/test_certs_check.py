"""`replikant certs check` names each fault of a purpose-built bad certificate, with its fix."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.issue import LeafSpec, subject_for
from certs.keys import key_to_pem
from certs.store import CertStore
from common.cli import cli
from common.fsio import atomic_write
from common.tls import Identity
from tests.fixtures_pki import Pki, issue_expired, make_pki

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA with broker c1/b1, agent h1 and admin alice."""
    return make_pki(tmp_path / "pki")


def check(pki: Pki, cert: Path, role: str, *extra: str) -> Result:
    """Run `replikant certs check CERT --dir <pki> --role ROLE EXTRA...` in-process."""
    args = ["--log-level", "warning", "certs", "check", str(cert), "--dir", str(pki.root)]
    return CliRunner().invoke(cli, [*args, "--role", role, *extra])


def codes(result: Result) -> list[str]:
    """The problem codes in check's output, in order (`error: code: ...`)."""
    return re.findall(r"^(?:error|warning): (\w+):", result.stdout, flags=re.MULTILINE)


def forge_with_usages(
    store: CertStore, identity: Identity, usages: list[x509.ObjectIdentifier]
) -> Path:
    """A certificate from our CA for ``identity`` but with the given extended key usages."""
    ca_cert, ca_key = store.load_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject_for(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(LeafSpec.for_identity(identity).subject_alt_names()),
            critical=False,
        )
        .sign(ca_key, ca_cert.signature_hash_algorithm)  # type: ignore[arg-type]
    )
    path = store.root / "forged" / f"{identity.label}.crt"
    path.parent.mkdir()
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    atomic_write(path.with_suffix(".key"), key_to_pem(key), mode=0o600)
    return path


def test_a_good_certificate_is_fit_and_exits_0(pki: Pki) -> None:
    """A fresh agent certificate checked as an agent reachable at h1 has no problem at all."""
    result = check(pki, pki.agent.cert_path, "agent", "--name", "h1")
    assert result.exit_code == 0, result.output
    assert codes(result) == []
    assert result.stdout.startswith(f"ok: {pki.agent.cert_path} is fit for role agent")
    assert "replikant://agent/h1" in result.stdout


@pytest.mark.parametrize(
    ("role", "name"),
    [("broker", "c1"), ("broker", "b1.c1"), ("broker", "127.0.0.1"), ("admin", "alice")],
)
def test_names_peers_use_are_accepted(pki: Pki, role: str, name: str) -> None:
    """Brokers answer to the cluster access point and their addresses; admins to their user."""
    cert = pki.broker.cert_path if role == "broker" else pki.admin.cert_path
    result = check(pki, cert, role, "--name", name)
    assert result.exit_code == 0, result.output


def test_expired(pki: Pki) -> None:
    """An expired certificate is an error that names the date and says to rotate."""
    issued = issue_expired(pki.store)
    result = check(pki, issued.cert_path, "agent")
    assert result.exit_code == 1
    assert codes(result) == ["expired"]
    assert f"{issued.cert_path} expired on " in result.stdout
    assert "(1 day ago)" in result.stdout
    assert f"replikant certs rotate --dir {pki.root}" in result.stdout


def test_not_yet_valid(pki: Pki) -> None:
    """A certificate that starts tomorrow is an error that points at the clocks."""
    issued = pki.store.issue_agent("h2", not_before=NOW + dt.timedelta(days=1))
    result = check(pki, issued.cert_path, "agent")
    assert result.exit_code == 1
    assert codes(result) == ["not_yet_valid"]
    assert "is not valid until" in result.stdout
    assert "NTP" in result.stdout


def test_expiring_soon_is_a_warning_and_exits_0(pki: Pki) -> None:
    """Ten days from expiry warns (and says to rotate) but the certificate is still fit."""
    issued = pki.store.issue_agent("h2", not_after=NOW + dt.timedelta(days=10, hours=1))
    result = check(pki, issued.cert_path, "agent")
    assert result.exit_code == 0, result.output
    assert codes(result) == ["expiring_soon"]
    assert "warning: expiring_soon:" in result.stdout
    assert "(in 10 days, within the 30-day warning window)" in result.stdout
    assert "replikant certs rotate" in result.stdout
    assert "ok: " in result.stdout


def test_not_signed_by_this_ca(pki: Pki, tmp_path: Path) -> None:
    """A certificate from another CA is an error naming both CAs' files."""
    other = CertStore.init(tmp_path / "other").issue_agent("h1")
    result = check(pki, other.cert_path, "agent")
    assert result.exit_code == 1
    assert codes(result) == ["wrong_ca"]
    assert f"was not signed by the CA {pki.ca}" in result.stdout
    assert "re-issue it from this CA" in result.stdout


def test_key_does_not_match_certificate(pki: Pki) -> None:
    """A .key next to the .crt that belongs to another certificate is an error."""
    atomic_write(pki.agent.key_path, pki.broker.key_path.read_bytes(), mode=0o600)
    result = check(pki, pki.agent.cert_path, "agent")
    assert result.exit_code == 1
    assert codes(result) == ["key_mismatch"]
    assert f"private key {pki.agent.key_path} does not belong to" in result.stdout


def test_missing_san_for_the_name(pki: Pki) -> None:
    """A host name peers will dial but the certificate lacks is an error with the --dns fix."""
    result = check(pki, pki.agent.cert_path, "agent", "--name", "h1.example.net")
    assert result.exit_code == 1
    assert codes(result) == ["missing_san"]
    assert "has no SAN for 'h1.example.net'" in result.stdout
    assert "(it has DNS:h1, DNS:localhost, IP:127.0.0.1, IP:::1)" in result.stdout
    assert "--dns h1.example.net" in result.stdout


def test_wrong_extended_key_usage(pki: Pki) -> None:
    """An agent certificate without serverAuth cannot serve NBD: an error naming the usage."""
    forged = forge_with_usages(pki.store, Identity.agent("h3"), [ExtendedKeyUsageOID.CLIENT_AUTH])
    result = check(pki, forged, "agent")
    assert result.exit_code == 1
    assert codes(result) == ["wrong_key_usage"]
    assert "has extended key usage clientAuth; the agent role needs clientAuth, serverAuth" in (
        result.stdout
    )
    assert "(missing serverAuth)" in result.stdout


def test_wrong_role(pki: Pki) -> None:
    """An agent certificate deployed as a broker is an error naming both roles."""
    result = check(pki, pki.agent.cert_path, "broker")
    assert result.exit_code == 1
    assert codes(result) == ["wrong_role"]
    assert "identifies replikant://agent/h1 (role agent), not a broker" in result.stdout


def test_weak_key(pki: Pki) -> None:
    """An RSA-1024 key is an error that names the size and the minimum."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    issued = pki.store.issue_agent("h4", key=weak)
    result = check(pki, issued.cert_path, "agent")
    assert result.exit_code == 1
    assert codes(result) == ["weak_key"]
    assert "RSA key of 1024 bits is below the 2048-bit minimum" in result.stdout


def test_weak_ec_curve(pki: Pki) -> None:
    """An EC key on a curve below 256 bits is refused just like a short RSA key."""
    issued = pki.store.issue_agent("h5", key=ec.generate_private_key(ec.SECP192R1()))
    result = check(pki, issued.cert_path, "agent")
    assert codes(result) == ["weak_key"]
    assert "secp192r1 (192 bits) is below the 256-bit minimum" in result.stdout


def test_missing_key_is_only_a_warning_unless_named(pki: Pki) -> None:
    """Without the .key beside it the check warns; naming a missing --key is an error."""
    pki.agent.key_path.unlink()
    implicit = check(pki, pki.agent.cert_path, "agent")
    explicit = check(pki, pki.agent.cert_path, "agent", "--key", str(pki.agent.key_path))
    assert (implicit.exit_code, codes(implicit)) == (0, ["key_missing"])
    assert (explicit.exit_code, codes(explicit)) == (1, ["key_missing"])


def test_json_output_lists_each_problem(pki: Pki) -> None:
    """--json carries ok, identity and every problem's code, severity, message and fix."""
    issued = issue_expired(pki.store)
    result = check(pki, issued.cert_path, "broker", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["identity"] == "replikant://agent/expired-h"
    assert [(p["code"], p["severity"]) for p in report["problems"]] == [
        ("expired", "error"),
        ("wrong_role", "error"),
    ]
    assert all(p["message"] and p["fix"] for p in report["problems"])


def test_check_through_the_real_replikant_script(pki: Pki) -> None:
    """The installed `replikant` script exits 1 with the fault line, and 0 for a good one."""
    script = Path(sys.executable).with_name("replikant")
    bad = issue_expired(pki.store)
    env = {**os.environ, "REPLIKANT_CERTS_DIR": str(pki.root)}
    runs = [
        subprocess.run(
            [script, "--log-level", "warning", "certs", "check", cert, "--role", "agent"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        for cert in (bad.cert_path, pki.agent.cert_path)
    ]
    assert runs[0].returncode == 1, runs[0].stderr
    assert runs[0].stdout.startswith(f"error: expired: {bad.cert_path} expired on ")
    assert runs[1].returncode == 0, runs[1].stderr
    assert runs[1].stdout.startswith("ok: ")
