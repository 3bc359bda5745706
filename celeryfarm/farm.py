"""The farm core, as a client sees it: submit, watch, list, stop and restart jobs.

The Katana plug-in and the command line are thin layers over :class:`Farm`. It never waits
on workers: ``submit`` stores a record and enqueues one Celery chain, and everything else reads
the records (in pipelined batches) and, for jobs still active, Celery's task states.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from celery import Celery, chain, states
from kombu.exceptions import OperationalError

from .celery import RENDER_STEP, create_app
from .config import Settings
from .jobs import MAX_PRIORITY, FarmError, JobRecord, JobSpec, State
from .paths import SharedRoot
from .renderlog import append
from .store import JobStore, connect

#: Filter keys ``Farm.jobs`` understands (the names Katana's getJobs filters use).
FILTER_KEYS = ("user", "session", "host", "state", "name", "renderType")


def now_ms() -> int:
    return int(time.time() * 1000)


def celery_priority(priority: int) -> int:
    """Map farm priority 0..100 (higher first) to Redis priority 9..0 (0 first)."""
    return 9 - round(priority * 9 / MAX_PRIORITY)


class Farm:
    """Client-side access to one farm (one Redis, one shared root)."""

    def __init__(
        self,
        settings: Settings | None = None,
        app: Celery | None = None,
        store: JobStore | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or create_app(self.settings)
        self.store = store or JobStore(connect(self.settings.records_url), self.settings.key_prefix)
        self.root = SharedRoot(self.settings.shared_root, self.settings.node_shared_root)
        self.who = f"{self.settings.user}@{socket.gethostname()}"

    # -- before submission -------------------------------------------------------------------
    def prepare_context(self, context: str) -> Path:
        """Create the render context's folder on the shared mount; return this host's path."""
        return self.root.make_context_dir(context)

    def copy_files(self, filenames: Iterable[str], context: str) -> dict[str, str]:
        """Copy local files into the context folder; return {local path: node path}."""
        return self.root.copy_files(filenames, context)

    # -- submission and control --------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobRecord:
        """Record and enqueue a job; returns at once with the record."""
        job_id = uuid.uuid4().hex
        context = spec.context or job_id
        record = JobRecord(
            job_id=job_id,
            spec=spec,
            log_path=self.root.log_path(context),
            submitted_ms=now_ms(),
        )
        record.task_ids = self._task_ids(record)
        self._note(
            record,
            f"job {job_id} '{spec.name}' submitted by {self.who}: "
            f"{len(spec.commands)} step(s), {spec.render_type} render, pool {spec.queue}",
        )
        self.store.create(record)
        self._enqueue(record)
        return record

    def stop(self, job_id: str) -> JobRecord:
        """Stop a waiting or running job: flag it Cancelled, then revoke all its tasks.

        The flag is what every step checks; the revoke (with terminate) kills the running
        step's render tree at once. A finished job is left as it is.
        """
        record = self.get(job_id)
        if record.finished:
            return record
        reason = f"stopped by {self.who}"
        cancelled = {"state": State.CANCELLED, "end": now_ms(), "reason": reason}
        if not self.store.transition(
            job_id, cancelled, attempt=record.attempt, from_states=State.ACTIVE
        ):
            return self.get(job_id)  # it finished, or was restarted, meanwhile
        self.app.control.revoke(list(record.task_ids), terminate=True, signal="SIGTERM")
        self._note(record, f"stop requested by {self.who}")
        return self.get(job_id)

    def start(self, job_id: str) -> JobRecord:
        """Start a finished (completed, failed or cancelled) job again as a new attempt with
        the same id; a waiting or running job is left as it is."""
        record = self.get(job_id)
        if not record.finished:
            return record
        previous = record.attempt
        record.attempt += 1
        record.task_ids = self._task_ids(record)
        fresh = {
            "attempt": record.attempt, "state": State.WAITING, "task_ids": record.task_ids,
            "submitted": now_ms(), "start": None, "end": None, "step": None, "node": None,
            "reason": None,
        }
        if not self.store.transition(
            job_id, fresh, attempt=previous, from_states=State.FINISHED
        ):
            return self.get(job_id)  # someone else restarted it first
        self._note(record, f"restart by {self.who}: attempt {record.attempt}, "
                           f"after attempt {previous} ended {record.state}")
        self._enqueue(record)
        return self.get(job_id)

    # -- information -------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        """The job's record with its current state; raises ``JobNotFound``."""
        record = self.store.get(job_id)
        self._settle([record])
        return record

    def state(self, job_id: str) -> str:
        return self.get(job_id).state

    def log_file(self, job_id: str) -> Path | None:
        """This host's path of the job's render log, or None if the shared mount is not
        reachable here. Raises ``JobNotFound``."""
        relative = self.store.get_field(job_id, "log")
        if relative is None:
            self.store.get(job_id)  # raises JobNotFound, or a record without a log
            return None
        if not self.root.local.is_dir():
            return None
        return self.root.join(relative)

    def jobs(self, filters: Sequence[Mapping[str, Any]] = ()) -> list[JobRecord]:
        """Jobs matching every filter, newest first. See ``FILTER_KEYS``."""
        merged = _merge_filters(filters)
        kind, value = next(
            ((k, merged[k]) for k in ("session", "user") if isinstance(merged.get(k), str)),
            ("all", ""),
        )
        records = list(self.store.summaries(self.store.ids(kind, value)))
        self._settle(records)
        matches = _matcher(merged)
        return [record for record in records if matches(record)]

    # -- internals ---------------------------------------------------------------------------
    def _task_ids(self, record: JobRecord) -> tuple[str, ...]:
        return tuple(
            f"{record.job_id}-{record.attempt}-{index}"
            for index in range(len(record.spec.commands))
        )

    def _enqueue(self, record: JobRecord) -> None:
        """Send the job's chain. Queue and priority go on every signature: options given to
        the chain itself would apply to its first task only."""
        spec, steps = record.spec, len(record.spec.commands)
        signatures = [
            self.app.signature(
                RENDER_STEP,
                kwargs={
                    "job_id": record.job_id, "attempt": record.attempt, "step": index,
                    "steps": steps, "name": spec.name, "command": list(argv),
                },
                immutable=True,
                task_id=task_id,
                queue=spec.queue,
                priority=celery_priority(spec.priority),
                shadow=f"{spec.name} [{index + 1}/{steps}]",
            )
            for index, (argv, task_id) in enumerate(zip(spec.commands, record.task_ids))
        ]
        try:
            chain(*signatures).apply_async()
        except OperationalError as error:
            reason = f"could not reach the broker to enqueue the job: {error}"
            self.store.transition(
                record.job_id,
                {"state": State.FAILED, "end": now_ms(), "reason": reason},
                attempt=record.attempt,
            )
            raise FarmError(reason) from None

    def _note(self, record: JobRecord, text: str) -> None:
        """Add a celeryfarm line to the job's render log (creating its folder if need be)."""
        try:
            append(self.root.join(record.log_path), text)
        except OSError as error:
            raise FarmError(f"cannot write the render log of job {record.job_id}: "
                            f"{error.strerror}") from None

    def _settle(self, records: Sequence[JobRecord]) -> None:
        """Bring active records up to date with Celery: a step that Celery saw fail or get
        revoked outside the farm's control (a lost pool process, a revoke from Flower) ends
        the job, and the record keeps that for when Celery's results have expired."""
        active = [record for record in records if record.state in State.ACTIVE]
        if not active:
            return
        task_ids = [task_id for record in active for task_id in record.task_ids]
        task_states = dict(zip(task_ids, self._task_states(task_ids)))
        for record in active:
            seen = [task_states[task_id] for task_id in record.task_ids]
            if states.FAILURE in seen:
                step = seen.index(states.FAILURE) + 1
                outcome = State.FAILED, f"step {step}: the worker running it was lost"
            elif states.REVOKED in seen:
                outcome = State.CANCELLED, "a task of the job was revoked outside celeryfarm"
            else:
                continue
            state, reason = outcome
            if self.store.transition(
                record.job_id,
                {"state": state, "end": now_ms(), "reason": reason},
                attempt=record.attempt,
                from_states=State.ACTIVE,
            ):
                self._note(record, reason)
            fresh = self.store.get(record.job_id)
            record.state, record.end_ms, record.reason = fresh.state, fresh.end_ms, fresh.reason

    def _task_states(self, task_ids: list[str]) -> list[str]:
        """Celery states of many tasks in one round trip (PENDING for unknown ids)."""
        backend = self.app.backend
        values = backend.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        return [
            backend.decode_result(value)["status"] if value else states.PENDING
            for value in values
        ]


