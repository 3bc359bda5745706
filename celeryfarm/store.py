"""Job records in Redis, apart from Celery's results.

Celery's results expire and say PENDING for ids they never saw, so the farm keeps its own
record of every job: a hash per job plus sorted-set indexes by submission time. State changes
go through one Lua script that checks the job's attempt and current state atomically, so a
worker finishing a step and an artist stopping the job can never both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .jobs import JobNotFound, JobRecord, JobSpec

#: Ids per pipeline round trip when reading many records.
BATCH = 1000

# KEYS[1]: the job hash. ARGV[1]: required attempt ('' = any). ARGV[2]: comma-separated states
# the job may be in ('' = any). ARGV[3..]: field/value pairs; an empty value deletes the field,
# a field named '?name' is set only if absent. Returns 1 if applied, 0 if refused, -1 if no job.
_TRANSITION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local fields = redis.call('HMGET', KEYS[1], 'attempt', 'state')
if ARGV[1] ~= '' and fields[1] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and not string.find(',' .. ARGV[2] .. ',', ',' .. fields[2] .. ',', 1, true) then
  return 0
end
for i = 3, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if value == '' then
    redis.call('HDEL', KEYS[1], name)
  elseif string.sub(name, 1, 1) == '?' then
    redis.call('HSETNX', KEYS[1], string.sub(name, 2), value)
  else
    redis.call('HSET', KEYS[1], name, value)
  end
end
return 1
"""

#: The fields a job listing needs; reading only these keeps getJobs cheap.
SUMMARY_FIELDS = (
    "name", "user", "host", "session", "render_type", "state", "attempt", "task_ids",
    "submitted", "start", "end", "log", "step", "node", "reason", "queue", "priority",
    "frames",  # listings show them
)
_STATE_AT = SUMMARY_FIELDS.index("state")


