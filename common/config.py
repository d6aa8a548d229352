"""TOML configuration for agents, brokers and the admin CLI, validated by pydantic.

A file that fails validation is refused as a whole with one line per problem, each naming the file,
the key path (``vms[0].disks[1].image``) and what was expected, so an operator fixes everything in
one edit instead of one error per restart.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import tomllib
import uuid as uuid_mod
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.errors import ConfigError
from common.hypervisorconfig import HypervisorConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def current_user() -> str:
    """This process's effective user name, for messages about file permissions."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


_MODE_WORDS = {
    os.R_OK: "readable",
    os.W_OK: "writable",
    os.R_OK | os.W_OK: "readable and writable",
}

_FILES_DOC = '(docs/operations.md, "Files the daemons use")'


def access_problem(path: Path, what: str, *, mode: int, fix: str) -> str | None:
    """Why this process may not use ``path`` with ``os.access`` ``mode``, or ``None`` if it may.

    A daemon runs as its own user inside a systemd sandbox, so the line tells the two causes
    apart: a file system that is read-only here (``ProtectSystem=strict`` without the path in
    ``ReadWritePaths=``) or permissions that are not the daemon's user's (``fix``, with ``{user}``
    and ``{path}`` filled in).
    """
    if os.access(path, mode):
        return None
    if mode & os.W_OK and os.access(path, mode & ~os.W_OK):
        with contextlib.suppress(OSError):
            if os.statvfs(path).f_flag & os.ST_RDONLY:
                return (
                    f"{what} {path} is on a file system that is read-only for this process; fix: "
                    f"under systemd, list it in the unit's ReadWritePaths= (a drop-in) {_FILES_DOC}"
                )
    user = current_user()
    return (
        f"{what} {path} is not {_MODE_WORDS[mode & (os.R_OK | os.W_OK)]} by user {user}; fix: "
        + (fix.format(user=user, path=path) + f" {_FILES_DOC}")
    )


def writable_dir_problems(
    path: Path, what: str, *, create: bool = True, mode: int | None = None
) -> list[str]:
    """Why the daemon cannot keep its files in directory ``path``, one line each; empty when it
    can. A missing directory is created (with ``mode``, whatever the umask, when given), or with
    ``create=False`` (a check that must leave no trace) only its nearest existing parent is
    checked."""
    if create:
        try:
            path.mkdir(parents=True)
            if mode is not None:
                path.chmod(mode)
        except FileExistsError:
            pass
        except OSError as exc:
            return [f"{what} {path} cannot be created: {exc.strerror}"]
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        return [f"{what} {path} cannot be created: {existing} is not a directory"]
    label = what if existing == path else f"{what} {path}: its parent"
    problem = access_problem(
        existing, label, mode=os.W_OK | os.X_OK, fix="`chown -R {user} {path}`"
    )
    return [] if problem is None else [problem]


def parse_listen(value: str, *, default_host: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a tuple, ``default_host`` when the host is empty
    (``:8443``); raises ValueError naming the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]") or default_host, int(port)


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

    # Down to 0.25 s: a VM that needs sub-second RPO gets several points a second (issue 10).
    interval_seconds: float = Field(default=5.0, ge=0.25, le=900.0)
    compression: Literal["zstd", "none"] = "zstd"
    compression_level: int = Field(default=1, ge=-7, le=22)
    # The floor of an initial copy's adaptive level (decision 015): a fast level keeps a
    # CPU-bound copy near disk speed; while the host idles (a link is the limit) it rises to 3.
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
    initial_role: Literal["PRIMARY", "REPLICA"] = Field(
        default="PRIMARY",
        description="the VM's role at this site until a failover changes it: REPLICA on the "
        "recovery site's agent, whose images are replicas the broker owns until a promotion",
    )
    hypervisor: HypervisorConfig | None = None


class StandbyVM(_Strict):
    """A VM this host does not protect but may run from another site's replica (a test copy)."""

    name: Name
    uuid: uuid_mod.UUID
    hypervisor: HypervisorConfig


