#!/usr/bin/env bash
# Set up (if needed) and run the quickstart: diabetes regression, writes quickstart.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
exec .venv/bin/python examples/quickstart.py "$@"
