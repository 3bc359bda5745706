"""The job hash: the one encoder and decoder between a :class:`~celeryfarm.jobs.JobRecord`
and the fields Redis stores.

Besides these fields the scripts keep ``lease_owner`` (the execution that holds the running
step's lease), which no Python object carries. The commands and the environment (``SPEC``)
are kept apart, in the first line of the job's history (``Keys.events``), and counters at 0
are left out: what stays in the hash is short, which Redis stores compactly (a listpack, a
third of the memory). Records written before that (with the commands in the hash, their
events in a list) read as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import CorruptRecord
from ..jobs import DEFAULT_PRIORITY, JobRecord, JobSpec, Listed
from ..paths import LOG_NAME
from .states import JobState

#: The fields a job listing needs; reading only these keeps getJobs cheap.
SUMMARY_FIELDS = (
    "name", "user", "host", "session", "render_type", "state", "attempt", "task_ids",
    "submitted", "start", "end", "log", "step", "node", "reason", "queue", "priority",
    "context",  # the log is the context's unless "log" says otherwise
    "frames",  # listings show them
    "retries", "failures", "licence_waits",  # listings show the try
    "frames_done",  # and the progress
)
#: What runs, kept in the first line of the job's history rather than in its hash: the
#: field and its name there.
SPEC = {"commands": "c", "environment": "v"}
#: The history's short names (``add_event`` in common.lua writes them) and the long ones.
EVENT_NAMES = {"e": "event", "s": "step", "d": "dispatch", "a": "attempt", "o": "owner",
               "n": "node", "t": "at", "x": "outcome", "l": "lost", "m": "limit",
               "r": "retry", "w": "why"}
#: The event of the history's first line.
SUBMITTED = "submitted"
#: Fields left out of the hash while they are 0 (absent reads as 0).
ZERO_OMITTED = ("max_step_seconds", "stall_seconds", "max_memory_mb", "retries",
                "retry_delay_seconds", "lost", "failures", "licence_waits", "frames_done")
#: Fields left out while they hold their default (absent reads as it); the log's is
#: :func:`default_log`.
DEFAULTS = {"render_type": "Disk", "priority": str(DEFAULT_PRIORITY)}
#: Where the state is in a ``SUMMARY_FIELDS`` read (no state: the record is gone).
STATE_AT = SUMMARY_FIELDS.index("state")
#: What getJobs shows and filters on, state first (listing.lua reads them as one string).
LISTING_FIELDS = ("state", "name", "user", "host", "session", "render_type", "attempt",
                  "submitted", "end", "log", "task_ids", "context")
#: Between the values of ``LISTING_FIELDS`` in listing.lua's strings.
LISTING_SEP = "\x1f"


def encode(record: JobRecord) -> dict[str, str]:
    """The hash of a record; empty fields, the spec (:func:`encode_submission`), counters at
    0 and defaults are left out."""
    spec = record.spec
    fields = {
        "name": spec.name,
        "user": spec.user,
        "host": spec.host,
        "session": spec.session,
        "context": spec.context,
        "render_type": spec.render_type,
        "frames": json.dumps(spec.frames) if spec.frames else "",  # [[first, last], ...]
        "queue": spec.queue,
        "priority": str(spec.priority),
        "max_step_seconds": str(spec.max_step_seconds),
        "stall_seconds": str(spec.stall_seconds),
        "max_memory_mb": str(spec.max_memory_mb),
        "retries": str(spec.retries),
        "retry_delay_seconds": str(spec.retry_delay_seconds),
        "licence_pattern": spec.licence_pattern,
        "fatal_pattern": spec.fatal_pattern,
        "limits": ",".join(spec.limits),
        "log": "" if record.log_path == default_log(record.job_id, spec.context)
        else record.log_path,
        "state": JobState(record.state).value,
        **attempt_fields(record),
        "lost": str(record.lost),
        "failures": str(record.failures),
        "licence_waits": str(record.licence_waits),
        "bad_nodes": json.dumps(record.bad_nodes) if record.bad_nodes else "",
        "frames_done": str(record.frames_done),
        "submitted": str(record.submitted_ms),
        "start": text(record.start_ms),
        "end": text(record.end_ms),
        "step": text(record.step),
        "node": record.node,
        "reason": record.reason,
    }
    return {name: value for name, value in fields.items()
            if value != "" and not (value == "0" and name in ZERO_OMITTED)
            and DEFAULTS.get(name) != value}


def default_log(job_id: str, context: str) -> str:
    """Where a job's render log is unless its record says otherwise: its render context's
    folder (the job id's for a job without one), as ``Farm.submit`` places it."""
    return f"{context or job_id}/{LOG_NAME}"


def encode_submission(record: JobRecord) -> str:
    """The first line of the job's history: its submission, with the commands and the
    environment."""
    return json.dumps({"e": SUBMITTED, SPEC["commands"]: record.spec.commands,
                       SPEC["environment"]: dict(record.spec.environment)},
                      separators=(",", ":")) + "\n"


def _owner_node(owner: str) -> str:
    """The node of a lease owner (``celeryfarm.lease.lease_owner``: message/node/pid): a
    start's history line does not repeat it."""
    parts = owner.split("/")
    return parts[1] if len(parts) == 3 else ""


def decode_events(job_id: str, lines: list[str]) -> list[dict]:
    """The step executions of a history's lines (or of an old record's list), with their
    long names; the submission line is left out."""
    events = []
    for line in lines:
        event = {EVENT_NAMES.get(name, name): value for name, value in json.loads(line).items()}
        if "p" in event:  # an owner written without the job id
            event["owner"] = f"{job_id}-{event.pop('p')}"
        if event.get("event") == "start" and "node" not in event:
            event["node"] = _owner_node(event.get("owner", ""))
        if event.get("event") != SUBMITTED:
            events.append(event)
    return events


def attempt_fields(record: JobRecord) -> dict[str, str]:
    """The fields that say which attempt and dispatch run and what they have sent."""
    return {
        "attempt": str(record.attempt),
        "dispatch": str(record.dispatch),
        "next_step": str(record.next_step),
        "task_ids": json.dumps(record.task_ids),
    }


def text(value: object) -> str:
    """A field's text: "" for None (the field is then absent), JSON for lists and dicts."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text else None


def decode(job_id: str, fields: dict[str, str], history: str | None = None) -> JobRecord:
    """Build a record from stored fields and its history (whose first line has what runs);
    listing reads (``SUMMARY_FIELDS``, no history) leave the commands and environment empty.
    Anything that is not what :func:`encode` writes is a
    :class:`~celeryfarm.errors.CorruptRecord` naming the job, so one bad record fails only
    what asks for it."""
    try:
        if history:  # fields in the hash win: records from before the history
            submission = json.loads(history.split("\n", 1)[0])
            fields = {**{name: json.dumps(submission[short]) for name, short in SPEC.items()
                         if short in submission}, **fields}
        record = _decode(job_id, fields)
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptRecord(job_id, f"{type(error).__name__}: {error}") from None
    _check_log(job_id, record.log_path)
    return record


def _check_log(job_id: str, log: str) -> None:
    """A log path must stay inside the shared root (string checks: listings check 10,000
    of them, and PurePosixPath takes ten times as long)."""
    if log.startswith("/") or (".." in log and ".." in log.split("/")):
        raise CorruptRecord(job_id, f"its log path {log!r} is not inside the shared root")


def _decode(job_id: str, fields: dict[str, str]) -> JobRecord:
    frames = fields.get("frames")
    commands, environment = fields.get("commands"), fields.get("environment")
    spec = JobSpec(
        name=fields.get("name", ""),
        commands=tuple(tuple(argv) for argv in json.loads(commands)) if commands else (),
        environment=json.loads(environment) if environment else {},
        render_type=fields.get("render_type") or "Disk",
        frames=tuple((first, last) for first, last in json.loads(frames)) if frames else (),
        context=fields.get("context", ""),
        queue=fields.get("queue", ""),
        priority=int(fields.get("priority") or DEFAULT_PRIORITY),
        max_step_seconds=int(fields.get("max_step_seconds") or 0),
        stall_seconds=int(fields.get("stall_seconds") or 0),
        max_memory_mb=int(fields.get("max_memory_mb") or 0),
        retries=int(fields.get("retries") or 0),
        retry_delay_seconds=int(fields.get("retry_delay_seconds") or 0),
        licence_pattern=fields.get("licence_pattern", ""),
        fatal_pattern=fields.get("fatal_pattern", ""),
        limits=tuple(filter(None, fields.get("limits", "").split(","))),
        user=fields.get("user", ""),
        host=fields.get("host", ""),
        session=fields.get("session", ""),
    )
    return JobRecord(
        job_id=job_id,
        spec=spec,
        log_path=fields.get("log") or default_log(job_id, fields.get("context", "")),
        state=JobState(fields["state"]),
        attempt=int(fields.get("attempt") or 1),
        dispatch=int(fields.get("dispatch") or 1),
        next_step=int(fields.get("next_step") or 0),
        lost=int(fields.get("lost") or 0),
        failures=int(fields.get("failures") or 0),
        licence_waits=int(fields.get("licence_waits") or 0),
        bad_nodes=json.loads(fields.get("bad_nodes") or "{}"),
        frames_done=int(fields.get("frames_done") or 0),
        task_ids=tuple(json.loads(fields.get("task_ids") or "[]")),
        submitted_ms=int(fields.get("submitted") or 0),
        start_ms=_int_or_none(fields.get("start")),
        end_ms=_int_or_none(fields.get("end")),
        step=_int_or_none(fields.get("step")),
        node=fields.get("node", ""),
        reason=fields.get("reason", ""),
    )


def decode_flat(job_id: str, flat: list[str], history: str | None = None) -> JobRecord:
    """Decode an ``HGETALL`` as a script returns it (name, value, name, value...) with the
    job's history."""
    return decode(job_id, dict(zip(flat[::2], flat[1::2])), history)


_STATES = {state.value: state for state in JobState}  # a dict: 10,000 lookups a listing


def decode_listed(job_id: str, packed: str) -> Listed | None:
    """A :class:`~celeryfarm.jobs.Listed` from listing.lua's string for the job; None if
    the string does not hold every listing field (a value with the separator in it: the
    caller reads that job field by field)."""
    values = packed.split(LISTING_SEP)
    if len(values) != len(LISTING_FIELDS):
        return None
    return decode_listed_values(job_id, values)


def decode_listed_values(job_id: str, values: list[str]) -> Listed:
    """A :class:`~celeryfarm.jobs.Listed` from the values of ``LISTING_FIELDS`` ('' for
    absent ones); anything that is not what :func:`encode` writes is a
    :class:`~celeryfarm.errors.CorruptRecord`."""
    return _listed(job_id, *values)


def encode_listed_values(job: Listed) -> list[str]:
    """The values of ``LISTING_FIELDS`` of a listed job, as :func:`decode_listed_values`
    reads them (its context is left out: its log path is kept whole)."""
    return [job.state.value, job.name, job.user, job.host, job.session, job.render_type,
            str(job.attempt), str(job.submitted_ms), "" if job.end_ms is None else str(job.end_ms),
            job.log_path, job.task_ids_json, ""]


def _listed(job_id: str, state: str, name: str, user: str, host: str, session: str,
            render_type: str, attempt: str, submitted: str, end: str, log: str, task_ids: str,
            context: str) -> Listed:
    """:func:`decode_listed_values`, the values as arguments (a snapshot's line holds the
    job id and them: one call a job, no slicing)."""
    log = log or default_log(job_id, context)
    try:
        listed = Listed(job_id, name, user, host, session, render_type or "Disk",
                        _STATES[state], int(attempt or 1), int(submitted or 0),
                        int(end) if end else None, log, task_ids)
    except (KeyError, ValueError) as error:
        raise CorruptRecord(job_id, f"{type(error).__name__}: {error}") from None
    _check_log(job_id, log)
    return listed


#: The first word of a listing snapshot; a snapshot of another version is read afresh.
SNAPSHOT_VERSION = "v1"


def encode_snapshot(position: int, jobs: Sequence[Listed]) -> str | None:
    """A listing snapshot (``Keys.snapshot``): a line ``v1 <change feed position>``, then a
    line per job, its id and ``LISTING_FIELDS`` joined by ``LISTING_SEP``. None when a
    value holds a line break or the separator (no such snapshot is written)."""
    lines = [f"{SNAPSHOT_VERSION} {position}"]
    lines += [LISTING_SEP.join([job.job_id, *encode_listed_values(job)]) for job in jobs]
    text = "\n".join(lines)
    if (text.count("\n") != len(jobs)
            or text.count(LISTING_SEP) != len(jobs) * len(LISTING_FIELDS)):
        return None
    return text


def decode_snapshot(text: str) -> tuple[int, list[Listed]] | None:
    """The change feed position and jobs of a listing snapshot; None for one this version
    does not write or that does not decode (the listing is then read afresh)."""
    header, _, body = text.partition("\n")
    version, _, position = header.partition(" ")
    if version != SNAPSHOT_VERSION or not position.isdigit():
        return None
    try:
        jobs = [_listed(*line.split(LISTING_SEP)) for line in body.split("\n")] if body else []
    except (TypeError, CorruptRecord):  # TypeError: a line with too few or too many values
        return None
    return int(position), jobs
