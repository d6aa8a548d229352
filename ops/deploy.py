"""`replikant deploy mosquitto-config`: Mosquitto's configuration and ACL for a PKI.

The ACL names every certificate `replikant certs` issued (brokers, agents, admins) and lets each
write only its own topics (:data:`common.topics.PUBLISHERS`); the lab's Mosquitto mode renders its
ACL with the same function. Re-run it after issuing a certificate, then reload Mosquitto
(``systemctl reload mosquitto``: SIGHUP re-reads the ACL).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from certs.store import CertStore
from common.config import TLSFiles
from common.errors import ConfigError
from common.fsio import atomic_write
from common.mqttbroker import mosquitto_acl, mosquitto_config
from common.tls.identities import Identity

INSTALLED_PKI = Path("/etc/replikant/pki")
ACL_PATH = Path("/etc/mosquitto/replikant.acl")
PERSISTENCE = Path("/var/lib/mosquitto")
HEADER = """\
# Mosquitto for a Replikant recovery site, rendered by `replikant deploy mosquitto-config`:
# TLS 1.3 only, client certificates from our CA, the certificate's subject as the MQTT user
# so the ACL can scope each identity. A client without a certificate of our CA can neither
# connect, read nor publish. Server certificate: {server}.
"""
ACL_HEADER = """\
# Who may read and write what on the Replikant control plane, rendered by `replikant deploy
# mosquitto-config` from the certificates in the PKI (docs/protocol/mqtt.md, "Who may publish").
# Everyone authenticated reads; each identity writes only its own topics. Re-render after
# issuing a certificate, then reload Mosquitto.
"""


def pki_acl(pki: Path, *, server: Identity | None = None) -> str:
    """Mosquitto's ACL for every certificate in the PKI at ``pki`` but the MQTT server's own."""
    identities = [c.identity for c in CertStore(pki).certificates() if c.identity != server]
    return mosquitto_acl(identities)


def _server_identity(store: CertStore, server: str | None) -> Identity:
    brokers = [c.identity for c in store.certificates() if c.identity.role == "broker"]
    if server is not None:
        cluster, _, node = server.partition("/")
        wanted = Identity.broker(cluster, node) if node else None
    else:
        wanted = next((b for b in brokers if b.name == "mqtt"), None)
    if wanted is None or wanted not in brokers:
        raise ConfigError(
            f"the PKI at {store.root} holds no broker certificate "
            f"{server or 'named mqtt'} for Mosquitto to serve with",
            fix="issue one with `replikant certs issue broker --cluster C --node mqtt --dns HOST`"
            " or name it with --server CLUSTER/NODE",
        )
    return wanted


def render(
    pki: Path,
    out: Path,
    *,
    server: str | None = None,
    listen: int = 8883,
    installed_pki: Path = INSTALLED_PKI,
) -> list[Path]:
    """Write ``out/mosquitto.conf`` and ``out/mosquitto.acl`` for the PKI at ``pki``, naming
    the files where they will be installed; return the paths written."""
    store = CertStore(pki)
    if not store.ca_cert_path.exists():
        raise ConfigError(
            f"{pki} holds no CA (no ca.crt)", fix="pass --pki the directory `certs init` made"
        )
    identity = _server_identity(store, server)
    installed = TLSFiles(
        ca=installed_pki / store.ca_cert_path.relative_to(store.root),
        cert=installed_pki / store.cert_path(identity).relative_to(store.root),
        key=installed_pki / store.key_path(identity).relative_to(store.root),
    )
    conf = HEADER.format(server=identity.uri) + mosquitto_config(
        "", listen, installed, acl_file=ACL_PATH, persistence=PERSISTENCE
    )
    acl = ACL_HEADER + pki_acl(pki, server=identity)
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    written = []
    # Neither file holds a secret, but both map the site: group mosquitto reads, others nothing.
    for name, text in (("mosquitto.conf", conf), ("mosquitto.acl", acl)):
        atomic_write(out / name, text.encode(), mode=0o640)
        written.append(out / name)
    return written


@click.group()
def deploy() -> None:
    """Render deployment files for a site."""


@deploy.command("mosquitto-config")
@click.option(
    "--pki",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The CA directory (`replikant certs init --dir`).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where to write mosquitto.conf and mosquitto.acl.",
)
@click.option(
    "--server",
    metavar="CLUSTER/NODE",
    default=None,
    help="The broker certificate Mosquitto serves with (default: the one named mqtt).",
)
@click.option("--listen", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option(
    "--installed-pki",
    type=click.Path(path_type=Path),
    default=INSTALLED_PKI,
    show_default=True,
    help="Where the PKI's files live on the Mosquitto host.",
)
def mosquitto_config_command(
    pki: Path, out: Path, server: str | None, listen: int, installed_pki: Path
) -> None:
    """Mosquitto's configuration and per-identity ACL for the certificates in PKI."""
    for path in render(pki, out, server=server, listen=listen, installed_pki=installed_pki):
        click.echo(f"wrote {path} ({oct(os.stat(path).st_mode & 0o777)})")
    click.echo(
        f"install: install -m 0640 -g mosquitto {out}/mosquitto.acl {ACL_PATH}; "
        f"install -m 0640 -g mosquitto {out}/mosquitto.conf "
        "/etc/mosquitto/conf.d/replikant.conf; systemctl reload mosquitto"
    )
