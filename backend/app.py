"""Flask app speaking Label Studio's ML backend protocol (see shared reference, LS 1.23.2).

Endpoints: ``GET /health`` (and ``/``), ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET /versions``, ``GET /metrics``, ``POST /preannotate`` and ``GET /preannotate/<run>`` (a
project's pre-annotation as RQ jobs, :mod:`backend.preannotate`).
Every error is JSON ``{"status": code, "detail": message}``;
bad input gets a 4xx with a clear message (every refusal is a :class:`backend.errors.ClientError`,
logged at WARNING with the project, task and region it concerns, and counted in
``roi_refusals_total{reason}``), unexpected failures a 500 without traceback (the traceback goes to
the log).  Label Studio 1.23.2 shows none of these bodies to its user ("400 Client Error … check
the ML backend server console logs"): the log is where the reason is read.  ``/predict`` answers
what it can: every box or task it leaves out is logged at WARNING (``region skipped`` /
``task skipped``) and counted in ``roi_regions_skipped_total`` / ``roi_tasks_skipped_total``
(see :mod:`backend.predictions`).  ``/setup`` answers the mapping it will use and its warnings.
Optional HTTP basic auth guards everything but ``/health``.

Gunicorn entry point: ``backend.wsgi:app`` (the model starts loading in the background when the
app is created, so ``/health`` and ``/setup`` answer at once).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from backend import preannotate, webhooks
from backend.errors import ClientError
from backend.images import ImageError, ImageFetcher
from backend.jobs import queue_figures, redis_connection
from backend.label_config import ConfigError, LabelConfig, parse_label_config
from backend.label_studio import LabelStudioError
from backend.observability import Metrics, setup_logging
from backend.predicted import remember_predictions
from backend.predictions import Skip, predict_tasks
from backend.request_body import check_length, parse_json_object, read_limited
from backend.serving import ModelHolder, ModelUnavailable
from backend.settings import Settings, get_settings

log = logging.getLogger("backend.app")
MODEL_CLASS = "RegionCaptionBackend"
OPEN_PATHS = {"/health", "/"}
# Metric labels come from a fixed set: a client's made-up method or action must not add a series.
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def bounded_label(value: str, known: set[str] | dict[str, Any]) -> str:
    """``value`` when it is one of ``known``, else ``"OTHER"`` (a metric label of bounded range)."""
    return value if value in known else "OTHER"


def error_response(status: int, detail: str) -> tuple[Response, int]:
    return jsonify({"status": status, "detail": detail}), status


def json_body(settings: Settings) -> dict[str, Any]:
    """The request body as a JSON object (413 over MAX_BODY_MB, streamed or not; 400 when malformed,
    nested deeper than MAX_JSON_DEPTH, non-finite or not valid Unicode: see backend.request_body)."""
    limit = int(settings.max_body_mb * 2**20)
    check_length(request.content_length, limit)  # before request.stream, which would raise its own 413
    raw = read_limited(request.stream, limit)
    return parse_json_object(raw, settings.max_json_depth)


def project_of(payload: dict[str, Any]) -> int | str | None:
    """The Label Studio project a request is about: ``"12.1795583044"`` (what Label Studio sends
    to /setup and /predict) -> ``12``; else the first task's ``project``."""
    value = payload.get("project")
    tasks = payload.get("tasks")
    if value is None and isinstance(tasks, list) and tasks and isinstance(tasks[0], dict):
        value = tasks[0].get("project")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        # isdigit() is also true of "²", which int() refuses: ASCII digits only
        return int(head) if head.isascii() and head.isdigit() and len(head) <= 18 else value[:40]
    return None


def config_from(payload: dict[str, Any], key: str) -> LabelConfig:
    xml = payload.get(key)
    if not isinstance(xml, str) or not xml.strip():
        raise ClientError(f"'{key}' (the project's label config XML) is missing", code="label_config")
    try:
        return parse_label_config(xml)
    except ConfigError as exc:
        raise ClientError(
            f"label config cannot be served: {exc.message}", exc.status, code="label_config"
        ) from None


