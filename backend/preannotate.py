"""Pre-annotate a whole Label Studio project as RQ jobs (issue 18).

Label Studio's own *Retrieve predictions* sends every selected task to ``/predict`` in one request
bounded by its 100 s timeout, with no progress, no resumption and one machine.  Here:

* :func:`start_run` pages through the project's tasks with the Label Studio API (all of them, a
  Data Manager view, or given ids), splits them into chunks of ``PREANNOTATE_CHUNK_TASKS`` and
  enqueues one RQ job per chunk on ``PREANNOTATE_QUEUE`` (``preannotate-<run>-<chunk>``).
* :func:`run_chunk` (the job) reads its tasks from Label Studio (with their annotations and
  predictions: where the boxes come from, as in a batch ``/predict``), skips every task that already
  has a prediction of the model version it serves, predicts the rest with the code ``/predict``
  runs (:func:`backend.predictions.predict_tasks`: image fetching with the SSRF checks of
  :mod:`backend.images`, batches of ``PREDICT_CHUNK_TASKS``) and writes each batch's predictions in
  one call (``POST /api/projects/<id>/import/predictions``), tagged with that ``model_version``.
  Never an empty result: a task without a usable box or image is a *failure*, recorded with its
  reason, and the chunk goes on.
* Idempotent: a retried chunk (its worker was killed; RQ retries it as abandoned, see
  :class:`backend.worker.PreannotateWorker`) reads its tasks again, so what the killed attempt
  wrote is seen and skipped.  Each task is claimed in Redis by the job that predicts it (for
  ``JOB_TIMEOUT``; released at once for a task that failed), so two runs over the same tasks do
  not both write.
* Progress: per run in Redis (sets of done tasks, failures with reasons, regions, timings), per
  chunk in ``job.meta``; :func:`run_status` adds tasks/s, regions/s and the ETA.  The CLI
  (``python -m backend.jobs preannotate``) follows it with a tqdm bar; ``python -m backend.jobs
  status <project>`` shows the project's latest run.

Workers: ``python -m backend.worker --preannotate`` runs a :class:`backend.worker.PreannotateWorker`
(no fork: the model is loaded once per worker process and kept).  More machines means more such
workers on the same Redis, and nothing else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.job import Job, JobStatus

from backend.errors import ClientError
from backend.images import ImageFetcher
from backend.label_config import ConfigError, parse_label_config
from backend.label_studio import LabelStudioApi, LabelStudioError
from backend.predicted import remember_predictions
from backend.predictions import Skip, predict_tasks
from backend.serving import ModelHolder
from backend.settings import Settings, get_settings

__all__ = [
    "CHUNK_FUNCTION",
    "ChunkResult",
    "Selection",
    "follow_run",
    "latest_run",
    "parse_request",
    "list_task_ids",
    "preannotate_queue",
    "run_chunk",
    "run_status",
    "start_run",
]

log = logging.getLogger(__name__)

CHUNK_FUNCTION = "backend.preannotate.run_chunk"
LIST_PAGE = 500  # task ids read per Label Studio page while planning
MAX_RUN_CHUNKS = 2000  # chunk jobs per run: more tasks make the chunks larger
WRITE_TIMEOUT = 120.0  # seconds for one bulk write of predictions
RESULT_TTL = 7 * 86_400  # runs, chunk results and meta are kept a week, as fine-tuning jobs' are
TERMINAL = {
    JobStatus.FINISHED.value,
    JobStatus.FAILED.value,
    JobStatus.STOPPED.value,
    JobStatus.CANCELED.value,
}


@dataclass(frozen=True)
class Selection:
    """Which tasks of a project: ``tasks`` (ids), else a Data Manager ``view``, else all."""

    tasks: tuple[int, ...] = ()
    view: int | None = None

    def describe(self) -> str:
        if self.tasks:
            return f"{len(self.tasks)} given tasks"
        return f"view {self.view}" if self.view is not None else "all tasks"


@dataclass
class ChunkResult:
    """What one chunk job did (its return value)."""

    run: str
    tasks: int = 0
    predicted: int = 0
    existing: int = 0  # already had a prediction of this version
    claimed_elsewhere: int = 0  # being predicted by another job right now
    failed: int = 0
    regions: int = 0
    version: str = ""
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "predict": 0.0, "write": 0.0})


def preannotate_queue(settings: Settings, connection: Redis) -> Queue:
    return Queue(settings.preannotate_queue, connection=connection)


def _key(settings: Settings, run: str, part: str = "") -> str:
    return f"{settings.key_prefix}:preannotate:{run}" + (f":{part}" if part else "")


def _latest_key(settings: Settings, project: int) -> str:
    return f"{settings.key_prefix}:preannotate-latest:{project}"


def _claim_key(settings: Settings, project: int, version: str, task: int) -> str:
    return f"{settings.key_prefix}:preannotate-claim:{project}:{version}:{task}"


def _api(settings: Settings) -> LabelStudioApi:
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise LabelStudioError("pre-annotation needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    return LabelStudioApi(settings)


# ---------------------------------------------------------------------- Label Studio reads and writes
def _page_tasks(page: Any) -> list[Mapping[str, Any]]:
    tasks = page.get("tasks", []) if isinstance(page, Mapping) else page or []
    return [t for t in tasks if isinstance(t, Mapping) and isinstance(t.get("id"), int)]


def list_task_ids(settings: Settings, project: int, selection: Selection) -> list[int]:
    """The selected task ids of ``project``, in Label Studio's order (pages of ``LIST_PAGE``)."""
    api = _api(settings)
    ids: list[int] = []
    page = 1
    view = f"&view={selection.view}" if selection.view is not None else ""
    while True:
        body = api.call(
            "GET", f"tasks?project={project}{view}&fields=task_only&page_size={LIST_PAGE}&page={page}",
            timeout=60,
        )  # fmt: skip
        rows = _page_tasks(body)
        ids += [int(t["id"]) for t in rows]
        total = body.get("total") if isinstance(body, Mapping) else None
        if not rows or len(rows) < LIST_PAGE or (isinstance(total, int) and len(ids) >= total):
            break
        page += 1
    if selection.tasks:
        wanted = set(selection.tasks)
        ids = [i for i in ids if i in wanted]
    return list(dict.fromkeys(ids))


