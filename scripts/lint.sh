#!/usr/bin/env bash
# Checks besides the tests: pyflakes' rules (ruff's F: unused imports and names, undefined names,
# ...) and dead code (vulture; scripts/vulture_allowlist.py names what only a framework uses).
# Installed by the `test` extra (scripts/setup.sh); .ci/run runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m ruff check --quiet --select F --output-format concise nftrace tests bench scripts
"$PYTHON" -m vulture --min-confidence 60 nftrace tests bench scripts/vulture_allowlist.py
echo "lint: ok"
