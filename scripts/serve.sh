#!/usr/bin/env bash
# Serve the ML backend (gunicorn) with the model registry's current version; on a fresh machine the
# registry is seeded from the embedded default model (model/default).  Settings: environment
# (see docs/configuration.md).  Listens on 0.0.0.0:${PORT:-9090}.
#
#   bash scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/gunicorn --workers "${WEB_WORKERS:-1}" --threads "${WEB_THREADS:-4}" --timeout 120 \
  --bind "0.0.0.0:${PORT:-9090}" backend.wsgi:app
