#!/usr/bin/env bash
# Create .venv-ls (a separate virtualenv with Label Studio) in the repo root, for the end-to-end
# test and the labeling-page screenshot.  Label Studio pins its own rq/redis/Django versions, so it
# never shares the backend's .venv.  Idempotent: an existing, working .venv-ls is kept.
#
#   bash scripts/setup_label_studio.sh            # LS_VERSION=1.23.2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VERSION="${LS_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
VENV=.venv-ls

if [ -x "$VENV/bin/label-studio" ] && "$VENV/bin/python" -c "import selenium" 2>/dev/null \
   && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))')" = "$LS_VERSION" ]; then
  echo "$VENV: label-studio $LS_VERSION already installed"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# selenium drives the system chromium through /usr/bin/chromedriver (no browser download).
"$VENV/bin/pip" install --quiet "label-studio==$LS_VERSION" "selenium>=4.20"
"$VENV/bin/python" -c 'import importlib.metadata as m; print("label-studio", m.version("label-studio"), "sdk", m.version("label-studio-sdk"))'