def _merge_filters(filters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """AND a list of filter dicts into one; a key given twice with different values can
    match nothing."""
    merged: dict[str, Any] = {}
    for one in filters:
        for key, value in one.items():
            if key not in FILTER_KEYS:
                raise FarmError(f"unknown job filter {key!r}; known: {', '.join(FILTER_KEYS)}")
            if key in merged and merged[key] != value:
                merged[key] = _NOTHING
            else:
                merged[key] = value
    return merged


class _Nothing:
    """A filter value no job matches."""


_NOTHING = _Nothing()


def _matcher(merged: Mapping[str, Any]) -> Callable[[JobRecord], bool]:
    def field(key: str) -> Callable[[JobRecord], Any]:
        return {
            "user": lambda r: r.spec.user, "session": lambda r: r.spec.session,
            "host": lambda r: r.spec.host, "state": lambda r: r.state,
            "renderType": lambda r: r.spec.render_type, "name": lambda r: r.spec.name,
        }[key]

    tests: list[Callable[[JobRecord], bool]] = []
    for key, wanted in merged.items():
        get = field(key)
        if wanted is _NOTHING:
            return lambda record: False
        if key == "name":
            tests.append(lambda r, get=get, text=str(wanted): text in get(r))
        elif isinstance(wanted, (list, tuple, set, frozenset)):
            tests.append(lambda r, get=get, options=set(wanted): get(r) in options)
        else:
            tests.append(lambda r, get=get, value=wanted: get(r) == value)
    return lambda record: all(test(record) for test in tests)
