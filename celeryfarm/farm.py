"""The farm core, as a client sees it: submit, watch, list, stop and restart jobs.

The Katana plug-in, the command line and the demo are thin layers over :class:`Farm`, and
submit the same way: a render context (its folder on the shared mount, copied files, the
job environment), then argv lists with ``submit_commands``. It never waits on workers:
``submit`` stores a record and enqueues one Celery chain, and everything else reads the
records (in pipelined batches) and, for jobs still active, Celery's task states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import redis
from celery import Celery, states
from kombu.exceptions import OperationalError

from . import dispatch
from .acl import authenticated_user
from .celery import create_app
from .config import SECRET_VARIABLES, Settings
from .errors import FarmError, NotAllowed
from .jobs import Command, JobRecord, JobSpec, Listed, describe_frames
from .listing import Listing
from .paths import SharedRoot
from .records.keys import new_job_id
from .records.states import ACTIVE, JobState
from .records.store import JobStore, connect
from .renderlog import append

#: Filter keys ``Farm.jobs`` understands (the names Katana's getJobs filters use).
FILTER_KEYS = ("user", "session", "host", "state", "name", "renderType")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass(frozen=True)
class RenderContext:
    """A render's folder on the shared mount, made by :meth:`Farm.create_context`."""

    name: str
    folder: Path  # as this host sees it
    node_folder: str  # as the render nodes see it: the render's working folder
    copies: Mapping[str, str]  # local file -> its copy, as the nodes see it
    environment: Mapping[str, str]  # what every render of the context gets


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
        self.store = store or JobStore.from_settings(self.settings)
        self.root = SharedRoot(self.settings.shared_root, self.settings.node_shared_root)
        self.host = socket.gethostname()
        #: Identifies this client's jobs (``getJobs({'session': ...})``).
        self.session = self.settings.session or f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        #: Each user's jobs as listed at the last call, kept up to date (:meth:`listed`).
        self._listings: dict[str, Listing] = {}

    @functools.cached_property
    def user(self) -> str:
        """Whose jobs this client submits: the Redis user it is authenticated as on a farm
        with ACL users (Redis enforces it); on a farm without, CELERYFARM_USER or the login
        name, which nothing enforces. Asked of Redis when first needed."""
        return authenticated_user(self.store.redis) or self.settings.user

    @property
    def who(self) -> str:
        return f"{self.user}@{self.host}"

    # -- before submission -------------------------------------------------------------------
    def prepare_context(self, context: str) -> Path:
        """Create the render context's folder on the shared mount; return this host's path."""
        return self.root.make_context_dir(context)

    def copy_files(self, filenames: Iterable[str], context: str) -> dict[str, str]:
        """Copy local files into the context folder; return {local path: node path}."""
        return self.root.copy_files(filenames, context)

    def job_environment(self, context: str) -> dict[str, str]:
        """What every render of ``context`` gets: its name, and its folder as the nodes see
        it (``KATANA_TMPDIR``), which is also the render's working folder."""
        return {
            "CELERYFARM_RENDER_CONTEXT": context,
            "KATANA_TMPDIR": self.root.to_remote(self.root.context_dir(context)),
        }

    def create_context(self, files: Iterable[str] = (), name: str = "") -> RenderContext:
        """A render context with its folder and ``files`` copied into it: what Katana asks
        of the plug-in before a submission, in one call. Named by a new UUID, as Katana
        names them, unless ``name`` is given."""
        name = name or str(uuid.uuid4())
        folder = self.prepare_context(name)
        copies = self.copy_files(files, name)
        environment = self.job_environment(name)
        return RenderContext(name, folder, environment["KATANA_TMPDIR"], copies, environment)

    # -- submission and control --------------------------------------------------------------
    def submit_commands(
        self,
        commands: Sequence[Command],
        *,
        context: str,
        name: str = "",
        environment: Mapping[str, str] | None = None,
        frames: Iterable[int] = (),
        render_type: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Submit ``commands`` (argv lists, or command-line strings that are split with
        shlex and never given to a shell; run in order) as a job of render ``context``,
        recorded as this user's, host's and session's. ``environment`` adds to the
        context's, which wins (``KATANA_TMPDIR`` is the render's folder as the nodes see it,
        whatever the request says); the farm's credential variables in it (Katana may pass
        a workstation's ``CELERYFARM_BROKER_URL``) are dropped, as the record is readable
        by nodes and wranglers. ``settings`` are the farm settings (pool, priority,
        maxStepSeconds, stallSeconds). Raises :class:`FarmError` for bad input."""
        if environment is not None and not isinstance(environment, Mapping):
            raise FarmError(f"environment must be a mapping of names to values, "
                            f"got {environment!r}")
        requested = {name: value for name, value in (environment or {}).items()
                     if name not in SECRET_VARIABLES}
        spec = JobSpec.build(
            name=name,
            commands=commands,
            environment={**requested, **self.job_environment(context)},
            render_type=render_type,
            frames=frames,
            settings=settings,
            default_queue=self.settings.default_queue,
            context=context,
            user=self.user,
            host=self.host,
            session=self.session,
        )
        return self.submit(spec)

    def submit(self, spec: JobSpec) -> JobRecord:
        """Record and enqueue a job; returns at once with the record."""
        unknown = set(spec.limits) - set(self.store.limits()) if spec.limits else ()
        if unknown:
            raise FarmError(f"unknown limit(s) {', '.join(sorted(unknown))}: a wrangler sets "
                            f"them with `celeryfarm limit set NAME UNITS`")
        job_id = new_job_id(spec.user or self.user)
        context = spec.context or job_id
        record = JobRecord(
            job_id=job_id,
            spec=spec,
            log_path=self.root.log_path(context),
            submitted_ms=now_ms(),
        )
        record.task_ids = dispatch.task_ids(record)
        self._note(
            record,
            f"job {job_id} '{spec.name}' submitted by {self.who}: "
            f"{len(spec.commands)} step(s), {spec.render_type} render, pool {spec.queue}, "
            f"frames {describe_frames(spec.frames)}",
        )
        try:
            pushes = dispatch.compose(self.app, record)
        except OperationalError as error:
            raise FarmError(f"job {job_id} was not submitted: the broker could not be "
                            f"reached ({error})") from None
        self.store.create(record, pushes=pushes)
        return record

    def stop(self, job_id: str) -> JobRecord:
        """Stop a waiting or running job: record it Cancelled. A finished job is left as it
        is.

        The record is what stops it, not a Celery revoke (which artists may not send):
        the running step's lease renewal sees the cancel within a poll and kills its
        render tree, and a step not yet started refuses to claim. On a farm with ACL users,
        Redis refuses the write unless the job is this user's or the user is a wrangler
        (:class:`~celeryfarm.errors.NotAllowed`).
        """
        record = self.get(job_id)
        if record.finished:
            return record
        with allowed(f"stop job {job_id}", self.user):
            cancelled = self.store.cancel(job_id, record.attempt, f"stopped by {self.who}")
        if not cancelled:
            return self.get(job_id)  # it finished, or was restarted, meanwhile
        self._note(record, f"stop requested by {self.who}")
        return self.get(job_id)

    def start(self, job_id: str) -> JobRecord:
        """Start a finished (completed, failed or cancelled) job again as a new attempt with
        the same id; a waiting or running job is left as it is."""
        record = self.get(job_id)
        if not record.finished:
            return record
        previous = record.attempt
        record.attempt, record.dispatch, record.next_step = previous + 1, record.dispatch + 1, 0
        record.task_ids, record.submitted_ms = dispatch.task_ids(record), now_ms()
        with allowed(f"restart job {job_id}", self.user):
            restarted = self.store.restart(record, previous)
        if not restarted:
            return self.get(job_id)  # someone else restarted it first
        self._note(record, f"restart by {self.who}: attempt {record.attempt}, "
                           f"after attempt {previous} ended {record.state}")
        self._send(record)
        return self.get(job_id)

    # -- information -------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        """The job's record with its current state; raises ``JobNotFound``."""
        record = self.store.get(job_id)
        if self._settle([record]):  # it ended meanwhile: its record changed
            record = self.store.get(job_id)
        return record

    def state(self, job_id: str) -> JobState:
        return self.get(job_id).state

    def log_file(self, job_id: str) -> Path | None:
        """This host's path of the job's render log, or None if the shared mount is not
        reachable here. Raises ``JobNotFound``."""
        relative = self.store.log_path(job_id)
        if not self.root.local.is_dir():
            return None
        self.root.join(relative)  # refuses a path that escapes the root, symlinks and all
        return Path(self.root.local_path(relative))

    def log_path(self, record: JobRecord | Listed) -> str | None:
        """This host's path of a record's render log (see ``SharedRoot.local_path``)."""
        return self.root.local_path(record.log_path) if record.log_path else None

    def events(self, job_id: str) -> list[dict]:
        """The job's step executions (starts, ends, losses), oldest first."""
        return self.store.events(job_id)

    def job_ids(self) -> list[str]:
        """Every job's id, newest first."""
        return self.store.ids_with(self.user)

    def jobs(self, filters: Sequence[Mapping[str, Any]] = ()) -> list[JobRecord]:
        """Jobs matching every filter, newest first. See ``FILTER_KEYS``."""
        merged = _merge_filters(filters)
        records = list(self.store.summaries(self._ids(merged)))
        settled = self._settle(records)
        if settled:
            records = [self.store.get(record.job_id) if record.job_id in settled else record
                       for record in records]
        matches = _matcher(merged, RECORD_FIELDS)
        return [record for record in records if matches(record)]

    def listed(self, filters: Sequence[Mapping[str, Any]] = ()) -> list[Listed]:
        """What a job listing shows of the jobs matching every filter, newest first (see
        ``FILTER_KEYS``). A user's jobs come from that user's :class:`Listing`, kept in this
        client between calls: a call re-reads only the jobs changed since the last one,
        so Katana's polling of getJobs costs next to nothing while nothing changes."""
        merged = _merge_filters(filters)
        user = merged.pop("user", None)
        if isinstance(user, str):
            listing = self._listings.get(user)
            if listing is None:
                listing = self._listings[user] = Listing(self.store, user,
                                                         keeps_snapshot=user == self.user)
            jobs = listing.jobs()
            if self._settle(listing.active):  # a job ended unrecorded: read its change
                jobs = listing.jobs()
        else:
            if user is not None:
                merged["user"] = user
            ids = self._ids(merged)

            def read() -> list[Listed]:
                return [job for _, job in self.store.listed(ids) if job]

            jobs = read()
            if self._settle(jobs):  # a job ended unrecorded: read its change
                jobs = read()
        if not merged:
            return jobs
        matches = _matcher(merged, LISTED_FIELDS)
        return [job for job in jobs if matches(job)]

    # -- internals ---------------------------------------------------------------------------
    def _ids(self, merged: Mapping[str, Any]) -> list[str]:
        """The ids of the index that holds every job the filters can match, newest first.
        This user's own jobs are in their index at once, before a render node takes them
        into the shared ones (``JobStore.adopt``)."""
        kind, value = next(
            ((k, merged[k]) for k in ("session", "user") if isinstance(merged.get(k), str)),
            ("all", ""),
        )
        if (kind, value) == ("session", self.session):
            kind, value = "user", self.user
        return self.store.ids_with(self.user) if kind == "all" else self.store.ids(kind, value)

    def _send(self, record: JobRecord) -> None:
        """Send the record's dispatch; it is in the outbox already, so if the broker cannot
        be reached the job still runs once a node's reaper can send it."""
        try:
            dispatch.send(self.app, self.store, record, by_node=False)
        except OperationalError as error:
            raise FarmError(
                f"job {record.job_id} is recorded but the broker could not be reached to "
                f"send it ({error}); a render node will send it once the broker is back"
            ) from None

    def _note(self, record: JobRecord, text: str) -> None:
        """Add a celeryfarm line to the job's render log (creating its folder if need be)."""
        try:
            append(self.root.join(record.log_path), text)
        except OSError as error:
            raise FarmError(f"cannot write the render log of job {record.job_id}: "
                            f"{error.strerror}") from None

    def _settle(self, records: Sequence[JobRecord | Listed]) -> set[str]:
        """Bring active jobs up to date with Celery: a step revoked outside the farm (from
        Flower) ends the job, and the record keeps that for when Celery's results have
        expired. Returns the ids of the jobs that ended so: the records given of them are
        stale, and the caller reads them again (a record read is never changed in place:
        the plug-in keeps the ``FarmAPI.Job`` it made of each while it is the same object).
        A failure Celery recorded is not trusted: a message forged with a step's task id
        (an unregistered task, bad arguments) makes the worker record one, and a step that
        failed before it could claim its lease is re-dispatched by the reapers as any
        vanished step is. A lost worker is not an end either: the step's lease expires and
        it is re-dispatched (see :mod:`celeryfarm.reaper`)."""
        active = [record for record in records if record.state in ACTIVE]
        if not active:
            return set()
        settled = set()
        task_ids = [task_id for record in active for task_id in record.task_ids]
        task_states = dict(zip(task_ids, self._task_states(task_ids)))
        reason = "a step was revoked outside celeryfarm (Flower?)"
        for record in active:
            if not any(task_states[task_id] == states.REVOKED for task_id in record.task_ids):
                continue
            try:
                cancelled = self.store.cancel(record.job_id, record.attempt, reason)
            except redis.exceptions.NoPermissionError:
                continue  # another artist's job: its owner's client or a wrangler records it
            if cancelled:
                self._note(record, reason)
            settled.add(record.job_id)
        return settled

    @functools.cached_property
    def _results(self) -> redis.Redis:
        """Celery's results, read with the records' retries: Celery's own client gives up at
        the first lost connection (a Redis restart, a failover). The records' own client
        where they share a Redis (the usual farm): no second connection to make."""
        settings = self.settings
        if settings.results_url == settings.records_url:
            return self.store.redis
        return connect(settings.results_url, settings.tls, settings.sentinel_master,
                       settings.sentinel_password)

    def _task_states(self, task_ids: list[str]) -> list[str]:
        """Celery states of many tasks in one round trip; unknown ids are PENDING."""
        backend = self.app.backend
        values = self._results.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        return [backend.decode(value)["status"] if value else states.PENDING
                for value in values]


