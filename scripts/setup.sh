#!/usr/bin/env bash
# Install everything nftrace needs on a fresh Debian 12 or 13 machine, as root: Debian's packages
# (nftables and its Python bindings, iptables and python-iptables, iproute2, bpftrace, ...) and a
# virtualenv in .venv that sees them, with nftrace and its pure-Python dependencies from PyPI.
# Nothing is compiled: a production firewall has no C compiler, and needs none.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-nftables and python3-iptables are bindings to C libraries of the same Debian release
# (libnftables, libxtables): Debian builds them against those, PyPI has no wheel of either.
PACKAGES=(nftables libnftables1 python3-nftables iptables python3-iptables iproute2 python3 python3-venv python3-pip
          bpftrace ufw ruby kmod procps conntrack)

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

# Debian's python3 sees python3-nftables and python3-iptables; a venv made from it with
# --system-site-packages does too. (The `iptables` extra would build python-iptables from source.)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nftables, iptc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c 'import nftables, iptc, pyroute2, typer' 
echo "setup: ok ($(.venv/bin/nftrace --version 2>/dev/null || echo nftrace installed))"
