"""The example configs under deploy/ are valid: an operator who copies one starts from a file
that loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from common.config import AgentConfig, BrokerConfig, load_config

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
