"""Leases and fencing: a lost node's step runs again elsewhere, and never twice at once.

Celery on Redis alone would leave a lost node's step waiting for the broker's visibility
timeout (longer than the longest render) and could then run it beside the original. Instead:

* A step runs under a *fencing token*: the job's attempt and dispatch numbers plus the step
  index. :meth:`StepLease.claim` starts it only if that token is current, the step is the
  job's next one, and no other execution holds a live lease on it.
* While it runs, a thread in the pool process renews its *lease* (a deadline in a Redis sorted
  set) every poll. The same call says whether the job was stopped or the step given to
  someone else. If renewals fail for a lease period, the step stops writing to the render log
  and kills its render: it can no longer be sure it is current.
* Every worker's main process runs a :class:`Reaper`. One Lua script pops expired leases and
  bumps the job's dispatch number atomically, so two reapers can never dispatch the same step
  twice; the reaper then re-sends the remaining steps. A step lost on too many nodes in a row
  fails the job.
* Only the current token's execution can record a step's outcome; a superseded node's result
  is dropped.

All times in the scripts come from Redis's own clock, so nodes' clocks need not agree.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery

from . import dispatch
from .celery import RENDER_STEP
from .config import Settings
from .jobs import JobNotFound, JobRecord, State
from .paths import SharedRoot
from .renderlog import append
from .store import JobStore, connect, decode

logger = logging.getLogger(__name__)

#: Stale outbox entries are re-sent after this long (the sender must have died).
OUTBOX_SECONDS = 10.0
#: Where kombu's Redis transport keeps messages taken but not yet acknowledged.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: job hash, leases, events. ARGV: job id, attempt, dispatch, step, owner, node, lease ms.
_CLAIM = _NOW + """
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'next_step',
                     'lease_owner')
if not f[1] then return {'gone', ''} end
if f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then
  return {'superseded', 'the job is on attempt ' .. f[2] .. ', dispatch ' .. f[3]}
end
if f[1] ~= 'Waiting' and f[1] ~= 'Running' then return {'finished', 'the job is ' .. f[1]} end
if f[4] ~= ARGV[4] then return {'done', 'the next step is ' .. f[4]} end
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if f[5] and deadline and tonumber(deadline) > now then
  return {'duplicate', 'the step is running as ' .. f[5]}
end
redis.call('HSET', KEYS[1], 'state', 'Running', 'step', ARGV[4], 'node', ARGV[6],
           'lease_owner', ARGV[5])
redis.call('HSETNX', KEYS[1], 'start', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[1])
redis.call('RPUSH', KEYS[3], cjson.encode({event = 'start', step = tonumber(ARGV[4]),
  dispatch = tonumber(ARGV[3]), attempt = tonumber(ARGV[2]), owner = ARGV[5],
  node = ARGV[6], at = now}))
return {'ok', '', redis.call('HGETALL', KEYS[1])}  -- the record: no second read
"""

# KEYS: job hash, leases. ARGV: job id, attempt, dispatch, owner, lease ms.
_HEARTBEAT = _NOW + """
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'lease_owner')
if f[4] ~= ARGV[4] or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return 'superseded' end
if f[1] ~= 'Running' then return 'stopped' end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
return 'ok'
"""

# KEYS: job hash, leases, events. ARGV: job id, attempt, dispatch, step, owner, outcome,
# last ('1' or '0'), reason. Outcomes: succeeded, failed, stopped, revoked, abandoned.
_FINISH = _NOW + """
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'lease_owner')
if f[4] ~= ARGV[5] or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return 0 end
local outcome = ARGV[6]
redis.call('RPUSH', KEYS[3], cjson.encode({event = 'end', outcome = outcome,
  step = tonumber(ARGV[4]), dispatch = tonumber(ARGV[3]), attempt = tonumber(ARGV[2]),
  owner = ARGV[5], at = now}))
if outcome == 'abandoned' then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])  -- expired now: the next reaper re-dispatches
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_owner')
local active = f[1] == 'Running' or f[1] == 'Waiting'
if outcome == 'succeeded' then
  redis.call('HSET', KEYS[1], 'next_step', tonumber(ARGV[4]) + 1, 'lost', 0)
  if ARGV[7] == '1' and active then
    redis.call('HSET', KEYS[1], 'state', 'Completed', 'end', now)
  end
elseif outcome == 'failed' and active then
  redis.call('HSET', KEYS[1], 'state', 'Failed', 'end', now, 'reason', ARGV[8])
