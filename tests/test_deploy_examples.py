"""The example configs under deploy/ are valid: an operator who copies one starts from a file
that loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from certs.store import CertStore
from common.config import AgentConfig, BrokerConfig, load_config
from tests.support_agent import replikant_exe, run_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize(
    ("name", "model"), [("agent.example.toml", AgentConfig), ("broker.example.toml", BrokerConfig)]
)
def test_example_config_loads(name: str, model: type[BaseModel]) -> None:
    """Each example validates against its schema."""
    config = load_config(DEPLOY / name, model)
    assert isinstance(config, model)


def test_systemd_units_run_the_console_script() -> None:
    """Each unit starts `replikant <role> run` with the config the examples are written for."""
    for role in ("agent", "broker"):
        unit = (DEPLOY / f"replikant-{role}.service").read_text()
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        assert f" {role} run --config /etc/replikant/{role}.toml" in exec_start


def test_deploy_mosquitto_config_renders_a_pki_or_names_the_fix(tmp_path: Path) -> None:
    """`replikant deploy mosquitto-config` writes the config and an ACL naming every client
    certificate of the PKI (not Mosquitto's own), 0640; without a server certificate it says
    which one to issue."""
    store = CertStore.init(tmp_path / "pki")
    store.issue_agent("hv7")
    args = ["deploy", "mosquitto-config", "--pki", str(tmp_path / "pki"), "--out"]
    missing = run_tool(replikant_exe(), *args, str(tmp_path / "out"))
    assert missing.returncode == 1
    assert "certs issue broker --cluster C --node mqtt" in missing.stderr
    assert not (tmp_path / "out").exists()
    store.issue_broker("dr", "mqtt", dns=["mqtt.example"])
    done = run_tool(replikant_exe(), *args, str(tmp_path / "out"), "--listen", "8884")
    assert done.returncode == 0, done.stderr
    acl = (tmp_path / "out" / "mosquitto.acl").read_text()
    assert "user CN=hv7,OU=agent,O=Replikant\ntopic write replikant/v1/hosts/hv7\n" in acl
    assert "mqtt.dr" not in acl
    conf = (tmp_path / "out" / "mosquitto.conf").read_text()
    assert "listener 8884\n" in conf
    assert "certfile /etc/replikant/pki/brokers/dr-mqtt.crt\n" in conf
    for name in ("mosquitto.conf", "mosquitto.acl"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640