def _fetch_tasks(api: LabelStudioApi, project: int, ids: Sequence[int]) -> list[dict[str, Any]]:
    """The tasks with their annotations, drafts and predictions (one Data Manager call)."""
    query = json.dumps({"selectedItems": {"all": False, "included": list(ids)}}, separators=(",", ":"))
    body = api.call(
        "GET", f"tasks?project={project}&fields=all&page_size={len(ids)}&page=1&query={quote(query)}",
        timeout=60,
    )  # fmt: skip
    wanted = set(ids)
    return [dict(t) for t in _page_tasks(body) if t["id"] in wanted]


def _has_version(task: Mapping[str, Any], version: str) -> bool:
    predictions = task.get("predictions") or []
    return any(isinstance(p, Mapping) and p.get("model_version") == version for p in predictions)


def _write(api: LabelStudioApi, project: int, rows: list[dict[str, Any]]) -> None:
    """One bulk write; Label Studio stores all of them or none."""
    api.call("POST", f"projects/{project}/import/predictions", json=rows, timeout=WRITE_TIMEOUT)


# ---------------------------------------------------------------------- planning
def start_run(
    settings: Settings,
    connection: Redis,
    project: int,
    selection: Selection,
    chunk: int | None = None,
    task_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Enqueue one chunk job per ``chunk`` selected tasks; returns the run's status.

    ``task_ids``: the tasks, already known (the TASKS_CREATED webhook); else they are listed from
    Label Studio.  Raises :class:`LabelStudioError` or ``RedisError``."""
    chunk = chunk or settings.preannotate_chunk_tasks
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    ids = (
        list(dict.fromkeys(task_ids)) if task_ids is not None else list_task_ids(settings, project, selection)
    )
    if len(ids) > chunk * MAX_RUN_CHUNKS:  # chunk 1 over a million ids: a million enqueues
        wanted, chunk = chunk, -(-len(ids) // MAX_RUN_CHUNKS)
        log.info(
            "pre-annotation chunk raised",
            extra={"project": project, "tasks": len(ids), "asked": wanted, "chunk": chunk},
        )
    run = f"{project}-{uuid.uuid4().hex[:8]}"
    chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    job_ids = [f"preannotate-{run}-{k:05d}" for k in range(len(chunks))]
    key = _key(settings, run)
    with connection.pipeline() as pipe:
        pipe.hset(key, mapping={
            "run": run, "project": project, "total": len(ids), "chunk": chunk, "chunks": len(chunks),
            "selection": selection.describe(), "started": time.time(), "jobs": json.dumps(job_ids),
        })  # fmt: skip
        pipe.expire(key, RESULT_TTL)
        pipe.set(_latest_key(settings, project), run, ex=RESULT_TTL)
        pipe.execute()
    queue = preannotate_queue(settings, connection)
    for k, (jid, tasks) in enumerate(zip(job_ids, chunks)):
        queue.enqueue(
            CHUNK_FUNCTION,
            kwargs={"run": run, "project": project, "task_ids": tasks},
            job_id=jid,
            job_timeout=settings.job_timeout,
            retry=Retry(max=settings.job_retries) if settings.job_retries else None,
            result_ttl=RESULT_TTL,
            failure_ttl=RESULT_TTL,
            description=f"pre-annotate project {project}: chunk {k + 1}/{len(chunks)} of run {run}",
            meta={"run": run, "project": project, "chunk": k, "tasks": len(tasks), "phase": "queued"},
        )
    log.info("pre-annotation enqueued", extra={"run": run, "project": project, "tasks": len(ids),
                                                "jobs": len(job_ids)})  # fmt: skip
    return run_status(settings, connection, run)


# ---------------------------------------------------------------------- the chunk job
_holders: dict[tuple[str, str], ModelHolder] = {}
_holder_lock = threading.Lock()


def _engine(settings: Settings):
    """The process's model for ``MODEL_DIR`` (loaded once; follows registry promotions like a
    serving process)."""
    key = (str(settings.model_dir), str(settings.default_model))
    with _holder_lock:
        holder = _holders.get(key)
        if holder is None:
            holder = _holders[key] = ModelHolder(settings)
    return holder.get()


def _claim(connection: Redis, settings: Settings, project: int, version: str, tasks: list[int], owner: str):
    """Tasks this job may predict: unclaimed ones or its own (a retry of the same job)."""
    mine = []
    for task in tasks:
        key = _claim_key(settings, project, version, task)
        if (
            connection.set(key, owner, nx=True, ex=settings.job_timeout)
            or connection.get(key) == owner.encode()
        ):
            mine.append(task)
    return mine


def _record(connection: Redis, settings: Settings, run: str, done: dict[int, int], existing: Iterable[int],
            failures: Mapping[int, str], elsewhere: Iterable[int] = ()) -> None:  # fmt: skip
    """Add to the run's sets; counted once per task whatever the retries (SADD is the gate).
    ``elsewhere``: tasks another job held a claim on."""
    key = _key(settings, run)
    now = time.time()
    for task, regions in done.items():
        if connection.sadd(_key(settings, run, "predicted"), task):
            connection.hincrby(key, "regions", regions)
    with connection.pipeline() as pipe:
        existing = list(existing)
        if existing:
            pipe.sadd(_key(settings, run, "existing"), *existing)
        elsewhere = list(elsewhere)
        if elsewhere:
            pipe.sadd(_key(settings, run, "elsewhere"), *elsewhere)
        if done or existing:
            pipe.hdel(_key(settings, run, "failed"), *[*done, *existing])
        if failures:
            pipe.hset(_key(settings, run, "failed"), mapping={str(t): r[:500] for t, r in failures.items()})
        pipe.hsetnx(key, "first_at", now)
        pipe.hset(key, "updated_at", now)
        for part in ("predicted", "existing", "failed", "elsewhere"):
            pipe.expire(_key(settings, run, part), RESULT_TTL)
        pipe.execute()


def _save_meta(job: Job | None, **meta: Any) -> None:
    if job is None:
        return
    job.meta.update(meta)
    job.save_meta()


def run_chunk(run: str, project: int, task_ids: list[int]) -> dict[str, Any]:
    """The chunk job (see the module docstring); returns a :class:`ChunkResult` as a dict."""
    settings = get_settings()
    job = get_current_job()
    connection = job.connection if job is not None else Redis.from_url(settings.redis_url)
    started = time.monotonic()
    engine, version = _engine(settings)
    result = ChunkResult(run=run, tasks=len(task_ids), version=version)
    api = _api(settings)
    project_body = api.call("GET", f"projects/{project}")
    try:
        config = parse_label_config((project_body or {}).get("label_config") or "")
    except ConfigError as exc:
        raise LabelStudioError(f"project {project}: label config cannot be served: {exc.message}") from None
    fetcher = ImageFetcher(settings)
    owner = job.id if job is not None else f"local-{uuid.uuid4().hex[:8]}"
    step = settings.predict_chunk_tasks
    for start in range(0, len(task_ids), step):
        batch_ids = task_ids[start : start + step]
        clock = time.perf_counter()
        tasks = _fetch_tasks(api, project, batch_ids)
        result.seconds["read"] += time.perf_counter() - clock
        found = {t["id"] for t in tasks}
        failures: dict[int, str] = {t: "task not found in Label Studio" for t in batch_ids if t not in found}
        existing = [t["id"] for t in tasks if _has_version(t, version)]
        fresh = [t["id"] for t in tasks if t["id"] not in existing]
        todo_ids = _claim(connection, settings, project, version, fresh, owner)
        elsewhere = [t for t in fresh if t not in set(todo_ids)]
        result.claimed_elsewhere += len(elsewhere)
        todo = [t for t in tasks if t["id"] in set(todo_ids)]
        for task in todo:
            task.setdefault("project", project)
        done = _predict_and_write(
            api, settings, project, todo, config, engine, version, fetcher, failures, result.seconds
        )
        _record(connection, settings, run, done, existing, failures, elsewhere)
        retry = [t for t in todo_ids if t in failures]  # a later run may try these again at once; a
        if retry:  # written task keeps its claim, so a run that read it before the write skips it
            connection.delete(*[_claim_key(settings, project, version, t) for t in retry])
        result.predicted += len(done)
        result.regions += sum(done.values())
        result.existing += len(existing)
        result.failed += len(failures)
        result.failures.update({str(t): r for t, r in failures.items()})
        elapsed = max(time.monotonic() - started, 1e-6)
        finished = start + len(batch_ids)
        _save_meta(
            job, phase="predict", done=finished, total=len(task_ids), predicted=result.predicted,
            existing=result.existing, failed=result.failed, regions=result.regions, version=version,
            regions_per_s=round(result.regions / elapsed, 2),
            eta_s=round(elapsed / finished * (len(task_ids) - finished), 1),
            seconds={k: round(v, 3) for k, v in result.seconds.items()},
        )  # fmt: skip
    _save_meta(job, phase="done")
    log.info("pre-annotation chunk done", extra={k: v for k, v in vars(result).items() if k != "failures"})
    return vars(result)


def _predict_and_write(
    api: LabelStudioApi,
    settings: Settings,
    project: int,
    tasks: list[dict[str, Any]],
    config,
    engine,
    version: str,
    fetcher: ImageFetcher,
    failures: dict[int, str],
    seconds: dict[str, float],
) -> dict[int, int]:
    """Predict ``tasks`` and write their predictions; returns ``{task: regions}`` written.  A task
    that cannot be predicted goes to ``failures``; an unexpected error in a batch is isolated by
    predicting its tasks one by one.  ``seconds``: predicting (images fetched included) and writing
    are added to its ``predict`` and ``write``."""
    if not tasks:
        return {}
    skips: list[Skip] = []
    clock = time.perf_counter()
    try:
        answers, _ = predict_tasks(tasks, config, None, engine, version, fetcher, settings, skips.append)
    except ClientError:  # no task got a prediction: every one is in ``skips``
        answers = [[] for _ in tasks]
    except Exception as exc:  # noqa: BLE001 - one bad task must not cost its neighbours
        if len(tasks) == 1:
            failures[tasks[0]["id"]] = f"{type(exc).__name__}: {exc}"
            log.exception("pre-annotation of task %s failed", tasks[0]["id"])
            return {}
        done: dict[int, int] = {}
        for task in tasks:
            done |= _predict_and_write(
                api, settings, project, [task], config, engine, version, fetcher, failures, seconds
            )
        return done
    seconds["predict"] += time.perf_counter() - clock
    for skip in skips:
        if skip.region is None and isinstance(skip.task, int):
            failures[skip.task] = f"{skip.code}: {skip.reason}"
    rows: list[dict[str, Any]] = []
    regions: dict[int, int] = {}
    for task, answer in zip(tasks, answers):
        if isinstance(answer, Mapping) and answer.get("result"):  # never an empty prediction
            rows.append({"task": task["id"], **answer, "model_version": version})
            regions[task["id"]] = len({r.get("id") for r in answer["result"] if r.get("type") != "relation"})
        else:
            failures.setdefault(task["id"], "no prediction (no usable box or image)")
    if rows:
        clock = time.perf_counter()
        _write(api, project, rows)
        remember_predictions(settings, tasks, answers)  # what a later annotation is compared with
        seconds["write"] += time.perf_counter() - clock
    return regions


# ---------------------------------------------------------------------- progress
def latest_run(settings: Settings, connection: Redis, project: int) -> str | None:
    run = connection.get(_latest_key(settings, project))
    return run.decode() if run else None


def run_status(settings: Settings, connection: Redis, run: str) -> dict[str, Any]:
    """A run's progress: tasks done/total, failures (with reasons), regions, rates, ETA, jobs."""
    raw = {k.decode(): v.decode() for k, v in connection.hgetall(_key(settings, run)).items()}
    if not raw:
        raise KeyError(f"no pre-annotation run {run!r}")
    total = int(raw["total"])
    predicted = connection.scard(_key(settings, run, "predicted"))
    existing = connection.scard(_key(settings, run, "existing"))
    elsewhere = connection.scard(_key(settings, run, "elsewhere"))
    failed = {k.decode(): v.decode() for k, v in connection.hgetall(_key(settings, run, "failed")).items()}
    regions = int(raw.get("regions", 0))
    job_ids = json.loads(raw["jobs"])
    jobs: dict[str, int] = {}
    for job in Job.fetch_many(job_ids, connection=connection):
        status = job.get_status(refresh=False).value if job is not None else "missing"
        jobs[status] = jobs.get(status, 0) + 1
    done = predicted + existing
    first = float(raw.get("first_at") or 0) or None
    last = float(raw.get("updated_at") or 0) or None
    finished = all(s in TERMINAL or s == "missing" for s in jobs) if jobs else True
    span = (last if finished else time.time()) - float(raw["started"])
    tasks_per_s = done / span if span > 0 and done else 0.0
    remaining = max(total - done - len(failed) - elsewhere, 0)
    return {
        "run": run, "project": int(raw["project"]), "selection": raw.get("selection"), "total": total,
        "chunk": int(raw.get("chunk", 0)), "done": done, "predicted": predicted, "existing": existing,
        "failed": len(failed),
        "claimed_elsewhere": elsewhere,
        "failures": dict(sorted(failed.items())[:50]), "regions": regions,
        "tasks_per_s": round(tasks_per_s, 2),
        "regions_per_s": round(regions / span, 2) if span > 0 else 0.0,
        "eta_s": 0.0 if finished else (round(remaining / tasks_per_s, 1) if tasks_per_s else None),
        "elapsed_s": round(span, 2),
        "first_write_s": round(first - float(raw["started"]), 2) if first else None,
        "jobs": jobs, "finished": finished,
    }  # fmt: skip


