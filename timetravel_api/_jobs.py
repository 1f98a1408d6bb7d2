"""Training-set jobs of the query service (``POST /v1/training-sets``), with state in the store.

A job's state is one mutable JSON object, ``jobs/training-sets/<id>.json``, rewritten with
``Store.put`` as the job moves ``queued → running → done | failed``; any server on the same store
can answer ``GET /v1/training-sets/{id}`` from it, including after a restart.

Restart rule: a job a server left ``queued`` or ``running`` (it stopped or crashed mid-build) is
*re-queued* by the next server that starts on the store. A build is deterministic and its output
is written create-if-absent in one piece, so running it again is safe; if the output object is
already there (the server died between writing it and recording ``done``), the job is marked
``done`` without building again. With several servers on one store, every one of them recovers
unfinished jobs at start: run one job-serving instance per store.

A graceful stop (SIGTERM) cancels running builds at their next progress step and leaves them
``queued`` for the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ttstore import (
    Clock,
    InvalidInput,
    ObjectNotFound,
    Store,
    TimetravelError,
    format_timestamp,
    key,
)

from ._codec import parse_feature_names, parse_knowledge
from ._errors import TimetravelApiError

log = logging.getLogger(__name__)

JOBS_PREFIX = "jobs/training-sets"
STATES = ("queued", "running", "done", "failed")
_PROGRESS_WRITE_S = 0.5

#: ``build(labels, features, knowledge, progress) -> table`` builds one training set;
#: ``progress(fraction)`` may be called with 0.0-1.0 as the build advances.
BuildFn = Callable[[pa.Table, list[str], str, Callable[[float], None]], pa.Table]


class TooManyJobs(TimetravelApiError):
    """The server already runs ``--max-jobs`` training-set jobs (429)."""

    code = "too_many_jobs"
    http_status = 429


class JobsDisabled(TimetravelApiError):
    """This server was started with ``--no-jobs`` (503): send the job to the job server."""

    code = "jobs_disabled"
    http_status = 503


class JobNotFound(TimetravelApiError):
    """No training-set job with that id (404)."""

    code = "job_not_found"
    http_status = 404


class OutputExists(TimetravelApiError, InvalidInput):
    """The job's ``out`` key already holds an object; outputs are never overwritten (400)."""

    code = "output_exists"
    http_status = 400


class _Cancelled(Exception):
    """The server is stopping: abandon the build (the job stays queued)."""


