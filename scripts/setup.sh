#!/usr/bin/env bash
# One command that sets up everything on a fresh machine (idempotent):
#   - .venv      the backend, model and tests (requirements.txt, pinned torch/torchvision)
#   - .venv-ls   Label Studio in its own virtualenv (end-to-end tests, screenshots)
#   - Debian packages used by tests: docker-compose (compose file validation), chromium (+driver)
#
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r requirements.txt
# The project itself, editable: model, toyworld, backend and tools import from anywhere (no sys.path edits).
.venv/bin/pip install --quiet --no-deps -e .
.venv/bin/python -c 'import torch, torchvision, transformers, open_clip; print("torch", torch.__version__, "torchvision", torchvision.__version__, "transformers", transformers.__version__, "open_clip", open_clip.__version__)'

bash scripts/setup_label_studio.sh

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
echo "setup complete"
