#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, kernel-backed tests included.
# NFTRACE_REQUIRE_KERNEL=1 turns a skipped kernel test into a failure: a run that could not
# reach the kernel has not tested nftrace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export NFTRACE_REQUIRE_KERNEL=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
