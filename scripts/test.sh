#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
.venv/bin/python -m ruff check ntkgp tests examples benchmarks
exec .venv/bin/python -m pytest -q "$@"