@dataclass(frozen=True, kw_only=True)
class JobRequest:
    """A checked ``POST /v1/training-sets`` body."""

    labels: str
    features: list[str]
    knowledge: str
    out: str

    @classmethod
    def from_json(cls, body: Any) -> JobRequest:
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object with labels, features and out",
                               field="body")
        unknown = sorted(set(body) - {"labels", "features", "knowledge", "out"})
        if unknown:
            raise InvalidInput(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
        keys = {}
        for name in ("labels", "out"):
            v = body.get(name)
            if not isinstance(v, str) or not v:
                raise InvalidInput(f"{name}: required, a key (path) in the store", field=name)
            try:
                keys[name] = key(v)
            except InvalidInput as exc:
                raise InvalidInput(f"{name}: {exc.message}", field=name) from None
        if "features" not in body:
            raise InvalidInput("features: required", field="features")
        return cls(labels=keys["labels"], out=keys["out"],
                   features=parse_feature_names(body["features"]),
                   knowledge=parse_knowledge(body.get("knowledge", "as_known")))


def job_key(job_id: str) -> str:
    return key(JOBS_PREFIX, f"{job_id}.json")


class JobManager:
    """Runs training-set jobs on a background thread pool; their state lives in the store.

    Args:
        store: where labels are read, outputs written, and job state kept.
        build: builds one training set (see :data:`BuildFn`).
        clock: stamps ``created_at``/``started_at``/``finished_at``.
        max_jobs: how many jobs may be queued or running at once in this server; one more is
            refused with :class:`TooManyJobs` (429).
        check: validates a request before it is accepted (e.g. parses the feature names), so a
            bad request is a 400 rather than a failed job.
    """

    def __init__(self, *, store: Store, build: BuildFn, clock: Clock, max_jobs: int,
                 check: Callable[[JobRequest], None] | None = None) -> None:
        if max_jobs <= 0:
            raise ValueError("max_jobs must be positive")
        self.store = store
        self.build = build
        self.clock = clock
        self.max_jobs = max_jobs
        self.check = check
        self._pool = ThreadPoolExecutor(max_workers=max_jobs,
                                        thread_name_prefix="training-set")
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._stopping = threading.Event()

    # -- state -----------------------------------------------------------------------------------
    def status(self, job_id: str) -> dict[str, Any]:
        """The job's state document (``id``, ``state``, ``progress``, ``out``, ``error``, ...).

        Raises:
            JobNotFound: no such job.
        """
        try:
            k = job_key(job_id)
        except InvalidInput:
            raise JobNotFound(f"no training-set job {job_id!r}") from None
        try:
            doc: dict[str, Any] = json.loads(self.store.get(k))
        except ObjectNotFound:
            raise JobNotFound(f"no training-set job {job_id!r}") from None
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        self.store.put(job_key(doc["id"]), json.dumps(doc, sort_keys=True).encode())

    def _update(self, doc: dict[str, Any], **changes: Any) -> None:
        doc.update(changes)
        self._write(doc)

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, req: JobRequest) -> dict[str, Any]:
        """Record a new job ``queued`` and start it.

        Raises:
            TooManyJobs: ``max_jobs`` are already queued or running here.
            OutputExists: ``out`` already exists.
            ObjectNotFound: the labels object does not exist (404).
            InvalidInput: from ``check``.
        """
        if self.check is not None:
            self.check(req)
        if not self.store.exists(req.labels):
            raise ObjectNotFound(f"labels: no object {req.labels!r} in the store")
        if self.store.exists(req.out):
            raise OutputExists(f"out: {req.out!r} already exists; outputs are never "
                               "overwritten", field="out")
        job_id = uuid.uuid4().hex
        with self._lock:
            if len(self._active) >= self.max_jobs:
                raise TooManyJobs(f"this server already runs {self.max_jobs} training-set "
                                  "job(s); try again when one finishes")
            self._active.add(job_id)
        doc = {"id": job_id, "state": "queued", "progress": 0.0, "out": req.out, "error": None,
               "labels": req.labels, "features": req.features, "knowledge": req.knowledge,
               "created_at": format_timestamp(self.clock.now_us()), "started_at": None,
               "finished_at": None}
        try:
            self._write(doc)
            self._pool.submit(self._run, doc)
        except BaseException:
            with self._lock:
                self._active.discard(job_id)
            raise
        return doc

    def recover(self) -> list[str]:
        """Re-queue the jobs a previous server left ``queued`` or ``running``; their ids."""
        ids = []
        for info in self.store.list(JOBS_PREFIX + "/"):
            name = info.key.rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue
            try:
                doc = json.loads(self.store.get(info.key))
            except (ObjectNotFound, ValueError):
                continue
            if doc.get("state") not in ("queued", "running"):
                continue
            with self._lock:
                if doc["id"] in self._active:
                    continue
                self._active.add(doc["id"])
            log.info("re-queueing training-set job %s (left %s by a previous server)",
                     doc["id"], doc["state"])
            self._update(doc, state="queued", progress=0.0, started_at=None)
            self._pool.submit(self._run, doc)
            ids.append(doc["id"])
        return ids

    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        """Cancel running builds at their next progress step (they stay ``queued``) and wait
        for the worker threads."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- running ---------------------------------------------------------------------------------
    def _run(self, doc: dict[str, Any]) -> None:
        try:
            self._run_inner(doc)
        except _Cancelled:
            log.info("training-set job %s left queued: the server is stopping", doc["id"])
            try:
                self._update(doc, state="queued", progress=0.0)
            except TimetravelError as exc:
                log.warning("job %s: could not record its state: %s", doc["id"], exc)
        except Exception as exc:  # the job fails; the server goes on
            if isinstance(exc, TimetravelError):
                error = {"code": exc.code, "message": exc.message}
            else:
                log.exception("training-set job %s failed", doc["id"])
                error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            try:
                self._update(doc, state="failed", error=error,
                             finished_at=format_timestamp(self.clock.now_us()))
            except TimetravelError as exc2:
                log.warning("job %s: could not record its failure: %s", doc["id"], exc2)
        finally:
            with self._lock:
                self._active.discard(doc["id"])

    def _run_inner(self, doc: dict[str, Any]) -> None:
        if self._stopping.is_set():
            raise _Cancelled()
        if self.store.exists(doc["out"]):
            # A previous server wrote the output and died before recording it.
            self._update(doc, state="done", progress=1.0,
                         finished_at=format_timestamp(self.clock.now_us()))
            return
        self._update(doc, state="running", progress=0.0,
                     started_at=format_timestamp(self.clock.now_us()))
        last_write = [time.monotonic()]

        def progress(fraction: float) -> None:
            if self._stopping.is_set():
                raise _Cancelled()
            fraction = min(max(float(fraction), 0.0), 1.0)
            now = time.monotonic()
            if now - last_write[0] >= _PROGRESS_WRITE_S and fraction < 1.0:
                last_write[0] = now
                self._update(doc, progress=round(fraction, 4))

        labels = self.store.read_parquet(doc["labels"])
        table = self.build(labels, list(doc["features"]), doc["knowledge"], progress)
        if self._stopping.is_set():
            raise _Cancelled()
        self.store.write_parquet(doc["out"], table)
        self._update(doc, state="done", progress=1.0, error=None,
                     finished_at=format_timestamp(self.clock.now_us()))


def public_status(doc: dict[str, Any], fields: Sequence[str] = (
        "id", "state", "progress", "out", "error", "labels", "features", "knowledge",
        "created_at", "started_at", "finished_at")) -> dict[str, Any]:
    """The fields of a job's state that ``GET /v1/training-sets/{id}`` answers."""
    return {f: doc.get(f) for f in fields}
