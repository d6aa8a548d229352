"""A misconfigured agent refuses to start, with one clear message per problem."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from agents.service import tcp_clients
from agents.startup import check_config, policy_for, validate
from certs.records import IssuedCert
from certs.store import CertStore
from common.config import AgentConfig, load_config
from common.errors import ConfigError
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    VMSpec,
    make_image,
    replikant_exe,
    run_tool,
    write_agent_config,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh PKI."""
    return make_pki(tmp_path / "pki")


def _config(tmp_path: Path, pki: Pki, vms: list[VMSpec], **kw: object) -> Path:
    return write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=["https://127.0.0.1:1"],
        vms=vms,
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
        **kw,  # type: ignore[arg-type]
    )


def _problems(path: Path) -> list[str]:
    return check_config(load_config(path, AgentConfig))


def test_good_config_has_no_problems(tmp_path: Path, pki: Pki) -> None:
    """The baseline: a correct config validates."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", img)])])
    assert _problems(path) == []
    validate(load_config(path, AgentConfig))


def test_missing_image(tmp_path: Path, pki: Pki) -> None:
    """A missing image is named, with the VM and disk it belongs to."""
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", tmp_path / "nope.img")])])
    (problem,) = _problems(path)
    assert "vm1/d0" in problem
    assert "nope.img does not exist" in problem


def test_duplicate_export_name(tmp_path: Path, pki: Pki) -> None:
    """Two disks may not share an export name, even across VMs."""
    a = make_image(tmp_path / "a.img", MiB)
    b = make_image(tmp_path / "b.img", MiB)
    path = _config(
        tmp_path,
        pki,
        [
            VMSpec("vm1", [DiskSpec("d0", a, export="shared")]),
            VMSpec("vm2", [DiskSpec("d0", b, export="shared")]),
        ],
    )
    (problem,) = _problems(path)
    assert "export name 'shared' is already used by vm1/d0" in problem
    assert "vm2/d0" in problem


def test_unknown_policy(tmp_path: Path, pki: Pki) -> None:
    """A VM naming a policy that does not exist is refused, listing the defined ones."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", img)], policy="gold")])
    (problem,) = _problems(path)
    assert "unknown policy 'gold' (defined: default)" in problem


def test_unreadable_certificate(tmp_path: Path, pki: Pki) -> None:
    """A certificate that cannot be read is named (here: removed)."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", img)])])
    pki.agent.tls.cert.unlink()
    (problem,) = _problems(path)
    assert problem.startswith("tls: certificate")
    assert "unreadable" in problem


def test_garbage_certificate(tmp_path: Path, pki: Pki) -> None:
    """A certificate file that is not PEM is refused with the TLS loader's explanation."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", img)])])
    pki.agent.tls.cert.write_text("not a certificate")
    (problem,) = _problems(path)
    assert problem.startswith("tls:")
    assert str(pki.agent.tls.cert) in problem


def test_every_problem_is_reported_at_once(tmp_path: Path, pki: Pki) -> None:
    """Four different mistakes give four messages, not one per restart."""
    a = make_image(tmp_path / "a.img", MiB)
    path = _config(
        tmp_path,
        pki,
        [
            VMSpec("vm1", [DiskSpec("d0", a, export="x"), DiskSpec("d1", tmp_path / "gone.img")]),
            VMSpec("vm2", [DiskSpec("d0", a, export="x")], policy="silver"),
        ],
    )
    pki.agent.tls.key.unlink()
    problems = _problems(path)
    assert len(problems) == 4, problems
    with pytest.raises(ConfigError) as info:
        validate(load_config(path, AgentConfig))
    assert info.value.problems == problems
    assert "4 problem(s)" in info.value.message


