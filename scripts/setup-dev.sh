#!/usr/bin/env bash
# Create .venv with ntkgp, its examples and its test dependencies (laplace-torch as the peer).
# Usage: bash scripts/setup-dev.sh            (idempotent; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${NTKGP_TORCH:-torch==2.13.0}   # override, e.g. NTKGP_TORCH='torch>=2.1'
stamp=.venv/.ntkgp-setup-$(cat pyproject.toml scripts/setup-dev.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned, so later resolution never swaps it for another build.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps laplace-torch==0.3 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
.venv/bin/python -c "import ntkgp, laplace, gpytorch, torch; print('ntkgp', ntkgp.__version__, '| torch', torch.__version__, '| gpytorch', gpytorch.__version__)"
touch "$stamp"
