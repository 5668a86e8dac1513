#!/usr/bin/env bash
# The whole test suite: lint, then every test (unit, Redis integration, slow, Label Studio e2e).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
