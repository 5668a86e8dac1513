"""All backend/worker settings, parsed once from the environment.

Every setting has a type, a default and a one-line description; a bad value raises
:class:`SettingsError` naming the variable.  ``python -m backend.settings`` prints the table that
the README documents.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from model.config import TRAINABLE_MODULES, check_freeze

REPO_ROOT = Path(__file__).resolve().parent.parent
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # one DNS label
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


TRAIN_TRIGGERS = ("threshold", "manual", "schedule")


MODEL_DTYPES = ("auto", "bf16", "fp16", "fp32")


class SettingsError(ValueError):
    """An environment variable with a value that cannot be used."""


def _setting(default: Any, help: str, env: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class Settings:
    host: str = _setting(
        "127.0.0.1", "address the backend (gunicorn) listens on; 0.0.0.0 or :: for every interface"
    )
    port: int = _setting(9090, "port the backend (gunicorn) listens on")
    web_workers: int = _setting(1, "gunicorn worker processes (each holds its own copy of the model)")
    web_threads: int = _setting(4, "request threads per gunicorn worker (they share its model)")
    model_dir: Path = _setting(REPO_ROOT / "models", "registry root: versions/, current.json")
    default_model: Path = _setting(REPO_ROOT / "model" / "default", "embedded default checkpoint folder")
    data_dir: Path = _setting(REPO_ROOT / "models" / "data", "corrections store (SQLite) and exports")
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis for RQ (password: redis://:pw@host/0)")
    queue_name: str = _setting("roi-train", "RQ queue of fine-tuning jobs")
    key_prefix: str = _setting("roi", "prefix of the backend's own Redis keys")
    label_studio_url: str = _setting(
        "", "Label Studio base URL, for /data/upload and API calls", env="LABEL_STUDIO_URL"
    )
    label_studio_api_key: str = _setting(
        "", "Label Studio API token (legacy token or PAT)", env="LABEL_STUDIO_API_KEY"
    )
    label_studio_sync_seconds: float = _setting(
        300.0, "after a promotion, how long the worker waits for Label Studio to see the new version, seconds"
    )
    label_studio_predict_tasks: int = _setting(
        20, "after a promotion, tasks Label Studio predicts with the new version so its project can select it"
    )
    local_files_root: str = _setting(
        "", "LOCAL_FILES_DOCUMENT_ROOT for /data/local-files", env="LOCAL_FILES_DOCUMENT_ROOT"
    )
    basic_auth_user: str = _setting("", "HTTP basic auth user (empty: no auth)")
    basic_auth_pass: str = _setting("", "HTTP basic auth password")
    webhook_secret: str = _setting(
        "", "value /webhook requires in the X-Webhook-Secret header (empty: not required)"
    )
    webhook_max_skew_seconds: float = _setting(
        300.0, "a webhook's updated_at may be at most this far in the future, seconds"
    )
    webhook_verify: bool = _setting(
        False, "fetch each webhook's annotation (and task) from Label Studio and store that instead"
    )
    device: str = _setting("auto", "torch device: auto, cpu, cuda, cuda:N")
    model_dtype: str = _setting(
        "auto", "served weights' dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32"
    )
    feature_cache_mb: int = _setting(256, "LRU of image features + prompt-prefix KV, MiB")
    image_cache_mb: int = _setting(64, "LRU of downloaded image bytes, MiB")
    max_regions: int = _setting(64, "most boxes per task")
    max_relation_regions: int = _setting(8, "relations are asked among the first N boxes")
    min_box_px: float = _setting(
        4.0, "a box with a side shorter than this (pixels, inside the image) is skipped, not described"
    )
    max_new_tokens: int = _setting(24, "longest answer, tokens")
    max_body_mb: float = _setting(10.0, "largest request body, MiB")
    max_json_depth: int = _setting(64, "deepest nesting of a request body's JSON arrays/objects")
    max_text_chars: int = _setting(2000, "longest caption, text or region id a webhook may store, characters")
    max_tasks_per_request: int = _setting(1000, "most tasks in one /predict (413 beyond)")
    predict_chunk_tasks: int = _setting(16, "tasks per model call (memory follows this, not the request)")
    max_image_mb: float = _setting(20.0, "largest image download, MiB")
    max_image_pixels: int = _setting(40_000_000, "largest decoded image, pixels (decompression bombs)")
    image_timeout: float = _setting(10.0, "image download timeout, seconds")
    allow_private_urls: bool = _setting(False, "allow image URLs on private/loopback hosts")
    model_poll_seconds: float = _setting(2.0, "how often serving checks the registry for a new version")
    train_trigger: str = _setting(
        "threshold,manual",
        "what starts fine-tuning, comma-separated: threshold, manual, schedule (docs/training.md)",
    )
    train_min_corrections: int = _setting(
        20, "new corrected regions (text the reviewer changed or the model never gave) that start a job"
    )
    train_steps: int = _setting(300, "fine-tuning steps per job")
    train_batch_size: int = _setting(16, "fine-tuning global batch size")
    train_lr: float = _setting(3e-4, "fine-tuning learning rate")
    train_image_token_dropout: str = _setting(
        "parent",
        "share of training prompts whose image tokens are hidden, in [0, 1); 'parent': the share the "
        "parent version was trained with (its train_config.json; 0 without one)",
    )
    train_freeze: str = _setting(
        "region_encoder",
        "modules a job keeps as the parent has them besides the vision tower, comma-separated: "
        "region_encoder, projector, lm; 'none': it trains all three, as stage 2",
    )
    replay_fraction: float = _setting(0.5, "share of each batch drawn from earlier data")
    replay_data: str = _setting(
        "synthetic", "earlier data to replay: 'synthetic' (the default's training set) or a JSONL file"
    )
    train_max_turns: int = _setting(4, "questions per corrected image per training step (one prompt each)")
    train_focus_turns: int = _setting(
        0, "of those, how many at most are questions the parent answers wrong (0: drawn uniformly)"
    )
    train_lift_new_tokens: bool = _setting(
        False, "lift input rows of tokens the parent never trained to the trained rows' mean first"
    )
    heldout_fraction: float = _setting(0.2, "share of corrected images kept out of training for the gate")
    heldout_min_records: int = _setting(10, "below this many corrected images, gate on the new corrections")
    gate_eval_images: int = _setting(100, "base evaluation scenes scored by the promotion gate")
    outbox_poll_seconds: float = _setting(5.0, "how often the worker hands stored training requests to Redis")
    job_heartbeat_seconds: int = _setting(
        10, "a running job's heartbeat and training-lease renewal, seconds; 3x this silent = dead"
    )
    promote_tolerance: float = _setting(0.02, "max accuracy drop on the base set allowed for promotion")
    job_timeout: int = _setting(3600, "RQ job timeout, seconds")
    job_retries: int = _setting(2, "RQ retries of a failed fine-tuning job")
    retrain_cron: str = _setting("", "cron schedule of periodic retraining (e.g. '0 3 * * *'); empty: off")
    retrain_interval: int = _setting(0, "periodic retraining interval in seconds; 0: off")
    preannotate_queue: str = _setting("roi-preannotate", "RQ queue of pre-annotation chunk jobs")
    preannotate_chunk_tasks: int = _setting(
        64, "tasks per pre-annotation job (python -m backend.jobs preannotate)"
    )
    preannotate_on_import: bool = _setting(
        False, "pre-annotate tasks as Label Studio imports them (its TASKS_CREATED webhook)"
    )
    log_level: str = _setting("INFO", "logging level")

    @property
    def train_triggers(self) -> frozenset[str]:
        """The words of ``TRAIN_TRIGGER`` (SettingsError for an unknown one)."""
        words = {w.strip().lower() for w in self.train_trigger.split(",") if w.strip()}
        unknown = sorted(words - set(TRAIN_TRIGGERS))
        if unknown or not words:
            raise SettingsError(
                f"TRAIN_TRIGGER={self.train_trigger!r}: expected a comma-separated list of "
                f"{', '.join(TRAIN_TRIGGERS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        return frozenset(words)

    def image_token_dropout(self, parent: float | None) -> float:
        """The fine-tuning image-token dropout: ``TRAIN_IMAGE_TOKEN_DROPOUT``, or ``parent`` (the
        parent's own share; None: it records none, 0) when that says ``parent``."""
        raw = self.train_image_token_dropout.strip().lower()
        if raw == "parent":
            return parent or 0.0
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0.0 <= value < 1.0:
            raise SettingsError(
                f"TRAIN_IMAGE_TOKEN_DROPOUT must be 'parent' or a number in [0, 1), "
                f"got {self.train_image_token_dropout!r}"
            )
        return value

    @property
    def train_frozen_modules(self) -> list[str]:
        """The modules ``TRAIN_FREEZE`` names (``none``: no module; SettingsError for an unknown
        one, all three, ``none`` beside a module, or no word at all)."""
        words = {w.strip().lower() for w in self.train_freeze.split(",") if w.strip()}
        if words == {"none"}:
            return []
        try:
            if not words or "none" in words:
                raise ValueError("'none' alone or module names are expected")
            return sorted(check_freeze(words))
        except ValueError as exc:
            raise SettingsError(
                f"TRAIN_FREEZE={self.train_freeze!r}: {exc} (comma-separated, some of "
                f"{', '.join(TRAINABLE_MODULES)}; or 'none')"
            ) from None

    @staticmethod
    def env_name(f) -> str:
        return f.metadata.get("env") or f.name.upper()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = cls.env_name(f)
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, raw, type(f.default))
        settings = cls(**values)
        if (settings.basic_auth_user == "") != (settings.basic_auth_pass == ""):
            raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if not 0.0 <= settings.heldout_fraction < 1.0:
            raise SettingsError(f"HELDOUT_FRACTION must be in [0, 1), got {settings.heldout_fraction}")
        if not (math.isfinite(settings.min_box_px) and settings.min_box_px >= 0):
            raise SettingsError(f"MIN_BOX_PX must be a number >= 0, got {settings.min_box_px}")
        if not 0 <= settings.train_focus_turns <= settings.train_max_turns:
            raise SettingsError(
                f"TRAIN_FOCUS_TURNS must be in [0, TRAIN_MAX_TURNS={settings.train_max_turns}], "
                f"got {settings.train_focus_turns}"
            )
        settings.image_token_dropout(None)  # validates TRAIN_IMAGE_TOKEN_DROPOUT
        _ = settings.train_frozen_modules  # validates TRAIN_FREEZE
        if not 0.0 <= settings.replay_fraction < 1.0:
            raise SettingsError(f"REPLAY_FRACTION must be in [0, 1), got {settings.replay_fraction}")
        if settings.label_studio_url and not settings.label_studio_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"LABEL_STUDIO_URL must start with http:// or https://, got {settings.label_studio_url!r}"
            )
        if settings.webhook_verify and not (settings.label_studio_url and settings.label_studio_api_key):
            raise SettingsError("WEBHOOK_VERIFY needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        scheduled = bool(settings.retrain_cron or settings.retrain_interval)
        if "schedule" in settings.train_triggers and not scheduled:
            raise SettingsError("TRAIN_TRIGGER includes schedule: set RETRAIN_CRON or RETRAIN_INTERVAL")
        if scheduled and "schedule" not in settings.train_triggers:
            raise SettingsError(
                f"RETRAIN_CRON/RETRAIN_INTERVAL is set but TRAIN_TRIGGER={settings.train_trigger!r} does not "
                "include schedule: add it (e.g. TRAIN_TRIGGER=threshold,manual,schedule) or unset them"
            )
        if settings.model_dtype not in MODEL_DTYPES:  # model.device.DTYPES, without importing torch here
            raise SettingsError(
                f"MODEL_DTYPE must be one of {', '.join(MODEL_DTYPES)}, got {settings.model_dtype!r}"
            )
        if not 1 <= settings.port <= 65535:
            raise SettingsError(f"PORT must be between 1 and 65535, got {settings.port}")
        if not _is_host(settings.host):
            raise SettingsError(f"HOST must be an IP address or a host name, got {settings.host!r}")
        for name in ("web_workers", "web_threads", "label_studio_predict_tasks"):
            if getattr(settings, name) < 1:
                raise SettingsError(f"{name.upper()} must be at least 1, got {getattr(settings, name)}")
        for name in ("max_json_depth", "max_text_chars", "max_tasks_per_request", "predict_chunk_tasks",
                     "job_heartbeat_seconds", "preannotate_chunk_tasks"):  # fmt: skip
            if getattr(settings, name) < 1:
                raise SettingsError(f"{name.upper()} must be at least 1, got {getattr(settings, name)}")
        return settings

    def redacted(self) -> dict[str, Any]:
        """Settings for logs: secrets masked (API key, auth password, webhook secret, the Redis URL's
        password)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("label_studio_api_key", "basic_auth_pass", "webhook_secret") and value:
                value = "***"
            elif f.name == "redis_url":
                value = redact_url(value)
            out[f.name] = str(value)
        return out


def _is_host(value: str) -> bool:
    """An IPv4/IPv6 address or a DNS host name (what gunicorn can bind)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(value))


