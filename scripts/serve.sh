#!/usr/bin/env bash
# Serve the ML backend (gunicorn) with the model registry's current version; on a fresh machine the
# registry is seeded from the embedded default model (model/default).  Settings: environment
# (see docs/configuration.md); it listens on HOST:PORT (default 127.0.0.1:9090; HOST=0.0.0.0 to
# accept other machines) with WEB_WORKERS processes of WEB_THREADS threads.  Extra arguments go
# to gunicorn.
#
#   bash scripts/serve.sh
#   HOST=0.0.0.0 PORT=9191 bash scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/gunicorn --config python:backend.gunicorn_conf "$@" backend.wsgi:app
