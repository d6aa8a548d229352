"""Real Linux guests for tests: a Debian cloud kernel and a busybox initramfs built here.

The guest's only disk is an NVMe controller (built into Debian's cloud kernel, so the initramfs
needs no storage modules) whose drive is an NBD export. Its /init does what the kernel command
line says and reports on the serial console:

- ``rk.op=write rk.off=N rk.len=N rk.seed=S``: write ``pattern(S, N)`` at byte N (4 KiB
  multiples), fsync, print ``RK-DONE``;
- ``rk.op=read rk.off=N rk.len=N``: print ``RK-HASH <sha256 of the region>``; with
  ``rk.woff=N rk.wlen=N rk.wseed=S`` it then writes ``pattern(S, N)`` there and prints
  ``RK-DONE`` (a guest that checks what it finds, then adds its own data);
- ``rk.op=run rk.off=N rk.seed=S``: rewrite the region every ``rk.every`` seconds (``RK-TICK k``);
- always: ``RK-NET`` lines (every interface and route the guest has), then, with
  ``rk.then=poweroff``, sync and power off; otherwise open the ACPI power button, print
  ``RK-READY`` (a power-down from now on is seen), wait for it (QMP ``system_powerdown``),
  print ``RK-BYE``, sync and power off.

``python -m tests.support_guest`` fetches the kernel into the cache (deploy/bootstrap.sh calls it),
so a CI run needs no network once bootstrapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("REPLIKANT_GUEST_CACHE", REPO / ".cache" / "guest"))
META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# Loaded in this order: the ACPI power button (so `system_powerdown` reaches /init) and evdev.
MODULES = ("kernel/drivers/acpi/button.ko", "kernel/drivers/input/evdev.ko")
BLOCK = 4096

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/rk/*.ko; do insmod "$m" 2>/dev/null; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
say() { echo "$*" > /dev/ttyS0; }
pattern() {
    case "$1" in
    noise@*) dd if=/lib/rk/noise bs=4096 skip=$((${1#noise@}/4096)) count=$(($2/4096)) 2>/dev/null;;
    *) yes "$1" | head -c "$2";;
    esac
}
put() {
    pattern "$3" "$2" | dd of=$disk bs=4096 seek=$(($1/4096)) conv=notrunc,fsync 2>/dev/null
    sync; say "RK-DONE"
}
op=$(arg rk.op); off=$(arg rk.off); len=$(arg rk.len); seed=$(arg rk.seed)
disk=/dev/nvme0n1
i=0; while [ ! -b $disk ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
say "RK-BOOT $(cat /proc/uptime)"
for l in $(ip -o link | awk -F': ' '{print $2}'); do say "RK-NET link $l"; done
ip route | while read r; do say "RK-NET route $r"; done
case "$op" in
write) put "$off" "$len" "$seed";;
read)
    h=$(dd if=$disk bs=4096 skip=$((off/4096)) count=$((len/4096)) 2>/dev/null | sha256sum)
    say "RK-HASH ${h%% *}"
    woff=$(arg rk.woff); [ -n "$woff" ] && put "$woff" "$(arg rk.wlen)" "$(arg rk.wseed)";;
run)
    every=$(arg rk.every); k=0
    ( while true; do k=$((k+1))
        pattern "$seed-$k" 4096 | dd of=$disk bs=4096 seek=$((off/4096)) conv=notrunc,fsync \
            2>/dev/null
        say "RK-TICK $k"; sleep "${every:-0.2}"; done ) &;;
esac
if [ "$(arg rk.then)" = poweroff ]; then sync; poweroff -f; fi
for e in /sys/class/input/event*; do
    [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ] && btn=/dev/input/${e##*/}
done
if [ -n "$btn" ]; then exec 3< "$btn"; say "RK-READY"; head -c 1 <&3 > /dev/null
else say "RK-NOBUTTON"; while true; do sleep 60; done; fi
say "RK-BYE"; sync; poweroff -f
"""


NOISE = random.Random(13).randbytes(1 << 20)
"""Incompressible bytes in the initramfs (``/lib/rk/noise``): a seed ``noise@N`` writes them from
byte N, so a test that counts bytes on the wire is not fooled by compression."""