elseif outcome == 'revoked' and active then
  redis.call('HSET', KEYS[1], 'state', 'Cancelled', 'end', now, 'reason', ARGV[8])
end
return 1
"""

# KEYS: job hash, leases. ARGV: job id, owner prefix. Expire the lease now if an execution
# whose owner starts with the prefix holds it (its pool process was lost).
_ABANDON = """
local owner = redis.call('HGET', KEYS[1], 'lease_owner')
if owner and string.sub(owner, 1, #ARGV[2]) == ARGV[2] then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  return 1
end
return 0
"""

# Records that a job's current step was lost (on node, by owner): an event, and either a new
# dispatch in the outbox (the caller sends it) or, after too many losses in a row, failure.
_LOSE = """
local function lose(prefix, outbox, id, f, max_lost, now, cause)
  -- f: state, dispatch, next_step, lost, node, lease_owner, attempt
  local key = prefix .. ':job:' .. id
  local lost = tonumber(f[4] or '0') + 1
  local node = f[5] or ''
  redis.call('RPUSH', prefix .. ':events:' .. id, cjson.encode({event = 'lost',
    step = tonumber(f[3]), dispatch = tonumber(f[2]), attempt = tonumber(f[7]),
    owner = f[6] or '', node = node, lost = lost, at = now}))
  redis.call('HDEL', key, 'lease_owner')
  if lost >= max_lost then
    redis.call('HSET', key, 'state', 'Failed', 'end', now, 'lost', lost, 'reason',
      'step ' .. (tonumber(f[3]) + 1) .. ' was lost on ' .. lost .. ' nodes in a row')
    return {id, 'failed', f[3], node, tostring(lost), cause}
  end
  redis.call('HSET', key, 'dispatch', tonumber(f[2]) + 1, 'lost', lost, 'node', '')
  redis.call('ZADD', outbox, now, id)
  return {id, 'redispatched', f[3], node, tostring(lost), cause}
end
local FIELDS = {'state', 'dispatch', 'next_step', 'lost', 'node', 'lease_owner', 'attempt'}
"""

# KEYS: leases, outbox. ARGV: key prefix, max losses, batch size.
# Pops expired leases and loses the steps of active jobs. Returns {id, outcome, step, node,
# lost} for each.
_REAP = _NOW + _LOSE + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  local f = redis.call('HMGET', ARGV[1] .. ':job:' .. id, unpack(FIELDS))
  if f[1] == 'Running' or f[1] == 'Waiting' then
    table.insert(out, lose(ARGV[1], KEYS[2], id, f, tonumber(ARGV[2]), now,
                           'its lease expired'))
  end
end
return out
"""

# KEYS: outbox. ARGV: key prefix, max losses, job id, attempt, dispatch, step.
# For a message that a worker took and never started: 'stale' if its token is no longer
# current, 'leased' if the step is running, else the step is lost as by _REAP.
_RESCUE = _NOW + _LOSE + """
local f = redis.call('HMGET', ARGV[1] .. ':job:' .. ARGV[3], unpack(FIELDS))
if (f[1] ~= 'Running' and f[1] ~= 'Waiting') or f[7] ~= ARGV[4] or f[2] ~= ARGV[5]
   or f[3] ~= ARGV[6] then
  return {ARGV[3], 'stale'}
end
if f[6] then return {ARGV[3], 'leased'} end
return lose(ARGV[1], KEYS[1], ARGV[3], f, tonumber(ARGV[2]), now,
            'it took the step from the queue but never started it')
"""

# KEYS: outbox. ARGV: age ms, batch size. Claims outbox entries older than age.
_STALE_OUTBOX = _NOW + """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                         'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(stale) do redis.call('ZADD', KEYS[1], now, id) end
return stale
"""


class Scripts:
    """The lease scripts, registered once per Redis client."""

    def __init__(self, store: JobStore) -> None:
        client = store.redis
        self.claim = client.register_script(_CLAIM)
        self.heartbeat = client.register_script(_HEARTBEAT)
        self.finish = client.register_script(_FINISH)
        self.abandon = client.register_script(_ABANDON)
        self.reap = client.register_script(_REAP)
        self.rescue = client.register_script(_RESCUE)
        self.stale_outbox = client.register_script(_STALE_OUTBOX)


@dataclass(frozen=True)
class Token:
    """What makes one execution of a step current."""

    job_id: str
    attempt: int
    dispatch: int
    step: int


def _step_token(raw: str | None) -> Token | None:
    """The token of a render-step message as kombu stores it aside, or None."""
    try:
        message = json.loads(raw or "null")[0]
        if message["headers"].get("task") != RENDER_STEP:
            return None
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        kwargs = json.loads(body)[1]
        return Token(kwargs["job_id"], int(kwargs["attempt"]), int(kwargs["dispatch"]),
                     int(kwargs["step"]))
    except (TypeError, ValueError, KeyError, IndexError):
        return None


class StepLease:
    """The lease of one execution of a step, held by the pool process that runs it."""

    def __init__(
        self, store: JobStore, scripts: Scripts, settings: Settings, token: Token, owner: str
    ) -> None:
        self.store, self.scripts, self.settings = store, scripts, settings
        self.token, self.owner = token, owner
        self.lease_ms = int(settings.lease_seconds * 1000)
        # Stop trusting the lease this long before Redis would let it expire, so the render
        # is dead (grace period included) before another node can be given the step.
        self._margin = settings.stop_grace_seconds + settings.poll_seconds + 1.0
        self._valid_until = 0.0
        self._problem = ""
        self._kind = ""
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _keys(self) -> list[str]:
        job = self.token.job_id
        return [self.store.job_key(job), self.store.leases_key, self.store.events_key(job)]

    def claim(self, node: str) -> tuple[str, str, JobRecord | None]:
        """Try to start the step: ('ok', '', the job's record) or (why not, detail, None)."""
        t = self.token
        sent = time.monotonic()
        status, detail, *fields = self.scripts.claim(keys=self._keys(), args=[
            t.job_id, t.attempt, t.dispatch, t.step, self.owner, node, self.lease_ms])
        if status != "ok":
            return status, detail, None
        self._valid_until = sent + self.settings.lease_seconds
        flat = fields[0]
        return status, detail, decode(t.job_id, dict(zip(flat[::2], flat[1::2])))

    # -- while the step runs -----------------------------------------------------------------
    def keep(self) -> StepLease:
        """Start renewing the lease in a background thread; returns self for ``with``."""
        self._thread = threading.Thread(target=self._renew, name="celeryfarm-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> StepLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _renew(self) -> None:
        t = self.token
        keys = self._keys()[:2]
        while not self._done.wait(self.settings.poll_seconds):
            sent = time.monotonic()
            try:
                status = self.scripts.heartbeat(
                    keys=keys, args=[t.job_id, t.attempt, t.dispatch, self.owner, self.lease_ms])
            except redis.RedisError as error:
                logger.warning("cannot renew the lease of job %s: %s", t.job_id, error)
                continue
            if status == "ok":
                self._valid_until = sent + self.settings.lease_seconds
            elif status == "stopped":
                self._set_problem("stopped", "stop requested")
            else:
                self._set_problem("superseded", "the step was given to another node")

    def _set_problem(self, kind: str, text: str) -> None:
        if not self._problem:
            self._kind, self._problem = kind, text

    def valid(self) -> bool:
        """Whether this execution may still act as current (write the log, go on). A stopped
        job's step stays current: no one else will be given it."""
        if self._kind == "stopped":
            return True
        return self._kind != "superseded" and (
            time.monotonic() < self._valid_until - self._margin)

    def stop_reason(self) -> str:
        """Why the render must stop now, or "" (cheap: no I/O; the thread does that)."""
        if self._problem:
            return self._problem
        if not self.valid():
            self._set_problem("lapsed", f"no contact with the farm's Redis for "
                                        f"{self.settings.lease_seconds - self._margin:.0f} s")
            return self._problem
        return ""

    @property
    def problem_kind(self) -> str:
        """'' (none), 'stopped', 'superseded' or 'lapsed'."""
        return self._kind

    # -- when it ends ------------------------------------------------------------------------
    def finish(self, outcome: str, last: bool = False, reason: str = "") -> bool:
        """Record the execution's outcome; False if it was no longer current (ignored)."""
        t = self.token
        return bool(self.scripts.finish(keys=self._keys(), args=[
            t.job_id, t.attempt, t.dispatch, t.step, self.owner, outcome, int(last), reason]))


def abandon(store: JobStore, scripts: Scripts, job_id: str, owner_prefix: str) -> bool:
    """Expire now the lease held by an execution whose owner starts with ``owner_prefix``."""
    return bool(scripts.abandon(keys=[store.job_key(job_id), store.leases_key],
                                args=[job_id, owner_prefix]))


class Reaper(threading.Thread):
    """Re-dispatches steps whose lease expired; runs in every worker's main process.

    Every node runs one, so the farm keeps recovering whichever node dies; the Lua script
    makes each expired lease go to exactly one reaper.
    """

    def __init__(self, app: Celery, store: JobStore, settings: Settings) -> None:
        super().__init__(name="celeryfarm-reaper", daemon=True)
        self.app, self.store, self.settings = app, store, settings
        self.scripts = Scripts(store)
        self.broker = connect(settings.broker_url)
        self.root = SharedRoot(settings.shared_root)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.settings.reap_seconds):
            try:
                self.reap_once()
            except redis.RedisError as error:
                logger.warning("reaper: cannot reach Redis: %s", error)
            except Exception:
                logger.exception("reaper: unexpected error")

    def stop(self) -> None:
        self._done.set()

    def reap_once(self) -> list[tuple[str, str]]:
        """One pass: expired leases, stranded messages, stale outbox entries. Returns the
        (job, outcome) of each step it acted on."""
        lost = self.scripts.reap(
            keys=[self.store.leases_key, self.store.outbox_key],
            args=[self.store.prefix, self.settings.max_node_losses, 100])
        lost += self._rescue_stranded()
        for job_id, outcome, step, node, count, cause in lost:
            self._after_loss(job_id, outcome, int(step), node or "(unknown)", int(count), cause)
        stale = self.scripts.stale_outbox(keys=[self.store.outbox_key],
                                          args=[int(OUTBOX_SECONDS * 1000), 100])
        for job_id in stale:
            self._resend(job_id)
        return [(job_id, outcome) for job_id, outcome, *_ in lost] + [
            (job_id, "resent") for job_id in stale]

    def _rescue_stranded(self) -> list[list[str]]:
        """Steps whose message a worker took from the queue but never started.

        With late acknowledgement the broker keeps such a message aside ("unacked") until
        the visibility timeout, longer than any render, so if the worker died between
        taking it and claiming the step, nothing else would ever run it. A live worker
        claims within moments; a message aside for a lease period (a margin for clock skew,
        as the broker timestamps it with the taker's clock) whose step is current but
        unleased is treated as lost. One whose token is no longer current is dropped.
        """
        cutoff = time.time() - self.settings.lease_seconds
        tags = self.broker.zrangebyscore(UNACKED_INDEX, "-inf", cutoff, start=0, num=500)
        if not tags:
            return []
        lost = []
        for tag, raw in zip(tags, self.broker.hmget(UNACKED, tags)):
            token = _step_token(raw)
            if token is None:
                continue
            found = self.scripts.rescue(keys=[self.store.outbox_key], args=[
                self.store.prefix, self.settings.max_node_losses, token.job_id,
                token.attempt, token.dispatch, token.step])
            if found[1] == "stale":
                self.broker.pipeline().zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).execute()
            elif found[1] != "leased":
                lost.append(found)
        return lost

    def _after_loss(
        self, job_id: str, outcome: str, step: int, node: str, lost: int, cause: str
    ) -> None:
        try:
            record = self.store.get(job_id)
        except JobNotFound:
            return
        steps = len(record.spec.commands)
        label = f"step {step + 1}/{steps}"
        lines = [f"node {node} lost while running {label}: {cause} "
                 f"(loss {lost} of {self.settings.max_node_losses} allowed in a row)"]
        if outcome == "redispatched":
            lines.append(f"{label} re-dispatched (attempt {record.attempt}, "
                         f"dispatch {record.dispatch})")
        else:
            lines.append(f"job failed: {record.reason}")
        self._note(record.log_path, lines)
        if outcome == "redispatched":
            dispatch.send(self.app, self.store, record, resumed=True)

    def _resend(self, job_id: str) -> None:
        try:
            record = self.store.get(job_id)
        except JobNotFound:
            record = None
        if record is None or record.state not in State.ACTIVE:
            self.store.redis.zrem(self.store.outbox_key, job_id)
            return
        logger.warning("reaper: re-sending job %s dispatch %s from the outbox",
                       job_id, record.dispatch)
        dispatch.send(self.app, self.store, record)

    def _note(self, log_path: str, lines: list[str]) -> None:
        try:
            path: Path = self.root.join(log_path)
            for line in lines:
                append(path, line)
        except Exception as error:  # the log is for people; recovery must go on without it
            logger.warning("reaper: cannot write to the render log %s: %s", log_path, error)
