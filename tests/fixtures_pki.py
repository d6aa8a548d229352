"""A ready-made PKI for any test that needs real certificates (mutual TLS, NBD over TLS, ...).

Use the fixtures from a test module with ``from tests.fixtures_pki import pki, pki_session``
(pytest picks up imported fixtures), or call :func:`make_pki` directly. P-256 keys make a whole
PKI in a few milliseconds, so a fresh one per test is fine.

The broker and the agent carry ``localhost`` and ``127.0.0.1`` in their SANs, so clients can
connect to either (hostname verification stays on).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest

from certs.records import IssuedCert
from certs.store import CertStore

CLUSTER = "c1"
BROKER_NODE = "b1"
AGENT_HOST = "h1"
ADMIN_USER = "alice"
LOCAL_DNS = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Pki:
    """A CA directory with one broker, one agent and one admin certificate."""

    store: CertStore
    broker: IssuedCert
    agent: IssuedCert
    admin: IssuedCert

    @property
    def root(self) -> Path:
        """The CA directory."""
        return self.store.root

    @property
    def ca(self) -> Path:
        """``ca.crt``."""
        return self.store.ca_cert_path


def make_pki(root: Path) -> Pki:
    """Create a CA in ``root`` and issue broker ``c1/b1``, agent ``h1`` and admin ``alice``."""
    store = CertStore.init(root)
    return Pki(
        store=store,
        broker=store.issue_broker(CLUSTER, BROKER_NODE, dns=LOCAL_DNS, ips=LOCAL_IPS),
        agent=store.issue_agent(AGENT_HOST, dns=LOCAL_DNS, ips=LOCAL_IPS),
        admin=store.issue_admin(ADMIN_USER),
    )


def issue_expired(store: CertStore, host: str = "expired-h") -> IssuedCert:
    """An agent certificate that expired yesterday (valid for the ten days before)."""
    now = dt.datetime.now(dt.UTC)
    return store.issue_agent(
        host,
        dns=LOCAL_DNS,
        ips=LOCAL_IPS,
        not_before=now - dt.timedelta(days=11),
        not_after=now - dt.timedelta(days=1),
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh PKI in this test's temporary directory."""
    return make_pki(tmp_path / "pki")


@pytest.fixture(scope="session")
def pki_session(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI shared by the whole session: do not modify it."""
    return make_pki(tmp_path_factory.mktemp("pki"))