@contextlib.contextmanager
def allowed(what: str, user: str) -> Iterator[None]:
    """Turn Redis's refusal of a write (an ACL user's key permissions) into a clear
    :class:`NotAllowed`; the refused script changed nothing."""
    try:
        yield
    except redis.exceptions.NoPermissionError:
        raise NotAllowed(f"{user} may not {what}: it is another artist's job (a wrangler "
                         f"may)") from None


def _merge_filters(filters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """AND a list of filter dicts into one; a key given twice with different values can
    match nothing."""
    merged: dict[str, Any] = {}
    for one in filters:
        if not isinstance(one, Mapping):
            raise FarmError(f"a job filter must be a dict, got {one!r}")
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


#: How each filter key reads a record, and a listed job.
RECORD_FIELDS: dict[str, Callable[[Any], Any]] = {
    "user": lambda r: r.spec.user, "session": lambda r: r.spec.session,
    "host": lambda r: r.spec.host, "state": lambda r: r.state,
    "renderType": lambda r: r.spec.render_type, "name": lambda r: r.spec.name,
}
LISTED_FIELDS: dict[str, Callable[[Any], Any]] = {
    "user": lambda r: r.user, "session": lambda r: r.session, "host": lambda r: r.host,
    "state": lambda r: r.state, "renderType": lambda r: r.render_type,
    "name": lambda r: r.name,
}


def _matcher(merged: Mapping[str, Any],
             fields: Mapping[str, Callable[[Any], Any]]) -> Callable[[Any], bool]:
    tests: list[Callable[[Any], bool]] = []
    for key, wanted in merged.items():
        get = fields[key]
        if wanted is _NOTHING:
            return lambda record: False
        if key == "name":
            tests.append(lambda r, get=get, text=str(wanted): text in get(r))
        elif isinstance(wanted, (list, tuple, set, frozenset)):
            tests.append(lambda r, get=get, options=set(wanted): get(r) in options)
        else:
            tests.append(lambda r, get=get, value=wanted: get(r) == value)
    return lambda record: all(test(record) for test in tests)
