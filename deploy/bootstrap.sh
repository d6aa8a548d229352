#!/usr/bin/env bash
# One entry point for a fresh Debian machine:
#   deploy/bootstrap.sh lab [lab args...]   install what is missing, then bring up the one-command lab
#   deploy/bootstrap.sh test [pytest args...] install what is missing, then lint, type-check and test
# Everything it installs is idempotent, so running it twice costs seconds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="$repo/.venv"

# Debian packages: the real peers our tests and lab talk to.
need_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_pkgs+=(mosquitto)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v nbdcopy >/dev/null 2>&1 || need_pkgs+=(libnbd-bin)
# libnbd's Python bindings, for the NBD conformance checks (they need Debian's own python3).
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_pkgs+=(python3-libnbd)
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v rsync >/dev/null 2>&1 || need_pkgs+=(rsync)
# bench/writepath.py's second peer (nbdkit's file plugin) and the shaped link of broker_initial.py.
command -v nbdkit >/dev/null 2>&1 || need_pkgs+=(nbdkit)
command -v tc >/dev/null 2>&1 || need_pkgs+=(iproute2)
# Real test guests (tests/support_guest.py): qemu runs them, busybox is their whole userland.
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
# (a dynamic busybox cannot run in the initramfs: ldd fails only on a static one)
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need_pkgs+=(busybox-static)
# systemd-analyze scores the units, systemd-sysusers creates their users (tests/security).
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}" >&2
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# Python: one virtualenv inside the checkout, reinstalled only when pyproject.toml changes.
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.replikant-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
# The test guests' Debian cloud kernel: downloaded and unpacked into .cache/guest, never installed
# into /boot (apt-get download needs no root).
if [ ! -f "$repo/.cache/guest/kernel/vmlinuz" ] && ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
fi
"$venv/bin/python" -m tests.support_guest >/dev/null

what="${1:-}"
[ $# -gt 0 ] && shift
case "$what" in
    lab)
        exec replikant lab up --dir "${REPLIKANT_LAB_DIR:-$repo/lab}" "$@"
        ;;
    test)
        ruff format --check agents broker common certs ops tests bench
        ruff check agents broker common certs ops tests bench
        mypy
        exec pytest "$@"
        ;;
    *)
        echo "usage: deploy/bootstrap.sh lab|test [args...]" >&2
        exit 2
        ;;
esac
