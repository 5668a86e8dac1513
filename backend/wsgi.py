"""Gunicorn entry point: ``gunicorn -w 1 --threads 4 -b 0.0.0.0:9090 backend.wsgi:app``.

Settings come from the environment (``backend.settings``); the model loads in the background once
per worker process and is shared by the worker's threads.
"""

from backend.app import create_app

app = create_app()