def connect(url: str) -> redis.Redis:
    """A Redis client that survives broker restarts: keepalive, health checks and retries,
    and timeouts so an unreachable Redis is an error, not a hang."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=10,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _encode(record: JobRecord) -> dict[str, str]:
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
        "commands": json.dumps(spec.commands),
        "environment": json.dumps(dict(spec.environment)),
        "log": record.log_path,
        "state": record.state,
        "attempt": str(record.attempt),
        "dispatch": str(record.dispatch),
        "next_step": str(record.next_step),
        "lost": str(record.lost),
        "task_ids": json.dumps(record.task_ids),
        "submitted": str(record.submitted_ms),
        "start": _int_text(record.start_ms),
        "end": _int_text(record.end_ms),
        "step": _int_text(record.step),
        "node": record.node,
        "reason": record.reason,
    }
    return {name: value for name, value in fields.items() if value != ""}


def _int_text(value: int | None) -> str:
    return "" if value is None else str(value)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text else None


def decode(job_id: str, fields: dict[str, str]) -> JobRecord:
    """Build a record from stored fields; listing reads (``SUMMARY_FIELDS``) leave the
    commands and environment empty."""
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
        priority=int(fields.get("priority") or 0),
        max_step_seconds=int(fields.get("max_step_seconds") or 0),
        stall_seconds=int(fields.get("stall_seconds") or 0),
        max_memory_mb=int(fields.get("max_memory_mb") or 0),
        user=fields.get("user", ""),
        host=fields.get("host", ""),
        session=fields.get("session", ""),
    )
    return JobRecord(
        job_id=job_id,
        spec=spec,
        log_path=fields.get("log", ""),
        state=fields["state"],
        attempt=int(fields.get("attempt") or 1),
        dispatch=int(fields.get("dispatch") or 1),
        next_step=int(fields.get("next_step") or 0),
        lost=int(fields.get("lost") or 0),
        task_ids=tuple(json.loads(fields.get("task_ids") or "[]")),
        submitted_ms=int(fields.get("submitted") or 0),
        start_ms=_int_or_none(fields.get("start")),
        end_ms=_int_or_none(fields.get("end")),
        step=_int_or_none(fields.get("step")),
        node=fields.get("node", ""),
        reason=fields.get("reason", ""),
    )


class JobStore:
    """Reads and writes job records. Safe to share between threads."""

    def __init__(self, client: redis.Redis, prefix: str = "celeryfarm") -> None:
        self.redis = client
        self.prefix = prefix
        self._transition = client.register_script(_TRANSITION)

    # -- keys --------------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def index_key(self, kind: str = "all", value: str = "") -> str:
        return f"{self.prefix}:index:{kind}:{value}" if value else f"{self.prefix}:index:{kind}"

    @property
    def leases_key(self) -> str:
        """Sorted set: job id -> deadline (ms) of its running step's lease."""
        return f"{self.prefix}:leases"

    @property
    def outbox_key(self) -> str:
        """Sorted set: job id -> when a dispatch of it was recorded but not yet sent."""
        return f"{self.prefix}:dispatching"

    def events_key(self, job_id: str) -> str:
        """List of the job's step executions: starts, ends and losses, as JSON."""
        return f"{self.prefix}:events:{job_id}"

    # -- writes ------------------------------------------------------------------------------
    def create(self, record: JobRecord, dispatching: bool = True) -> None:
        """Store a new record, index it and (unless told not to) put it in the outbox, in
        one round trip."""
        score = record.submitted_ms
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.job_key(record.job_id), mapping=_encode(record))
        if dispatching:
            pipe.zadd(self.outbox_key, {record.job_id: score})
        pipe.zadd(self.index_key(), {record.job_id: score})
        if record.spec.user:
            pipe.zadd(self.index_key("user", record.spec.user), {record.job_id: score})
        if record.spec.session:
            pipe.zadd(self.index_key("session", record.spec.session), {record.job_id: score})
        pipe.execute()

    def create_many(self, records: Iterable[JobRecord]) -> None:
        """Store and index many records as they are, ``BATCH`` per round trip, and nothing
        else: for importing a history (the benchmarks write 10,000 jobs this way)."""
        records = list(records)
        for start in range(0, len(records), BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for record in records[start:start + BATCH]:
                score = {record.job_id: record.submitted_ms}
                pipe.hset(self.job_key(record.job_id), mapping=_encode(record))
                pipe.zadd(self.index_key(), score)
                if record.spec.user:
                    pipe.zadd(self.index_key("user", record.spec.user), score)
                if record.spec.session:
                    pipe.zadd(self.index_key("session", record.spec.session), score)
            pipe.execute()

    def transition(
        self,
        job_id: str,
        fields: Mapping[str, object],
        *,
        attempt: int | None = None,
        from_states: Sequence[str] = (),
        dispatching: bool = False,
    ) -> bool:
        """Set ``fields`` if the job is on ``attempt`` and in one of ``from_states``.

        A value of ``None`` deletes the field; a field named ``"?name"`` is set only if it is
        absent. ``dispatching`` also puts the job in the outbox, atomically. Returns whether
        the change was applied; raises :class:`JobNotFound` for an unknown id.
        """
        args: list[str] = ["" if attempt is None else str(attempt), ",".join(from_states)]
        for name, value in fields.items():
            args += [name, "" if value is None else _field_text(value)]
        if dispatching:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zadd(self.outbox_key, {job_id: int(time.time() * 1000)})
            self._transition(keys=[self.job_key(job_id)], args=args, client=pipe)
            applied = pipe.execute()[-1]
        else:
            applied = self._transition(keys=[self.job_key(job_id)], args=args)
        if applied == -1:
            raise JobNotFound(job_id)
        return applied == 1

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        fields = self.redis.hgetall(self.job_key(job_id))
        if not fields:
            raise JobNotFound(job_id)
        return decode(job_id, fields)

    def get_field(self, job_id: str, name: str) -> str | None:
        return self.redis.hget(self.job_key(job_id), name)

    def events(self, job_id: str) -> list[dict]:
        """The job's step executions (starts, ends, losses), oldest first."""
        return [json.loads(event) for event in self.redis.lrange(self.events_key(job_id), 0, -1)]

    def ids(self, kind: str = "all", value: str = "") -> list[str]:
        """Job ids of an index, newest first."""
        return self.redis.zrevrange(self.index_key(kind, value), 0, -1)

    def summaries(self, job_ids: Iterable[str]) -> Iterator[JobRecord]:
        """Listing records for many jobs, ``BATCH`` ids per round trip; ids whose record is
        gone are skipped."""
        ids = list(job_ids)
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in batch:
                pipe.hmget(self.job_key(job_id), SUMMARY_FIELDS)
            for job_id, values in zip(batch, pipe.execute()):
                if values[_STATE_AT] is not None:  # no state: the record is gone
                    fields = {k: v for k, v in zip(SUMMARY_FIELDS, values) if v is not None}
                    yield decode(job_id, fields)


def _field_text(value: object) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)
