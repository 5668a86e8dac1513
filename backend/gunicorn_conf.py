"""Gunicorn settings from the backend's own (``HOST``, ``PORT``, ``WEB_WORKERS``, ``WEB_THREADS``).

``gunicorn -c python:backend.gunicorn_conf backend.wsgi:app`` (what ``scripts/serve.sh`` and
docker-compose run): the address and pool sizes are read and checked by :mod:`backend.settings`
like every other setting, so a bad ``PORT`` stops the start with a message naming it.
"""

from backend.settings import bind_address, get_settings

__all__ = ["bind", "threads", "timeout", "workers"]

_settings = get_settings()
bind = [bind_address(_settings)]
workers = _settings.web_workers
threads = _settings.web_threads
timeout = 120  # seconds a worker may stay silent: a large /predict batch on CPU