def bind_address(settings: Settings) -> str:
    """``HOST:PORT`` as gunicorn's ``bind`` takes it (an IPv6 address in brackets)."""
    host = settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{settings.port}"


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is int:
            value: Any = int(raw)
        elif kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("must be a finite number")
        elif issubclass(kind, Path):
            return Path(raw).expanduser()
        else:
            return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    if value < 0:
        raise SettingsError(f"{name}={raw!r}: must not be negative")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (parsed once)."""
    return Settings.from_env()


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = f.default
        if isinstance(default, Path):
            try:
                default = default.relative_to(REPO_ROOT)
            except ValueError:
                pass
        rows.append(f"| `{Settings.env_name(f)}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def env_example() -> str:
    """``.env.example``: every variable with its meaning, commented out at its default, plus the
    variables only docker-compose reads."""
    lines = [
        "# Settings of the backend, worker and scheduler (python -m backend.settings --env-example).",
        "# Uncomment to change a default.  Paths are inside the containers under docker-compose.",
        "",
        "# docker-compose only: Label Studio's admin login (its API token is LABEL_STUDIO_API_KEY).",
        "LABEL_STUDIO_USERNAME=admin@example.com",
        "LABEL_STUDIO_PASSWORD=change-me-please",
        "",
    ]
    required = {"LABEL_STUDIO_API_KEY": "change-me-to-a-40-character-token-0000000000"}
    for f in fields(Settings):
        name = Settings.env_name(f)
        lines.append(f"# {f.metadata['help']}")
        if name in required:
            lines.append(f"{name}={required[name]}")
            continue
        default = f.default
        if isinstance(default, Path):
            default = default.relative_to(REPO_ROOT) if default.is_relative_to(REPO_ROOT) else default
        lines.append(f"# {name}={str(default).lower() if isinstance(default, bool) else default}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(env_example() if "--env-example" in sys.argv[1:] else markdown_table() + "\n", end="")