def _check_basic_auth(settings: Settings) -> None:
    """Raises a 401 :class:`ClientError` unless the request carries the configured basic auth."""
    if not settings.basic_auth_user or request.path in OPEN_PATHS:
        return
    header = request.headers.get("Authorization", "")
    user = password = ""
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):  # non-ASCII base64 is a plain ValueError
            pass
    ok = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
    ok &= hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
    if not ok:
        reason = "no Authorization header" if not header else "wrong user or password"
        raise ClientError(f"authentication required (HTTP basic auth): {reason}", 401, code="auth")


def create_app(settings: Settings | None = None, holder: ModelHolder | None = None) -> Flask:
    """Build the backend app; the model starts loading in the background."""
    settings = settings or get_settings()
    setup_logging(settings.log_level)
    holder = holder or ModelHolder(settings)
    fetcher = ImageFetcher(settings)
    metrics = Metrics()
    metrics.attach_engine(holder.engine_if_loaded, lambda: holder.version)
    metrics.attach_queue(lambda: queue_figures(settings))
    app = Flask(__name__)
    # One byte over the limit reaches json_body's reader, which refuses it (a chunked body too).
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_mb * 2**20) + 1
    app.extensions["roi"] = {"settings": settings, "holder": holder, "fetcher": fetcher, "metrics": metrics}
    log.info("backend starting", extra={"settings": settings.redacted()})
    holder.start()

    @app.before_request
    def _before() -> None:
        g.started = time.perf_counter()
        _check_basic_auth(settings)

    @app.after_request
    def _after(resp: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        method = bounded_label(request.method, METHODS)
        metrics.requests.labels(endpoint, method, str(resp.status_code)).inc()
        metrics.latency.labels(endpoint).observe(elapsed)
        log.info(
            "request",
            extra={
                "method": request.method[:20],
                "path": request.path[:200],
                "status": resp.status_code,
                "ms": round(elapsed * 1000, 1),
            },
        )
        return resp

    # ------------------------------------------------------------------ errors
    # Every refusal, whatever raised it (a view, the auth check, the model holder, werkzeug's
    # routing or size limit), ends here: one WARNING line with the reason, one count, one body.
    @app.errorhandler(ClientError)
    def _refused(exc: ClientError):
        if isinstance(exc, ImageError) and not any(exc is e for e in g.get("counted", ())):
            metrics.images.labels(str(exc.status)).inc()
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.refusals.labels(endpoint, exc.code).inc()
        log.warning(
            "refused",
            extra={
                "path": request.path[:200],
                "method": request.method[:20],
                "status": exc.status,
                "reason": exc.message,
                "code": exc.code,
                "error": type(exc).__name__,
                "project": g.get("project"),
                "task": exc.task,
                "region": exc.region,
            },
        )
        resp, status = error_response(exc.status, exc.message)
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
        return resp, status

    def _skipped(skip: Skip) -> None:
        """Log and count a box or task left out of a /predict answer."""
        if skip.region is None:
            metrics.skipped_tasks.labels(skip.code).inc()
        else:
            metrics.skipped_regions.labels(skip.code).inc()
        if isinstance(skip.error, ImageError):
            metrics.images.labels(str(skip.error.status)).inc()
            g.setdefault("counted", []).append(skip.error)
        log.warning(
            "task skipped" if skip.region is None else "region skipped",
            extra={
                "project": g.get("project"),
                "task": skip.task,
                "region": skip.region,
                "reason": skip.reason,
                "code": skip.code,
            },
        )

    @app.errorhandler(ModelUnavailable)
    def _unavailable(exc: ModelUnavailable):
        return _refused(ClientError(str(exc), 503, code="model_unavailable"))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        detail = exc.description or exc.name
        if exc.code == 413:
            detail = f"request body is larger than the {settings.max_body_mb} MiB limit (MAX_BODY_MB)"
        elif exc.code == 404:
            detail = f"no endpoint {request.path[:200]!r} on this ML backend"
        elif exc.code == 405:
            detail = f"{request.method[:20]} is not allowed on {request.path[:200]}"
        return _refused(ClientError(detail, exc.code or 500, code="http"))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error", extra={"error_id": error_id, "path": request.path})
        return error_response(
            500, f"internal error ({type(exc).__name__}); see the server log, error id {error_id}"
        )

    # ------------------------------------------------------------------ endpoints
    @app.get("/")
    @app.get("/health")
    def health():
        body = {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model_version": holder.version,
            "loaded": holder.loaded,
        }
        if holder.error and not holder.loaded:
            return jsonify({**body, "status": "DOWN", "detail": holder.error}), 503
        return jsonify(body)

    @app.post("/setup")
    def setup():
        payload = json_body(settings)
        g.project = project_of(payload)
        config = config_from(payload, "schema")
        mapping = config.summary()
        for warning in config.warnings:
            log.warning("label config warning", extra={"project": g.project, "reason": warning})
        log.info("setup", extra={"project": g.project, "serves": mapping, "warnings": len(config.warnings)})
        return jsonify(
            {"model_version": holder.version, "mapping": mapping, "warnings": list(config.warnings)}
        )

    @app.post("/predict")
    def predict():
        payload = json_body(settings)
        g.project = project_of(payload)
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ClientError("'tasks' must be a non-empty list of Label Studio tasks")
        config = config_from(payload, "label_config")
        params = payload.get("params") or {}
        if not isinstance(params, dict):
            raise ClientError("'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise ClientError("'params.context' must be an object or null")
        engine, version = holder.get()
        results, stats = predict_tasks(tasks, config, context, engine, version, fetcher, settings, _skipped)
        remember_predictions(settings, tasks, results)  # what a later annotation is compared with
        metrics.regions.inc(stats.regions)
        metrics.clipped.inc(stats.clipped)
        metrics.tasks.labels("interactive" if context else "batch").inc(stats.tasks)
        log.info(
            "predicted",
            extra={
                "project": g.project,
                "tasks": stats.tasks,
                "regions": stats.regions,
                "skipped_tasks": stats.skipped_tasks,
                "skipped_regions": stats.skipped_regions,
                "clipped": stats.clipped,
                "sources": stats.sources,
                "version": version,
            },
        )
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook():
        payload = json_body(settings)
        action = str(payload.get("action") or "none")
        secret = request.headers.get(webhooks.SECRET_HEADER)
        # basic auth, when configured, was checked before this view ran (_check_basic_auth)
        status, body = webhooks.handle_webhook(
            payload, settings, secret, basic_auth=bool(settings.basic_auth_user)
        )
        label = bounded_label(action, webhooks.HANDLERS)
        metrics.webhooks.labels(label, str(status)).inc()
        if status >= 400:  # logged by backend.webhooks with the project, task and annotation
            metrics.refusals.labels("/webhook", str(body.get("code") or "webhook")).inc()
        log.info("webhook", extra={"action": label, "status": status})
        return jsonify(body), status

    @app.post("/preannotate")
    def preannotate_start():
        """Pre-annotate a project as RQ chunk jobs: ``{"project": N, "tasks": [ids] | "view": V |
        "all": true, "chunk": 64}`` -> 202 with the run's status (see backend.preannotate)."""
        payload = json_body(settings)
        body = preannotate.parse_request(payload)
        g.project = body["project"]
        try:
            status = preannotate.start_run(settings, redis_connection(settings, fast=True), **body)
        except LabelStudioError as exc:
            raise ClientError(str(exc), 502, code="label_studio") from None
        except (RedisError, OSError) as exc:
            raise ClientError(f"Redis unreachable: {exc}", 503, code="redis") from None
        return jsonify(status), 202

    @app.get("/preannotate/<run>")
    def preannotate_status(run: str):
        try:
            return jsonify(preannotate.run_status(settings, redis_connection(settings, fast=True), run))
        except KeyError:
            raise ClientError(f"no pre-annotation run {run[:80]!r}", 404, code="preannotate") from None
        except (RedisError, OSError) as exc:
            raise ClientError(f"Redis unreachable: {exc}", 503, code="redis") from None

    @app.get("/versions")
    def versions():
        names = [info.version for info in holder.registry.versions()]
        return jsonify({"versions": names, "current": holder.version})

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return app
