"""TOML configuration for agents, brokers and the admin CLI, validated by pydantic.

A file that fails validation is refused as a whole with one line per problem, each naming the file,
the key path (``vms[0].disks[1].image``) and what was expected, so an operator fixes everything in
one edit instead of one error per restart.
"""

from __future__ import annotations

import tomllib
import uuid as uuid_mod
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Strict(BaseModel):
    # Unknown keys are refused: a typo such as `intervall_seconds` must not silently mean default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSFiles(_Strict):
    """Certificate material of one process, as written by `replikant certs`."""

    ca: Path
    cert: Path
    key: Path


class Policy(_Strict):
    """How a VM is replicated; applied to VMs by name or by label selector."""

    interval_seconds: float = Field(default=5.0, ge=1.0, le=900.0)
    compression: Literal["zstd", "none"] = "zstd"
    compression_level: int = Field(default=1, ge=-7, le=22)
    # An initial copy moves the whole disk at once and is CPU-bound on the agent: a faster zstd
    # level keeps it near disk speed at a few percent more bytes on the wire.
    initial_compression_level: int = Field(default=-3, ge=-7, le=22)
    bandwidth_limit_mbps: float = Field(default=0.0, ge=0.0, description="0 means unlimited")
    app_consistent_every: int = Field(default=0, ge=0, description="0 disables freeze/thaw")
    freeze_command: list[str] | None = None
    thaw_command: list[str] | None = None
    guest_agent_socket: Path | None = None
    hook_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    block_size: int = Field(default=65536, ge=4096, le=4 * 1024 * 1024)
    rpo_seconds: float = Field(default=60.0, gt=0)
    initial_copy: Literal["network", "media"] = Field(
        default="network",
        description="media: an empty replica waits for `replikant seed export`/`import` "
        "instead of receiving the whole disk over the network",
    )
    selector: dict[str, str] = Field(
        default_factory=dict, description="labels a VM must carry for this policy to apply"
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two (4096 ... 4194304)")
        return value


class DiskConfig(_Strict):
    """One virtual disk of a VM: the image file behind it and its NBD export name."""

    id: Name
    image: Path
    export: Name | None = None
    exclude: bool = False


class VMConfig(_Strict):
    """A protected VM on an agent host."""

    name: Name
    uuid: uuid_mod.UUID
    policy: Name | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    disks: list[DiskConfig] = Field(min_length=1)


class AgentSection(_Strict):
    host: Name
    site: Name = "primary"
    state_dir: Path
    status_listen: str = "127.0.0.1:8741"
    sync_marks: bool = Field(
        default=False,
        description="fdatasync the dirty map on every newly dirtied 4 MiB region, so tracking "
        "survives host crashes without a hash compare (costs a sync on the write path)",
    )


class NBDSection(_Strict):
    socket_dir: Path
    tcp_listen: str | None = None
    max_connections: int = Field(default=100, ge=1, le=1000)


class BrokerTarget(_Strict):
    urls: list[str] = Field(min_length=1)
    cluster: Name


class AgentConfig(_Strict):
    """`agent.toml`: the disks one host protects and where it ships them."""

    agent: AgentSection
    tls: TLSFiles
    nbd: NBDSection
    broker: BrokerTarget
    policies: dict[Name, Policy] = Field(default_factory=lambda: {"default": Policy()})
    vms: list[VMConfig] = Field(default_factory=list)


class BrokerSection(_Strict):
    node: Name
    cluster: Name
    site: Name = "recovery"
    listen: str = "127.0.0.1:8443"
    store: Path
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)


class MQTTSection(_Strict):
    """The control plane. Without a URL the broker runs alone and publishes nothing."""

    url: str | None = None
    tls: bool = False


class Authorization(_Strict):
    """Which agents may replicate here: any agent of our CA, or only the listed hosts."""

    mode: Literal["any", "listed"] = "any"
    agents: list[Name] = Field(default_factory=list)


class Retention(_Strict):
    any_point_minutes: float = Field(default=60.0, ge=0)
    hourly_hours: float = Field(default=24.0, ge=0)
    app_consistent_days: float = Field(default=7.0, ge=0)


class BrokerVM(_Strict):
    """Per-VM overrides at the broker (authorisation by VM)."""

    uuid: uuid_mod.UUID
    allowed_agents: list[Name] = Field(default_factory=list)


class BrokerConfig(_Strict):
    """`broker.toml`: one node of a recovery-site cluster."""

    broker: BrokerSection
    tls: TLSFiles
    mqtt: MQTTSection = MQTTSection()
    authorization: Authorization = Authorization()
    retention: Retention = Retention()
    vms: list[BrokerVM] = Field(default_factory=list)
    nbd_socket_dir: Path | None = None
    nbd_socket_group: str | None = None
    """The group that may use the point-in-time NBD socket (besides the broker's user)."""


class AdminSection(_Strict):
    brokers: list[str] = Field(min_length=1)
    agents: list[str] = Field(default_factory=list)


class AdminConfig(_Strict):
    """The admin CLI's config: where the brokers (and agents) are, and our admin certificate."""

    admin: AdminSection
    tls: TLSFiles


ModelT = TypeVar("ModelT", bound=BaseModel)


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_config(path: Path, model: type[ModelT]) -> ModelT:
    """Read and validate a TOML file; relative paths inside resolve against the file's folder."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist", fix="pass --config with the right path"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        config = model.model_validate(data, context={"base": path.parent})
    except ValidationError as exc:
        problems = [
            f"{path}: {_key_path(err['loc'])}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
            for err in exc.errors(include_url=False)
        ]
        raise ConfigError(f"{path} has {len(problems)} problem(s)", problems=problems) from None
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(model: ModelT, base: Path) -> ModelT:
    updates: dict[str, object] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        new = _resolve_value(value, base)
        if new is not value:
            updates[name] = new
    return model.model_copy(update=updates) if updates else model


def _resolve_value(value: object, base: Path) -> object:
    if isinstance(value, Path):
        return value if value.is_absolute() else base / value
    if isinstance(value, BaseModel):
        return _resolve_paths(value, base)
    if isinstance(value, list):
        items = [_resolve_value(v, base) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if isinstance(value, dict):
        mapped = {k: _resolve_value(v, base) for k, v in value.items()}
        return mapped if any(mapped[k] is not value[k] for k in value) else value
    return value
