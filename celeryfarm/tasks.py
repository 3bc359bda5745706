"""The render node's side: one Celery task that runs one step of a job.

A job is a chain of these tasks, one per command. Each step checks the job record before it
starts (a stopped or restarted job's leftover messages must not run: revoked ids live only in
worker memory), runs its command through :mod:`celeryfarm.process`, frames its output in the
render log, and records the outcome. The record, not Celery's result, is the job's truth.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

import redis
from celery import states
from celery.exceptions import Ignore

from . import process
from .celery import RENDER_STEP, app
from .config import PREFIX, Settings
from .jobs import JobRecord, State
from .paths import SharedRoot
from .renderlog import RenderLog
from .store import JobStore, connect

logger = logging.getLogger(__name__)


class StepFailed(Exception):
    """A render step did not succeed; the message says why (also in the log and record)."""


@functools.lru_cache(maxsize=1)
def _settings() -> Settings:
    return app.conf.celeryfarm_settings


@functools.lru_cache(maxsize=1)
def _store() -> JobStore:
    settings = _settings()
    return JobStore(connect(settings.records_url), settings.key_prefix)


def now_ms() -> int:
    return int(time.time() * 1000)


def render_environment(record: JobRecord) -> dict[str, str]:
    """The node's environment without celeryfarm's own settings (they hold the broker's
    password), plus the job's environment and where the render runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update(record.spec.environment)
    env.update(CELERYFARM_JOB_ID=record.job_id, CELERYFARM_ATTEMPT=str(record.attempt))
    return env


def stop_reason(store: JobStore, job_id: str, attempt: int) -> str:
    """Why a running step of ``attempt`` must stop now, or "" to go on."""
    try:
        state, current = store.redis.hmget(store.job_key(job_id), "state", "attempt")
    except redis.RedisError as error:  # a broker restart must not kill renders
        logger.warning("cannot check job %s for a stop request: %s", job_id, error)
        return ""
    if current != str(attempt):
        return f"the job was restarted as attempt {current}"
    if state == State.CANCELLED:
        return "stop requested"
    return ""


@contextlib.contextmanager
def sigterm_as_stop(check: Callable[[], str]) -> Iterator[Callable[[], str]]:
    """Turn SIGTERM into a stop request while a render runs, and exit afterwards.

    ``revoke(terminate=True)`` (from ``stopJob`` or Flower) sends SIGTERM to the pool
    process. Left alone it raises ``SystemExit`` wherever the step happens to be, possibly in
    the middle of killing the render's tree. Instead the step notices it at its next poll,
    kills the tree and closes its log section as for any stop, and only then exits the pool
    process as Celery expects of a terminated task.
    """
    terminated = False

    def on_sigterm(_signum: int, _frame: object) -> None:
        nonlocal terminated
        terminated = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield lambda: "the worker was told to terminate the step" if terminated else check()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if terminated:
            raise SystemExit("the render step was terminated")


@app.task(bind=True, name=RENDER_STEP)
def render_step(
    self, job_id: str, attempt: int, step: int, steps: int, name: str, command: list[str]
) -> dict[str, Any]:
    """Run step ``step`` (0-based) of ``steps`` of job ``job_id``'s ``attempt``.

    ``name`` and ``command`` are in the message so Flower shows what a task renders.
    """
    settings, store = _settings(), _store()
    record = store.get(job_id)
    if record.attempt != attempt or record.state not in State.ACTIVE:
        _skip(self, f"job {job_id} attempt {attempt} is {record.state} (now attempt "
              f"{record.attempt}): step {step + 1}/{steps} skipped")
    label = f"step {step + 1}/{steps}"
    log_path = SharedRoot(settings.shared_root).join(record.log_path)
    try:
        log = RenderLog(log_path)
    except OSError as error:
        _fail(store, record, f"{label}: cannot write the render log {log_path}: {error.strerror}")
    node = self.request.hostname or "unknown node"
    running = {"state": State.RUNNING, "step": step, "node": node, "?start": now_ms()}
    if not store.transition(job_id, running, attempt=attempt, from_states=State.ACTIVE):
        log.close()
        _skip(self, f"job {job_id} was stopped before {label} started")
    started = time.monotonic()
    with log, sigterm_as_stop(lambda: stop_reason(store, job_id, attempt)) as should_stop:
        log.step_started(step, steps, command, node, attempt)
        try:
            outcome = process.run(
                command,
                env=render_environment(record),
                cwd=str(log_path.parent),
                output=log,
                should_stop=should_stop,
                poll_seconds=settings.poll_seconds,
                grace_seconds=settings.stop_grace_seconds,
            )
        except Exception as error:
            log.mark(f"{label} | internal error: {error!r}")
            _fail(store, record, f"{label}: internal error: {error!r}")
        log.step_ended(step, steps, outcome.describe(), time.monotonic() - started)
    if outcome.stop_reason:
        _skip(self, f"job {job_id} {label}: {outcome.stop_reason}")
    if not outcome.succeeded:
        _fail(store, record, f"{label} failed: {outcome.describe()}")
    if step == steps - 1:
        store.transition(job_id, {"state": State.COMPLETED, "end": now_ms()},
                         attempt=attempt, from_states=(State.RUNNING,))
    return {"job": job_id, "step": step, "exit_code": outcome.exit_code, "node": node}


def _fail(store: JobStore, record: JobRecord, reason: str) -> NoReturn:
    """Record the job Failed (unless it was stopped meanwhile) and fail the task, which ends
    the chain: the later steps never run."""
    store.transition(
        record.job_id,
        {"state": State.FAILED, "end": now_ms(), "reason": reason},
        attempt=record.attempt,
        from_states=State.ACTIVE,
    )
    raise StepFailed(reason)


def _skip(task: Any, reason: str) -> NoReturn:
    """End the task as REVOKED without running it; the chain goes no further."""
    logger.info(reason)
    task.update_state(state=states.REVOKED, meta={"reason": reason})
    raise Ignore()