class AgentSection(_Strict):
    host: Name
    site: Name = "primary"
    state_dir: Path
    control_socket: Path | None = Field(
        default=None,
        description="the unix socket of the agent's control API (status, verify, repair, seed); "
        "default <nbd.socket_dir>/control/agent.sock",
    )
    control_group: str | None = Field(
        default=None,
        description="the group that may use the control socket (default: the agent's own group)",
    )
    sync_marks: bool = Field(
        default=False,
        description="fdatasync the dirty map on every newly dirtied 4 MiB region, so tracking "
        "survives host crashes without a hash compare (costs a sync on the write path)",
    )

    shipping_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="how many nice levels below the NBD server the shipping threads run "
        "while every VM's lag is under half its policy's rpo_seconds (decision 028): guest "
        "requests first when both want a core; equal shares while a VM's lag is not; 0 for "
        "equal shares always",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_tcp_listener(cls, data: object) -> object:
        # Loopback TCP is open to every local user and to any web page a browser here opens.
        if isinstance(data, dict) and "status_listen" in data:
            raise ValueError(
                "status_listen was removed: the agent's control API is served only on a unix "
                "socket now; delete status_listen and, if the default "
                "<nbd.socket_dir>/control/agent.sock does not suit, set control_socket = PATH "
                "(and control_group = GROUP for the operators who may use it)"
            )
        return data


class NBDSection(_Strict):
    socket_dir: Path
    tcp_listen: str | None = None
    tcp_clients: list[str] = Field(default_factory=list)
    """Certificate identities (``replikant://...`` URIs) that may open exports over
    ``tcp_listen``; empty: only this agent's own identity. Any certificate of our CA is not
    enough: a broker's or another host's certificate must never read this host's disks."""
    max_connections: int = Field(default=100, ge=1, le=1000)

    @field_validator("tcp_clients")
    @classmethod
    def _identity_uris(cls, value: list[str]) -> list[str]:
        for uri in value:
            if not uri.startswith("replikant://"):
                raise ValueError(
                    f"{uri!r} is not a certificate identity; list URIs such as "
                    "'replikant://agent/hv2' or 'replikant://admin/alice'"
                )
        return value


class MQTTSection(_Strict):
    """The control plane. Without a URL the daemon stays off MQTT (a broker runs alone, an agent
    ships to ``[broker] urls`` and answers no requests)."""

    url: str | None = None
    tls: bool = False

    @property
    def use_tls(self) -> bool:
        """Whether to connect with TLS and this daemon's [tls] certificate: ``tls = true`` or an
        ``mqtts://`` URL asks for it (the MQTT brokers we ship accept nothing else)."""
        return self.tls or (self.url or "").startswith("mqtts://")


class BrokerTarget(_Strict):
    urls: list[str] = Field(min_length=1)
    cluster: Name


class AgentConfig(_Strict):
    """`agent.toml`: the disks one host protects and where it ships them."""

    agent: AgentSection
    tls: TLSFiles
    nbd: NBDSection
    broker: BrokerTarget
    mqtt: MQTTSection = MQTTSection()
    policies: dict[Name, Policy] = Field(default_factory=lambda: {"default": Policy()})
    vms: list[VMConfig] = Field(default_factory=list)
    standby: list[StandbyVM] = Field(default_factory=list)


class BrokerSection(_Strict):
    node: Name
    cluster: Name
    site: Name = "recovery"
    listen: str = "127.0.0.1:8443"
    store: Path
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    url: str | None = Field(default=None, pattern=r"^https://[^/?#\s]+$")
    """The address other members send agents to (default: ``https://`` + ``listen``)."""
    placement: Literal["owner", "spread"] = "owner"
    """With MQTT: ``owner`` applies every VM on the cluster's owner; ``spread`` places VMs on
    the members (decision 032)."""
    host_agent_config: Path | None = Path("/etc/replikant/agent.toml")
    """The config of an agent on this host, if any: the store must not share storage with the
    disks it protects (broker/colocation.py)."""
    allow_shared_storage: bool = False
    """Start even when the store shares storage with this host's protected disks (a lab)."""


class Authorization(_Strict):
    """Which agents may replicate here: any agent of our CA, or only the listed hosts."""

    mode: Literal["any", "listed"] = "any"
    agents: list[Name] = Field(default_factory=list)


def journal_bound_bytes(bound: int | str, disk_size: int) -> int:
    """A journal bound (bytes, or ``"N%"`` of the disk) in bytes for a disk of ``disk_size``."""
    if isinstance(bound, int):
        return bound
    return int(disk_size * float(bound.removesuffix("%")) / 100)


def _check_bound(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"journal_bound {value} is negative: give bytes or a percentage")
        return value
    text = value.strip()
    try:
        pct = float(text.removesuffix("%"))
    except ValueError:
        pct = -1.0
    if not text.endswith("%") or not 0 <= pct <= 100_000:
        raise ValueError(
            f"journal_bound {value!r} is neither bytes nor a percentage of the disk: "
            'write e.g. journal_bound = "100%" or journal_bound = 1073741824'
        )
    return text


