"""A shaped link for benches: two network namespaces joined by a veth pair, tbf on both ends.

The bench creates both namespaces, the veth pair and the addresses (a private /30 that exists
only inside those namespaces), and deletes the namespaces (which deletes the pair) on exit, so
no traffic ever leaves them. Needs root and ``ip``/``tc`` (Debian: iproute2).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from types import TracebackType

SUBNET = "10.231.77"  # /30 inside the bench's own namespaces only


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class ShapedLink:
    """``src`` and ``dst`` namespaces; ``rate`` each way (tbf), addresses ``.1`` and ``.2``."""

    def __init__(self, rate: str = "1gbit") -> None:
        tag = str(os.getpid())[-6:]
        self.rate = rate
        self.ns = {"src": f"rkb-src-{tag}", "dst": f"rkb-dst-{tag}"}
        self.dev = {"src": f"rkbs{tag}", "dst": f"rkbd{tag}"}
        self.addr = {"src": f"{SUBNET}.1", "dst": f"{SUBNET}.2"}

    def __enter__(self) -> ShapedLink:
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
            _ip("link", "add", self.dev["src"], "type", "veth", "peer", "name", self.dev["dst"])
            for side, ns in self.ns.items():
                dev = self.dev[side]
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{self.addr[side]}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                # burst: at least rate / HZ, or tbf cannot reach the rate
                subprocess.run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", self.rate, "burst", "1mb", "latency", "50ms"],
                    check=True, capture_output=True,
                )  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Delete both namespaces (their veth ends go with them)."""
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def argv(self, side: str, cmd: list[str]) -> list[str]:
        """``cmd`` run inside ``side``'s namespace."""
        return ["ip", "netns", "exec", self.ns[side], *cmd]

    def wire_bytes(self) -> int:
        """Bytes that crossed the link so far, both directions (frames, headers included)."""
        out = subprocess.run(
            ["ip", "-n", self.ns["src"], "-j", "-s", "link", "show", "dev", self.dev["src"]],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])

    def wait_listening(self, side: str, port: int, timeout: float = 20.0) -> None:
        """Wait until something listens on ``side``'s address and ``port``."""
        deadline = time.monotonic() + timeout
        probe = f"exec 3<>/dev/tcp/{self.addr[side]}/{port}"
        while time.monotonic() < deadline:
            if (
                subprocess.run(
                    self.argv(side, ["bash", "-c", probe]), check=False, capture_output=True
                ).returncode
                == 0
            ):
                return
            time.sleep(0.1)
        raise TimeoutError(f"nothing listens on {self.addr[side]}:{port} in {self.ns[side]}")
