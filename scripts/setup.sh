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
          bpftrace ufw ruby kmod procps conntrack ipset)
# ipset: near misses read the namespace's ipsets (`ipset save`) to evaluate legacy `-m set` rules;
# without it such a rule's set membership can only be shown as unknown.
# NFTRACE_SETUP_DOCKER=1 (.ci/run): Docker and busybox-static for tests/test_containers.py, which
# runs dockerd inside a test namespace. Docker's services are neither started nor enabled here:
# a Docker running in the machine's own namespace would rewrite its firewall.
if [ "${NFTRACE_SETUP_DOCKER:-0}" = 1 ]; then
    PACKAGES+=(docker.io busybox-static)
fi
# NFTRACE_SETUP_CLEAN_ROOTS=1 (.ci/run): debootstrap, which scripts/clean-root.sh builds the clean
# Debian roots with (CI proves the README's commands in them).
if [ "${NFTRACE_SETUP_CLEAN_ROOTS:-0}" = 1 ]; then
    PACKAGES+=(debootstrap)
fi

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
    if [[ " ${missing[*]} " == *" docker.io "* ]]; then
        # Docker must not start from its installation (policy-rc.d: "not now") nor at boot:
        # tests start their own dockerd, inside a namespace.
        policy=/usr/sbin/policy-rc.d
        made_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
        fi
        trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        if [ "$made_policy" = 1 ]; then rm -f "$policy"; made_policy=0; fi
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
        fi
    else
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
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