def follow_run(
    settings: Settings,
    connection: Redis,
    run: str,
    poll: float = 1.0,
    bar: bool = True,
    before_poll: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Wait for a run to finish, showing a tqdm bar (tasks done or failed of the total).
    ``before_poll``: called before each look (the CLI retries dead workers' chunks there)."""
    from tqdm import tqdm

    status = run_status(settings, connection, run)
    progress = tqdm(total=status["total"], unit="task", disable=not bar, desc=f"pre-annotate {run}")
    try:
        while True:
            if before_poll is not None:
                before_poll()
            status = run_status(settings, connection, run)
            progress.n = min(status["done"] + status["failed"], status["total"])
            progress.set_postfix(regions_s=status["regions_per_s"], failed=status["failed"], refresh=False)
            progress.refresh()
            if status["finished"]:
                return status
            time.sleep(poll)
    finally:
        progress.close()


def parse_request(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /preannotate`` body -> :func:`start_run` keyword arguments (400 when malformed)."""

    def integer(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ClientError(f"'{what}' must be a positive integer, got {value!r:.80}", code="preannotate")
        return value

    project = integer(payload.get("project"), "project")
    tasks = payload.get("tasks")
    view = payload.get("view")
    if tasks is not None and view is not None:
        raise ClientError("give 'tasks' or 'view', not both", code="preannotate")
    ids: tuple[int, ...] = ()
    if tasks is not None:
        if not isinstance(tasks, list) or not tasks:
            raise ClientError("'tasks' must be a non-empty list of task ids", code="preannotate")
        ids = tuple(integer(t, "tasks[]") for t in tasks)
    chunk = payload.get("chunk")
    return {
        "project": project,
        "selection": Selection(ids, integer(view, "view") if view is not None else None),
        "chunk": integer(chunk, "chunk") if chunk is not None else None,
        "task_ids": ids or None,
    }