def test_hook_and_url_problems(tmp_path: Path, pki: Pki) -> None:
    """Half-configured freeze hooks and a plain-HTTP broker URL are refused."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(
        tmp_path,
        pki,
        [VMSpec("vm1", [DiskSpec("d0", img)])],
        policy_extra='app_consistent_every = 2\nfreeze_command = ["true"]',
    )
    text = path.read_text().replace("https://127.0.0.1:1", "http://127.0.0.1:1")
    path.write_text(text)
    problems = _problems(path)
    assert any("must be an https:// URL" in p for p in problems)
    assert any("freeze_command and thaw_command must be given together" in p for p in problems)


def test_policy_selection_by_label(tmp_path: Path, pki: Pki) -> None:
    """A VM without a policy name gets the first policy whose selector matches its labels."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(
        tmp_path,
        pki,
        [VMSpec("vm1", [DiskSpec("d0", img)])],
        extra_policies='[policies.gold]\ninterval_seconds = 2\nselector = { tier = "gold" }',
    )
    text = path.read_text().replace('name = "vm1"', 'name = "vm1"\nlabels = { tier = "gold" }')
    path.write_text(text)
    config = load_config(path, AgentConfig)
    policy = policy_for(config, config.vms[0])
    assert policy is not None
    assert policy.interval_seconds == 2