class Retention(_Strict):
    """Recovery points: tiers (each keeps points up to an age, one per its spacing) and the
    size bound on each disk's recovery-point data (docs/broker.md)."""

    any_point_minutes: float = Field(default=10.0, ge=0)
    minute_hours: float = Field(default=2.0, ge=0)
    hourly_hours: float = Field(default=48.0, ge=0)
    daily_days: float = Field(default=30.0, ge=0)
    app_consistent_days: float = Field(default=7.0, ge=0)
    journal_bound: int | str = "100%"

    _bound = field_validator("journal_bound")(_check_bound)


class ElectionSection(_Strict):
    """``[election]``: the owner election's timings in seconds (decision 031). The defaults put
    a new owner in place about ``lease`` + a tick after a silent death, and at once after a crash
    the MQTT broker notices (the last will)."""

    lease: float = Field(default=2.0, gt=0, le=60)
    """Members declare an owner dead when its record was not renewed for this long."""
    renew: float = Field(default=0.5, gt=0, le=30)
    """The owner renews its record this often (and re-reads the store's fence)."""
    stagger: float = Field(default=0.5, ge=0, le=30)
    """Each candidate after the first (sorted node names) waits this much more."""
    settle: float = Field(default=1.0, ge=0, le=60)
    """A member stands only after being connected to MQTT this long."""
    hold_down: float = Field(default=5.0, ge=0, le=600)
    """A member that stepped down stands again only after this long."""
    tick: float = Field(default=0.1, gt=0, le=5)
    """How often the election looks at the clock."""

    @model_validator(mode="after")
    def _renew_within_lease(self) -> ElectionSection:
        if self.renew * 2 > self.lease:
            raise ValueError(
                f"[election] renew ({self.renew} s) must be at most half the lease "
                f"({self.lease} s), or members would declare a live owner dead between renewals"
            )
        if self.tick > self.renew:
            raise ValueError(
                f"[election] tick ({self.tick} s) must not exceed renew ({self.renew} s)"
            )
        return self


class BrokerVM(_Strict):
    """Per-VM overrides at the broker (authorisation by VM)."""

    uuid: uuid_mod.UUID
    allowed_agents: list[Name] = Field(default_factory=list)
    journal_bound: int | str | None = None
    """This VM's disks' bound instead of ``[retention] journal_bound``."""

    _bound = field_validator("journal_bound")(_check_bound)


class BrokerConfig(_Strict):
    """`broker.toml`: one node of a recovery-site cluster."""

    broker: BrokerSection
    tls: TLSFiles
    mqtt: MQTTSection = MQTTSection()
    authorization: Authorization = Authorization()
    retention: Retention = Retention()
    election: ElectionSection = ElectionSection()
    vms: list[BrokerVM] = Field(default_factory=list)
    nbd_socket_dir: Path | None = None
    nbd_socket_group: str | None = None
    """The group that may use the point-in-time NBD socket (besides the broker's user)."""


class AdminSection(_Strict):
    brokers: list[str] = Field(min_length=1)
    agents: list[str] = Field(
        default_factory=list,
        description="the agents' control sockets (absolute paths, [agent] control_socket)",
    )

    @field_validator("agents")
    @classmethod
    def _socket_paths(cls, value: list[str]) -> list[str]:
        for item in value:
            if "://" in item:
                raise ValueError(
                    f"{item!r} is a URL; agents are reached through their control sockets now: "
                    "list each agent's [agent] control_socket path, e.g. "
                    '"/run/replikant/control/agent.sock"'
                )
            problem = path_problem(item)
            if problem is not None:
                raise ValueError(f"{item!r} {problem}: give the control socket's absolute path")
        return value


class AdminConfig(_Strict):
    """The admin CLI's config: where the brokers (and agents) are, and our admin certificate."""

    admin: AdminSection
    tls: TLSFiles


ModelT = TypeVar("ModelT", bound=BaseModel)


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` is not an absolute, normalised path (no ``..``, no NUL), or None if it is."""
    text = str(path)
    if "\0" in text:
        return "contains a NUL byte"
    if not Path(text).is_absolute():
        return "is not an absolute path"
    if ".." in Path(text).parts:
        return "has a '..' component"
    return None


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
