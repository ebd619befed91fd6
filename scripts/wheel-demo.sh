#!/usr/bin/env bash
# nftrace as `pip install` gives it, away from the checkout: a wheel built from this checkout,
# installed into an empty venv in a temporary directory, then `nftrace demo` and a lab with
# another scenario, run from a directory that has nothing of nftrace's. Proves that the
# scenarios travel in the package and that nothing reads the checkout. As root, after
# scripts/setup.sh (Debian's nftables, iptables and their Python bindings, which the venv sees
# through --system-site-packages). CI runs it (.ci/run); everything is removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
    echo "wheel-demo.sh: run as root (sudo $0)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/nftrace-wheel.XXXXXX")
prefix="nftwheel$$"
lab_up=
cleanup() {
    if [ -n "$lab_up" ]; then "$work/venv/bin/nftrace" lab down --prefix "$prefix" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Built from a copy: a build writes into its source tree.
mkdir "$work/source" "$work/elsewhere"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
    tar -C "$repo" --null --no-recursion -T - -cf - | tar -C "$work/source" -xf -
/usr/bin/python3 -m venv "$work/build"
"$work/build/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$work/source"
wheel=$(ls "$work"/dist/nftrace-*.whl)
echo "wheel-demo: built $(basename "$wheel")" >&2

/usr/bin/python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"

cd "$work/elsewhere"
"$work/venv/bin/nftrace" demo
lab_up=1
"$work/venv/bin/nftrace" lab up --prefix "$prefix" --scenario docker --listen-seconds 60 >/dev/null
"$work/venv/bin/nftrace" lab status --prefix "$prefix" | grep -q "scenario docker (docker.rules, iptables-nft)"
"$work/venv/bin/nftrace" lab down --prefix "$prefix" >/dev/null
lab_up=
echo "wheel-demo: nftrace demo and nftrace lab (scenario docker) ran from $work/elsewhere, installed from the wheel" >&2