def pattern(seed: str, length: int) -> bytes:
    """The bytes the guest writes for ``seed``: ``NOISE[N:N+LENGTH]`` for ``noise@N`` (N and
    LENGTH 4 KiB multiples), else what ``yes SEED | head -c LENGTH`` prints."""
    if seed.startswith("noise@"):
        start = int(seed.removeprefix("noise@"))
        assert start % BLOCK == 0, seed
        assert start + length <= len(NOISE), (seed, length)
        return NOISE[start : start + length]
    line = (seed + "\n").encode()
    return (line * (length // len(line) + 1))[:length]


def sha256(data: bytes) -> str:
    """Hex SHA-256, as the guest's ``sha256sum`` prints it."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs that boot a test guest."""

    kernel: Path
    initrd: Path

    def append(self, **ops: str | int) -> str:
        """The kernel command line for an operation (``op="write", off=..., ...``)."""
        words = ["console=ttyS0", "panic=-1", "quiet", "loglevel=3"]
        words += [f"rk.{k}={v}" for k, v in ops.items()]
        return " ".join(words)

    def settings(self, **ops: str | int) -> dict[str, object]:
        """A test guest's qemu settings (``[vms.hypervisor]``): NVMe disk, direct kernel boot,
        no reboot on panic, 192 MiB."""
        return {
            "driver": "qemu",
            "machine": "pc",
            "memory_mib": 192,
            "disk_bus": "nvme",
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "append": self.append(**ops),
            "extra_args": ["-no-reboot"],
            "stop_timeout_seconds": 20,
        }

    def toml(self, section: str, **ops: str | int) -> str:
        """The same settings as agent.toml lines under ``[section]``."""
        lines = [f"\n[{section}]"] + [
            f"{k} = {json.dumps(v)}" for k, v in self.settings(**ops).items()
        ]
        return "\n".join(lines) + "\n"


def _package() -> str:
    """The versioned kernel package the meta-package depends on."""
    out = subprocess.run(
        ["apt-cache", "depends", META_PACKAGE], check=True, capture_output=True, text=True
    ).stdout
    found = re.findall(r"Depends: (linux-image-[0-9][^\s]*)", out)
    if not found:
        raise RuntimeError(f"apt-cache names no kernel for {META_PACKAGE}: run apt-get update")
    return str(found[0])


def fetch_kernel(cache: Path = CACHE) -> Path:
    """The cloud kernel's directory in ``cache``: downloaded and unpacked once, not installed."""
    done = cache / "kernel"
    if (done / "vmlinuz").is_file():
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        subprocess.run(
            ["apt-get", "download", _package()], cwd=work, check=True, capture_output=True
        )
        (deb,) = work.glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
        (vmlinuz,) = (work / "x" / "boot").glob("vmlinuz-*")
        (moddir,) = (work / "x" / "lib" / "modules").iterdir()
        stage = work / "kernel"
        (stage / "modules").mkdir(parents=True)
        shutil.copy(vmlinuz, stage / "vmlinuz")
        for i, rel in enumerate(MODULES):
            shutil.copy(moddir / rel, stage / "modules" / f"{i}-{Path(rel).name}")
        os.replace(stage, done)
    return done


def _cpio_entry(name: str, mode: int, data: bytes = b"") -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    body = head + name.encode() + b"\0"
    body += b"\0" * (-len(body) % 4) + data
    return body + b"\0" * (-len(body) % 4)


def build_initrd(kernel_dir: Path, out: Path) -> Path:
    """A newc cpio of busybox, the modules and /init (uncompressed: the kernel unpacks it as is)."""
    entries = [_cpio_entry(d, 0o40755) for d in ("bin", "dev", "proc", "sys", "lib", "lib/rk")]
    entries.append(_cpio_entry("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    for mod in sorted((kernel_dir / "modules").iterdir()):
        entries.append(_cpio_entry(f"lib/rk/{mod.name}", 0o100644, mod.read_bytes()))
    entries.append(_cpio_entry("lib/rk/noise", 0o100644, NOISE))
    entries.append(_cpio_entry("init", 0o100755, INIT.encode()))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(b"".join(entries))
    os.replace(tmp, out)
    return out


def guest_image(cache: Path = CACHE) -> GuestImage:
    """The kernel (fetched once) and a freshly built initramfs in ``cache``."""
    kdir = fetch_kernel(cache)
    return GuestImage(kdir / "vmlinuz", build_initrd(kdir, cache / "initrd.cpio"))


def wait_console(path: Path, needle: str, *, timeout: float = 60.0) -> str:
    """The serial console's text once it contains ``needle`` (raises with the text so far)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} on the guest console within {timeout} s:\n{text}")


def console_value(text: str, key: str) -> str:
    """The value after the first ``key`` on the console (``RK-HASH`` -> the hex digest)."""
    m = re.search(rf"{re.escape(key)} (\S+)", text)
    if m is None:
        raise AssertionError(f"no {key} on the guest console:\n{text}")
    return m.group(1)


if __name__ == "__main__":
    print(fetch_kernel(Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE))
