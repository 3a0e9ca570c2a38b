#!/usr/bin/env bash
# Set up (if needed), check and test: ruff (lint and format), mypy, the strict docs build, pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
.venv/bin/python -m ruff check ntkgp tests examples benchmarks
.venv/bin/python -m ruff format --check ntkgp tests examples benchmarks
.venv/bin/python -m mypy
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
exec .venv/bin/python -m pytest -q "$@"
