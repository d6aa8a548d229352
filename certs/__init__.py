"""The certificate helper: a CA, broker/agent/admin certificates, checks and rotation.

The command line is `replikant certs` (:mod:`certs.cli`); the Python API for tests and the lab
launcher is :class:`certs.store.CertStore`. Identities and TLS contexts live in
:mod:`common.tls`, which processes use without importing this package.
"""

from certs.errors import CertsError
from certs.records import CertInfo, IssuedCert, Rotation
from certs.store import CertStore

__all__ = ["CertInfo", "CertStore", "CertsError", "IssuedCert", "Rotation"]
