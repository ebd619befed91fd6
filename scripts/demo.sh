#!/usr/bin/env bash
# First contact, as root on a fresh Debian 12 machine: install what nftrace needs
# (scripts/setup.sh), then run `nftrace demo`: a lab of three network namespaces, four flows
# traced (accepted, dropped by a rule, dropped by a policy, NATed), the answers, the lab removed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/nftrace demo