def test_cli_refuses_with_one_line_per_problem(tmp_path: Path, pki: Pki) -> None:
    """`replikant agent run` prints every problem on its own line and exits 1 without a trace."""
    path = _config(
        tmp_path,
        pki,
        [VMSpec("vm1", [DiskSpec("d0", tmp_path / "gone.img")], uuid=uuid.uuid4(), policy="p")],
    )
    proc = subprocess.run(
        [replikant_exe(), "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any("gone.img does not exist" in ln for ln in lines)
    assert any("unknown policy 'p'" in ln for ln in lines)


def test_example_config_is_a_valid_agent_config() -> None:
    """deploy/agent.example.toml parses as an AgentConfig (its paths exist only on a real host)."""
    example = Path(__file__).resolve().parent.parent / "deploy" / "agent.example.toml"
    config = load_config(example, AgentConfig)
    assert [vm.name for vm in config.vms] == ["web1", "db1"]
    policy = policy_for(config, config.vms[1])
    assert policy is not None
    assert policy.app_consistent_every == 10


# -- the agent's own certificate ---------------------------------------------------------------


def _with_cert(tmp_path: Path, pki: Pki, cert: IssuedCert) -> list[str]:
    """The problems of a good config whose [tls] cert/key are swapped for ``cert``'s."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", img)])])
    text = path.read_text()
    text = text.replace(str(pki.agent.cert_path), str(cert.cert_path))
    path.write_text(text.replace(str(pki.agent.key_path), str(cert.key_path)))
    return _problems(path)


def test_broker_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A broker's certificate deployed on an agent: the role is named, with the fix."""
    (problem,) = _with_cert(tmp_path, pki, pki.broker)
    assert problem.startswith("tls: error: wrong_role:")
    assert "replikant://broker/c1/b1 (role broker)" in problem
    assert "replikant certs issue agent" in problem


def test_certificate_of_another_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A certificate from another CA is refused naming the configured CA."""
    foreign = CertStore.init(tmp_path / "other-ca").issue_agent("h1", dns=["localhost"])
    (problem,) = _with_cert(tmp_path, pki, foreign)
    assert problem.startswith("tls: error: wrong_ca:")
    assert str(pki.ca) in problem


def test_certificate_for_another_host_is_refused(tmp_path: Path, pki: Pki) -> None:
    """The identity must be this agent's [agent] host."""
    other = pki.store.issue_agent("h9", dns=["localhost"])
    (problem,) = _with_cert(tmp_path, pki, other)
    assert "wrong_identity" in problem
    assert "replikant://agent/h9" in problem
    assert "replikant certs issue agent --host h1" in problem


def test_cli_refuses_a_broker_certificate(tmp_path: Path, pki: Pki) -> None:
    """`replikant agent run` with a broker certificate exits 1 naming the role (no start)."""
    _with_cert(tmp_path, pki, pki.broker)
    proc = run_tool(replikant_exe(), "agent", "run", "--config", str(tmp_path / "agent.toml"))
    assert proc.returncode == 1, proc.stderr
    assert "wrong_role" in proc.stderr
    assert "agent_started" not in proc.stderr + proc.stdout


# -- images held by another process --------------------------------------------------------------


def test_image_locked_by_another_process_is_a_problem(tmp_path: Path, pki: Pki) -> None:
    """An image another process holds (qemu-io here, with QEMU's own locks) is refused."""
    img = make_image(tmp_path / "a.img", MiB)
    path = _config(tmp_path, pki, [VMSpec("vm1", [DiskSpec("d0", img)])])
    holder = subprocess.Popen(  # qemu-io keeps the image open (and locked) while reading stdin
        ["qemu-io", "-f", "raw", str(img)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert holder.stdin is not None
        assert holder.stdout is not None
        holder.stdin.write("read 0 512\n")  # answered once the image is open
        holder.stdin.flush()
        holder.stdout.readline()
        (problem,) = _problems(path)
    finally:
        holder.communicate("quit\n", timeout=10)
    assert f"image {img} is in use by another process" in problem
    assert "replikant agent attach-args VM" in problem
    assert _problems(path) == []  # released with the other process


def test_tcp_clients_default_to_the_agents_own_identity(tmp_path: Path, pki: Pki) -> None:
    """Without nbd.tcp_clients only this agent's identity may use the TCP listener; a list
    replaces that default, and an entry that is not a certificate identity is refused."""
    img = make_image(tmp_path / "a.img", MiB)
    vms = [VMSpec("vm1", [DiskSpec("d0", img)])]
    default = load_config(_config(tmp_path, pki, vms, tcp_listen="127.0.0.1:1"), AgentConfig)
    assert tcp_clients(default).uris == {"replikant://agent/h1"}
    listed = load_config(
        _config(tmp_path, pki, vms, tcp_clients=["replikant://admin/alice"]), AgentConfig
    )
    assert tcp_clients(listed).uris == {"replikant://admin/alice"}
    with pytest.raises(ConfigError, match="not a certificate identity"):
        load_config(_config(tmp_path, pki, vms, tcp_clients=["hv2"]), AgentConfig)


def test_guest_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    """A standby reusing a VM's name, a missing qemu binary or kernel, a NIC in extra_args and a
    shell line instead of an argv list are each named with where they are."""
    img = make_image(tmp_path / "a.img", MiB)
    vm = VMSpec("vm1", [DiskSpec("d0", img)])
    path = _config(tmp_path, pki, [vm])
    base = path.read_text()
    path.write_text(
        base
        + '[vms.hypervisor]\ndriver = "qemu"\nbinary = "no-such-qemu"\n'
        + f'kernel = "{tmp_path}/vmlinuz"\n'
        + f'\n[[standby]]\nname = "vm1"\nuuid = "{uuid.uuid4()}"\n'
        + '[standby.hypervisor]\ndriver = "command"\nstart = ["true"]\nstop = ["true"]\n'
        + 'status = ["/bin/false"]\n'
    )
    problems = _problems(path)
    assert any("standby[0] (vm1): vm1 is already used by vms (vm1)" in p for p in problems)
    assert any("vms[0].hypervisor: program 'no-such-qemu'" in p for p in problems)
    assert any(f"vms[0].hypervisor: {tmp_path}/vmlinuz does not exist" in p for p in problems)
    assert len(problems) == 3, problems
    path.write_text(base + '[vms.hypervisor]\ndriver = "qemu"\nextra_args = ["-nic", "user"]\n')
    with pytest.raises(ConfigError, match="network_args"):
        load_config(path, AgentConfig)
    path.write_text(base + '[vms.hypervisor]\ndriver = "command"\nstart = "virsh start x"\n')
    with pytest.raises(ConfigError, match="start"):
        load_config(path, AgentConfig)
