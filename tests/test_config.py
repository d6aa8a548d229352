"""Configuration files are validated as a whole and refused with every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import AdminConfig, AgentConfig, BrokerConfig, load_config
from common.errors import ConfigError

AGENT_TOML = """
[agent]
host = "h1"
state_dir = "state"

[tls]
ca = "pki/ca.crt"
cert = "pki/agents/h1.crt"
key = "pki/agents/h1.key"

[nbd]
socket_dir = "/run/replikant"

[broker]
urls = ["https://127.0.0.1:8443"]
cluster = "dr"

[policies.fast]
interval_seconds = 1

[[vms]]
name = "web1"
uuid = "6f1c2c9e-0d7b-4b7a-9a55-0d7f3f1e2a10"
policy = "fast"
[[vms.disks]]
id = "disk0"
image = "images/web1.img"
"""


def test_valid_agent_config_resolves_relative_paths(tmp_path: Path) -> None:
    """Relative paths resolve against the config file's folder, absolute ones stay."""
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML)
    config = load_config(path, AgentConfig)
    assert config.agent.state_dir == tmp_path / "state"
    assert config.vms[0].disks[0].image == tmp_path / "images/web1.img"
    assert config.nbd.socket_dir == Path("/run/replikant")
    assert config.policies["fast"].interval_seconds == 1


def test_every_problem_is_named_with_its_key_path(tmp_path: Path) -> None:
    """A bad file lists each problem with the file, the key path and what was expected."""
    bad = (
        AGENT_TOML.replace("interval_seconds = 1", "interval_seconds = 0.1\nintervall = 3")
        .replace('uuid = "6f1c2c9e-0d7b-4b7a-9a55-0d7f3f1e2a10"', 'uuid = "nope"')
        .replace('host = "h1"', "")
    )
    path = tmp_path / "agent.toml"
    path.write_text(bad)
    with pytest.raises(ConfigError) as caught:
        load_config(path, AgentConfig)
    text = str(caught.value)
    assert f"{path}: agent.host: Field required" in text
    assert "policies.fast.interval_seconds: Input should be greater than or equal to 0.25" in text
    assert "policies.fast.intervall: Extra inputs are not permitted" in text
    assert "vms[0].uuid:" in text
    assert len(caught.value.problems) == 4


def test_shipping_nice_defaults_to_ten_and_refuses_a_raise(tmp_path: Path) -> None:
    """Shipping runs 10 nice levels below the guest unless told; it may not run above it."""
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML)
    assert load_config(path, AgentConfig).agent.shipping_nice == 10
    path.write_text(AGENT_TOML.replace('host = "h1"', 'host = "h1"\nshipping_nice = -5'))
    with pytest.raises(ConfigError, match=r"agent\.shipping_nice: Input should be greater"):
        load_config(path, AgentConfig)


def test_block_size_must_be_a_power_of_two(tmp_path: Path) -> None:
    """A non-power-of-two block size is refused with the allowed range."""
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML.replace("interval_seconds = 1", "block_size = 65000"))
    with pytest.raises(ConfigError, match="must be a power of two"):
        load_config(path, AgentConfig)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        ("[broker\nnode=1", "is not valid TOML"),
    ],
)
def test_unreadable_files_are_refused_clearly(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    """A missing file or broken TOML names the file and the problem."""
    path = tmp_path / "broker.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path, BrokerConfig)
    assert str(path) in str(caught.value)


def test_the_removed_status_listen_names_the_control_socket(tmp_path: Path) -> None:
    """A config with the old loopback TCP status_listen is refused with the key that replaces it."""
    path = tmp_path / "agent.toml"
    path.write_text(
        AGENT_TOML.replace('host = "h1"', 'host = "h1"\nstatus_listen = "127.0.0.1:8741"')
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, AgentConfig)
    (problem,) = caught.value.problems
    assert "agent: Value error, status_listen was removed" in problem
    assert "control_socket = PATH" in problem


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("http://127.0.0.1:8741", "is a URL; agents are reached through their control sockets"),
        ("run/agent.sock", "is not an absolute path"),
        ("/run/../tmp/agent.sock", "has a '..' component"),
    ],
)
def test_admin_agents_must_be_control_socket_paths(tmp_path: Path, entry: str, says: str) -> None:
    """[admin] agents lists absolute socket paths; a URL or a bad path is refused by name."""
    path = tmp_path / "admin.toml"
    path.write_text(
        f'[admin]\nbrokers = ["https://127.0.0.1:8443"]\nagents = ["{entry}"]\n'
        '[tls]\nca = "ca.crt"\ncert = "a.crt"\nkey = "a.key"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, AdminConfig)
    (problem,) = caught.value.problems
    assert "admin.agents:" in problem
    assert says in problem
