#!/usr/bin/env bash
# Install everything nftrace needs on a fresh Debian 12 machine, as root: Debian's packages
# (nftables and its Python bindings, iptables, iproute2, bpftrace, ...) and a virtualenv in
# .venv that sees Debian's python3-nftables, with nftrace installed in it.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-iptables: Debian's build of the `iptables` extra (python-iptables); from PyPI it is
# a C extension that needs a compiler.
PACKAGES=(nftables libnftables1 python3-nftables python3-iptables iptables iproute2 python3 python3-venv
          python3-pip bpftrace ufw ruby kmod procps conntrack)

# `setup.sh --packages`: the Debian packages, one a line (vagrant/build-box.sh puts them in its box).
if [ "${1:-}" = --packages ]; then
    printf '%s\n' "${PACKAGES[@]}"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (sudo $0)" >&2
    exit 2
fi
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 sees python3-nftables; a venv made from it with --system-site-packages does too.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nftables' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,iptables]'
.venv/bin/python -c 'import nftables, pyroute2, typer' 
echo "setup: ok ($(.venv/bin/nftrace --version 2>/dev/null || echo nftrace installed))"
