"""Job records in Redis, apart from Celery's results: the only writer of a job hash.

Celery's results expire and say PENDING for ids they never saw, so the farm keeps its own
record of every job: a hash per job plus sorted-set indexes by submission time. Every change
of a record is a method here named for what it means (create, claim, renew, finish, lose,
cancel, fail, restart...), and every change of state goes through a Lua script that checks
the job's attempt and state against :data:`~celeryfarm.records.states.TRANSITIONS`
atomically, so a node finishing a step and an artist stopping the job can never both win.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from .. import redisclient
from ..capture import Push
from ..config import STORE_SOCKET_TIMEOUT
from ..errors import CorruptRecord, JobNotFound
from ..jobs import JobRecord, Listed
from ..metrics import STEP_BUCKETS
from ..tls import Tls
from . import fields as codec
from . import replication, states
from .keys import Keys, owner_of
from .replication import ReplicaWait
from .scripts import Scripts, in_transaction
from .states import TRANSITIONS, Event, sources_arg

if TYPE_CHECKING:
    from ..config import Settings

logger = logging.getLogger(__name__)
#: Ids per pipeline round trip when reading many records.
BATCH = 1000
#: Jobs whose latest change the change feed keeps (listings behind it read afresh).
CHANGES_KEPT = 10_000
#: How long a listing snapshot (``Keys.snapshot``) outlives its last writing: an artist
#: back after a longer break has their first listing read afresh.
SNAPSHOT_SECONDS = 7 * 24 * 3600
#: The step histogram's bucket bounds, as the scripts spell them in the stats hash's fields.
STEP_BOUNDS = ",".join(f"{bound:g}" for bound in STEP_BUCKETS)


def connect(url: str, tls: Tls | None = None, master: str = "",
            sentinel_password: str = "") -> redis.Redis:
    """A Redis client that survives broker restarts and failovers: keepalive, health checks
    and retries, and timeouts so an unreachable Redis is an error, not a hang; over TLS for
    ``rediss://``, with Redis's certificate verified; through the sentinels to the primary
    ``master`` for ``sentinel://`` (sentinels that may ask ``sentinel_password``)."""
    return redisclient.client(
        url, tls, master, sentinel_password,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=STORE_SOCKET_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


@dataclasses.dataclass(frozen=True)
class Token:
    """What makes one execution of a step current (its fencing token)."""

    job_id: str
    attempt: int
    dispatch: int
    step: int


@dataclasses.dataclass(frozen=True)
class Loss:
    """A lost step, as ``reap.lua`` and ``rescue.lua`` report it; a FAILING one comes with
    the caller's hold on it (see :meth:`JobStore.fail_lost`)."""

    job_id: str
    outcome: states.LossOutcome
    step: int = 0
    node: str = ""
    lost: int = 0
    cause: str = ""
    hold: str = ""
    attempt: int = 0

    @classmethod
    def parse(cls, reply: list[str]) -> Loss:
        job_id, outcome, *rest = reply
        if not rest:
            return cls(job_id, states.LossOutcome(outcome))
        step, node, lost, cause, hold, attempt = [*rest, "", 0][:6]
        return cls(job_id, states.LossOutcome(outcome), int(step), node, int(lost), cause,
                   hold, int(attempt))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _seconds_arg(seconds: float | None) -> str:
    return "" if seconds is None else repr(float(seconds))


class JobStore:
    """Reads and writes job records. Safe to share between threads."""

    def __init__(self, client: redis.Redis, prefix: str = "celeryfarm",
                 wait: ReplicaWait = replication.NO_WAIT,
                 broker: redis.Redis | None = None) -> None:
        """``broker``: the broker's Redis when it is not ``client``'s (a farm with its own
        ``CELERYFARM_STORE_URL``); messages then go there in a write of their own."""
        self.redis = client
        self.broker = broker
        self.keys = Keys(prefix)
        self.scripts = Scripts(client)
        #: With a replicated Redis, the writes the farm acknowledges wait for replicas
        #: (see :mod:`celeryfarm.records.replication`).
        self.wait = wait

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """The store at the farm's records URL."""
        def client(url: str) -> redis.Redis:
            return connect(url, settings.tls, settings.sentinel_master,
                           settings.sentinel_password)

        apart = settings.records_url != settings.broker_url
        return cls(client(settings.records_url), settings.key_prefix, ReplicaWait.of(settings),
                   client(settings.broker_url) if apart else None)

    # -- creating ----------------------------------------------------------------------------
    def create(self, record: JobRecord, dispatching: bool = True,
               pushes: Sequence[Push] = ()) -> None:
        """Store a new record and its history, put it in its owner's index and change feed,
        in one write: what an artist's credential may write (see :meth:`Keys.owned`). A
        dispatching record also goes into the inbox, from which render nodes index it in
        the shared indexes (``adopt.lua``); one that is not (an import, a test) is indexed
        here, which needs a credential that may write those. ``pushes``, the messages of
        its first dispatch (:func:`celeryfarm.dispatch.compose`), go in the same write,
        and the record says its dispatch was sent."""
        if not dispatching:
            self._add(self.scripts.create, record, shared=True)
            return
        sent = ("sent", record.dispatch) if pushes else ()

        def write(pipe: redis.client.Pipeline) -> None:
            self._add(functools.partial(in_transaction, pipe, self.scripts.create), record,
                      shared=False, extra=sent)
            # In the same write, outside the script: an artist may push to the inbox and
            # the queues, but not name them in a script.
            pipe.rpush(self.keys.inbox, record.job_id)

        self._write(write, pushes, record_first=True, what=f"job {record.job_id} submitted")

    def create_many(self, records: Iterable[JobRecord]) -> None:
        """Store and index many records as they are, ``BATCH`` per round trip, and nothing
        else: for importing a history (the benchmarks write 10,000 jobs this way)."""
        records = list(records)
        for start in range(0, len(records), BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for record in records[start:start + BATCH]:
                self._add(functools.partial(self.scripts.create, client=pipe), record,
                          shared=True)
            pipe.execute()

    def _add(self, create: Callable[..., object], record: JobRecord, shared: bool,
             extra: Sequence[object] = ()) -> None:
        """Run create.lua for ``record`` through ``create`` (the script, or it on a
        pipeline): its owner's index, and the ``shared`` ones (all jobs', its session's)
        too if asked; ``extra`` fields (name, value...) go in its hash too."""
        indexes = [self.keys.index("user", record.spec.user)] if record.spec.user else []
        if shared:
            indexes.append(self.keys.index())
            if record.spec.session:
                indexes.append(self.keys.index("session", record.spec.session))
        fields = [part for pair in codec.encode(record).items() for part in pair]
        create(keys=[self.keys.job(record.job_id), self.feed(record.job_id),
                     self.keys.events(record.job_id), *indexes],
               args=[record.job_id, record.submitted_ms, codec.encode_submission(record),
                     *fields, *extra])

    def feed(self, job_id: str) -> str:
        """The change feed a job's changes go in: its owner's."""
        return self.keys.changes(owner_of(job_id))

    def adopt(self, age_ms: int, limit: int = 100) -> list[tuple[str, str]]:
        """Take jobs from the inbox into the shared indexes, and into the awaiting set once
        their client has sent them, or the outbox if it has not for ``age_ms`` (render
        nodes; see ``adopt.lua``). Returns each job's (id, what was done)."""
        job_ids = list(dict.fromkeys(self.redis.lrange(self.keys.inbox, 0, limit - 1)))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "session")
        done = []
        for job_id, session in zip(job_ids, pipe.execute()):
            index = self.keys.index("session", session) if session else self.keys.index()
            done.append((job_id, self.scripts.adopt(
                keys=[self.keys.inbox, self.keys.job(job_id), self.keys.index(), index,
                      self.keys.outbox, self.keys.awaiting],
                args=[job_id, age_ms])))
        return done

    # -- dispatching -------------------------------------------------------------------------
    def sent(self, job_id: str, dispatch: int, task_ids: Iterable[str],
             by_node: bool = True, pushes: Sequence[Push] = ()) -> None:
        """Record the Celery ids a dispatch sent and its number (in the owner's change feed:
        listings settle active jobs by their task ids), with ``pushes``, its messages
        (:func:`celeryfarm.dispatch.compose`), in one write; a render node also takes the
        job out of the outbox and makes its next step await a node in it. A client's job
        is taken into those shared sets by a node (:meth:`adopt`)."""
        shared = [self.keys.outbox, self.keys.awaiting] if by_node else []
        self._write(functools.partial(
            in_transaction, script=self.scripts.sent,
            keys=[self.keys.job(job_id), self.feed(job_id), *shared],
            args=[job_id, json.dumps(list(task_ids)), dispatch]),
            pushes, record_first=False, what=f"job {job_id} sent")

    def _write(self, write: Callable[[redis.client.Pipeline], None], pushes: Sequence[Push],
               record_first: bool, what: str) -> None:
        """Queue ``write`` and the messages ``pushes`` as one transaction, waiting for the
        replicas in the same round trip (``what`` names it in the log if they do not have
        it in time). With the broker apart they cannot be one write: a new job's record
        goes first (a node that took its message before could not find it), a dispatch's
        messages before it is recorded as sent (until then the outbox still has it)."""
        def with_pushes(pipe: redis.client.Pipeline) -> None:
            write(pipe)
            for push in pushes:
                pipe.lpush(push.key, push.payload)

        if self.broker is None:
            replication.transaction(self.redis, with_pushes, self.wait, what)
            return
        if not record_first:
            self._push(pushes)
        replication.transaction(self.redis, write, self.wait, what)
        if record_first:
            self._push(pushes)

    def _push(self, pushes: Sequence[Push]) -> None:
        """Send messages to a broker apart from the records."""
        if pushes:
            messages = self.broker.pipeline(transaction=True)
            for push in pushes:
                messages.lpush(push.key, push.payload)
            messages.execute()

    def unsendable(self, job_id: str) -> None:
        """Take a job whose dispatch must not be sent (it ended meanwhile) out of the
        outbox."""
        self.redis.zrem(self.keys.outbox, job_id)

    def stale_outbox(self, age_ms: int, limit: int = 100) -> list[str]:
        """Jobs whose dispatch was recorded ``age_ms`` ago or more and never sent; each is
        claimed for the caller to send again."""
        return self.scripts.stale_outbox(keys=[self.keys.outbox], args=[age_ms, limit])

    # -- a step's execution (render nodes) ---------------------------------------------------
    def _step_keys(self, job_id: str) -> list[str]:
        """KEYS[1..4] of the step scripts: job hash, leases, events, awaiting (the scripts
        that need fewer take the first ones)."""
        return [self.keys.job(job_id), self.keys.leases, self.keys.events(job_id),
                self.keys.awaiting]

    def claim(
        self, token: Token, owner: str, node: str, lease_ms: int, limit_wait_ms: int = 0,
        commands: Sequence[Sequence[str]] | None = None,
    ) -> tuple[states.ClaimStatus, str, JobRecord | None]:
        """Start an execution of a step: (OK, "", the job's record) or (why not, detail,
        None). A step over one of its job's limits is re-dispatched ``limit_wait_ms`` later
        (LIMITED). ``commands`` (a step message's, from its step on) must be the record's,
        else nothing changes (FORGED)."""
        claim = TRANSITIONS[Event.CLAIM]
        status, detail, *record = self._acknowledged(
            self.scripts.claim, f"job {token.job_id} step {token.step} claimed",
            keys=[*self._step_keys(token.job_id), self.keys.limits, self.keys.limit_holders,
                  self.keys.retries, self.feed(token.job_id)],
            args=[token.job_id, token.attempt, token.dispatch, token.step, owner, node,
                  lease_ms, sources_arg(Event.CLAIM), claim.target, limit_wait_ms,
                  "" if commands is None else json.dumps(list(commands))])
        if status != states.ClaimStatus.OK:
            return states.ClaimStatus(status), detail, None
        flat, history = record
        return states.ClaimStatus.OK, detail, codec.decode_flat(token.job_id, flat, history)

    def renew(self, token: Token, owner: str, lease_ms: int,
              frames: Sequence[int] = ()) -> states.FailureKind | None:
        """Renew a running step's lease, counting the ``frames`` it reported done since the
        last renewal: None, or why the step must stop."""
        status = self.scripts.renew(
            keys=[*self._step_keys(token.job_id)[:2],
                  self.keys.frames_done(token.job_id, token.attempt)],
            args=[token.job_id, token.attempt, token.dispatch, owner, lease_ms,
                  TRANSITIONS[Event.CLAIM].target, *frames])
        return None if status == "ok" else states.FailureKind(status)

    def finish(
        self, token: Token, owner: str, outcome: states.StepOutcome, last: bool = False,
        reason: str = "", seconds: float | None = None, frames: Sequence[int] = (),
    ) -> bool:
        """Record how an execution ended; False if it was no longer current (ignored).

        A success moves the job to its next step, and the last one completes it; a failure
        fails it; a revoke from outside cancels it; a stop only releases the lease (the job
        is Cancelled already); an abandoned step's lease expires now for a reaper. In the
        same write: how long the render ran (``seconds``, the farm's step histogram) and
        the ``frames`` it reported done since its last renewal.
        """
        event = {
            states.StepOutcome.FAILED: Event.FAIL,
            states.StepOutcome.REVOKED: Event.CANCEL,
            states.StepOutcome.SUCCEEDED: Event.COMPLETE if last else None,
        }.get(outcome)
        target = TRANSITIONS[event].target if event else ""
        succeeded = outcome == states.StepOutcome.SUCCEEDED
        next_step = token.step + 1 if succeeded else ""
        # The next step awaits a node from now on: Celery sends it once the task returns.
        awaited = sources_arg(Event.CLAIM) if succeeded and not last else ""
        return bool(self._acknowledged(
            self.scripts.finish, f"job {token.job_id} step {token.step} {outcome}",
            keys=[*self._step_keys(token.job_id), self.keys.stats,
                  self.keys.frames_done(token.job_id, token.attempt), self.feed(token.job_id)],
            args=[token.job_id, token.attempt, token.dispatch, token.step, owner,
                  outcome, int(outcome == states.StepOutcome.ABANDONED), next_step, target or "",
                  sources_arg(event) if event else "", reason, awaited,
                  _seconds_arg(seconds), STEP_BOUNDS, *frames]))

    def retry(self, token: Token, owner: str, delay_ms: int, counted: bool, why: str,
              seconds: float | None = None, frames: Sequence[int] = ()) -> int:
        """Record a failed try of a step that runs again in ``delay_ms``: a new dispatch of
        the same step, sent by a reaper when due (:meth:`due`). ``counted`` tries use a
        retry, the others (no licence) do not; ``seconds`` and ``frames`` as for
        :meth:`finish`. Returns the try's counter after it, 0 if the execution was no longer
        current or the job was stopped meanwhile."""
        retry = TRANSITIONS[Event.RETRY]
        return int(self._acknowledged(
            self.scripts.retry, f"job {token.job_id} step {token.step} to retry",
            keys=[*self._step_keys(token.job_id)[:3], self.keys.retries, self.keys.stats,
                  self.keys.frames_done(token.job_id, token.attempt), self.feed(token.job_id)],
            args=[token.job_id, token.attempt, token.dispatch, token.step, owner, delay_ms,
                  "failures" if counted else "licence_waits", sources_arg(Event.RETRY),
                  retry.target, why, _seconds_arg(seconds), STEP_BOUNDS, *frames]))

    def avoid(self, token: Token, owner: str, node: str, pool: str, live_ms: int,
              bad_after: int) -> str:
        """Hand a claimed step on if ``node`` is bad for the job (``bad_after`` failed
        tries there) and another live node of ``pool`` is not: the step is re-dispatched
        at once (a reaper sends it). Returns that other node, or "" to run the step here."""
        retry = TRANSITIONS[Event.RETRY]
        return self.scripts.avoid(
            keys=[*self._step_keys(token.job_id)[:3], self.keys.retries,
                  self.keys.pool_nodes(pool), self.feed(token.job_id)],
            args=[token.job_id, token.attempt, token.dispatch, token.step, owner, node,
                  live_ms, bad_after, sources_arg(Event.RETRY), retry.target])

    def heartbeat(self, node: str, pools: Sequence[str], consuming: Iterable[str],
                  running: Sequence[str]) -> bool:
        """Say that ``node`` is alive, has ``pools``, takes steps of those it is
        ``consuming`` (unless drained) and runs the steps ``running`` (task ids); True if
        it is drained."""
        keys = [self.keys.nodes, self.keys.node(node), self.keys.drained,
                *(self.keys.pool_nodes(pool) for pool in pools)]
        return bool(self.scripts.heartbeat(keys=keys, args=[
            node, ",".join(pools), json.dumps(list(running)), ",".join(consuming)]))

    def forget_node(self, node: str, pools: Sequence[str], live_ms: int) -> tuple[int, bool]:
        """Forget ``node`` (of ``pools``) unless it was seen within ``live_ms``: (ms since
        it was last seen, -1 if unknown; whether it was forgotten). See ``forget_node.lua``."""
        keys = [self.keys.nodes, self.keys.node(node), self.keys.drained,
                *(self.keys.pool_nodes(pool) for pool in pools)]
        silent, forgotten = self.scripts.forget_node(keys=keys, args=[node, live_ms])
        return int(silent), bool(forgotten)

    # -- farm statistics (celeryfarm metrics) ------------------------------------------------
    def stats(self) -> dict[str, float]:
        """The farm's counters and histogram fields."""
        return {name: float(value) for name, value in self.redis.hgetall(self.keys.stats).items()}

    def states(self) -> dict[str, int]:
        """How many jobs are in each state."""
        ids = self.ids()
        counts: dict[str, int] = {}
        for start in range(0, len(ids), BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids[start:start + BATCH]:
                pipe.hget(self.keys.job(job_id), "state")
            for state in pipe.execute():
                if state is not None:
                    counts[state] = counts.get(state, 0) + 1
        return counts

    # -- limits ------------------------------------------------------------------------------
    def set_limit(self, name: str, units: int) -> None:
        """Let steps hold at most ``units`` of limit ``name`` at once."""
        self.redis.hset(self.keys.limits, name, units)

    def limits(self) -> dict[str, tuple[int, int]]:
        """Each limit's (units, units held by steps whose lease is live now)."""
        units = {name: int(value) for name, value in self.redis.hgetall(self.keys.limits).items()}
        holders = self.redis.zrange(self.keys.limit_holders, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for holder in holders:
            pipe.zscore(self.keys.leases, holder.split("|", 1)[1])
        seconds, micros = self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        held = dict.fromkeys(units, 0)
        for holder, deadline in zip(holders, pipe.execute()):
            name = holder.split("|", 1)[0]
            if deadline is not None and deadline > now_ms and name in held:
                held[name] += 1
        return {name: (units[name], held[name]) for name in sorted(units)}

    def due(self, limit: int = 100) -> list[str]:
        """Jobs whose retry is due, moved to the outbox for the caller to send."""
        return self.scripts.due(keys=[self.keys.retries, self.keys.outbox], args=[limit])

    def abandon(self, job_id: str, owner_prefix: str) -> bool:
        """Expire now the lease held by an execution whose owner starts with
        ``owner_prefix`` (its pool process was lost), so a reaper re-dispatches the step."""
        return bool(self.scripts.abandon(keys=self._step_keys(job_id)[:2],
                                         args=[job_id, owner_prefix]))

    # -- lost steps (reapers) ----------------------------------------------------------------
    def expired(self, limit: int = 100) -> list[str]:
        """Jobs whose running step's lease has expired, by Redis's clock."""
        return self.scripts.expired(keys=[self.keys.leases], args=[limit, 0])

    def awaiting(self, age_ms: int) -> list[tuple[Token, str]]:
        """The steps that have awaited a node for ``age_ms`` or more (since they were sent,
        or since the step before them succeeded), each with its queue ("" for the default);
        the jobs whose step no longer awaits one are forgotten on the way."""
        job_ids = self.scripts.expired(keys=[self.keys.awaiting], args=[-1, age_ms])
        if not job_ids:
            return []
        reply = self.scripts.forget(
            keys=[self.keys.awaiting, *(self.keys.job(job_id) for job_id in job_ids)],
            args=[sources_arg(Event.CLAIM), *job_ids])
        return [(Token(job_id, int(attempt), int(dispatch), int(step)), queue)
                for job_id, attempt, dispatch, step, queue in reply]

    def lose(self, job_id: str, max_losses: int, hold_ms: int, cause: str) -> Loss | None:
        """Lose the step of a job whose lease expired: re-dispatch it, or after
        ``max_losses`` in a row hold it for ``hold_ms`` (FAILING) until the caller has said
        why in the log and calls :meth:`fail_lost`. None if its lease was renewed or another
        reaper took it."""
        reply = self.scripts.reap(
            keys=[self.keys.leases, self.keys.job(job_id), self.keys.events(job_id),
                  self.keys.outbox, self.keys.stats],
            args=[job_id, max_losses, sources_arg(Event.LOSE), hold_ms, cause])
        return Loss.parse(reply) if reply else None

    def fail_lost(self, loss: Loss, reason: str) -> bool:
        """Fail the job of a FAILING loss for ``reason`` and release the hold on its step;
        False if the hold had expired (another reaper took the step) or the job had moved
        on (cancelled, restarted)."""
        job_id = loss.job_id
        return bool(self._acknowledged(
            self.scripts.fail_lost, f"job {job_id} failed",
            keys=[self.keys.job(job_id), self.keys.leases, self.keys.events(job_id),
                  self.feed(job_id)],
            args=[job_id, loss.hold, loss.attempt, loss.lost, reason, sources_arg(Event.FAIL),
                  TRANSITIONS[Event.FAIL].target]))

    def rescue(self, token: Token, max_losses: int, hold_ms: int, cause: str) -> Loss:
        """Lose a step whose message a worker took and never started, or whose message
        vanished, unless the token is no longer current (STALE) or the step runs after all
        (LEASED); a FAILING one is held as by :meth:`lose`."""
        job_id = token.job_id
        return Loss.parse(self.scripts.rescue(
            keys=[self.keys.job(job_id), self.keys.events(job_id), self.keys.outbox,
                  self.keys.leases, self.keys.stats],
            args=[job_id, token.attempt, token.dispatch, token.step, max_losses,
                  sources_arg(Event.LOSE), hold_ms, cause]))

    # -- client-side changes -----------------------------------------------------------------
    def cancel(self, job_id: str, attempt: int, reason: str) -> bool:
        """Cancel attempt ``attempt`` of an active job; False if it is not (any more)."""
        return self._transition(Event.CANCEL, job_id, attempt,
                                {"end": _now_ms(), "reason": reason})

    def fail(self, job_id: str, attempt: int, reason: str) -> bool:
        """Fail attempt ``attempt`` of an active job; False if it is not (any more)."""
        return self._transition(Event.FAIL, job_id, attempt,
                                {"end": _now_ms(), "reason": reason})

    def restart(self, record: JobRecord, previous_attempt: int) -> bool:
        """Start a finished job again as ``record``'s (new) attempt and dispatch, and put it
        in the inbox; False if it was not finished or someone restarted it first."""
        fresh = {**codec.attempt_fields(record), "lost": None, "failures": None,
                 "licence_waits": None, "frames_done": None,
                 "submitted": record.submitted_ms,
                 "start": None, "end": None, "step": None, "node": None, "reason": None}
        return self._transition(Event.RESTART, record.job_id, previous_attempt, fresh,
                                dispatching=True)

    def _transition(
        self, event: Event, job_id: str, attempt: int, changes: dict[str, object],
        dispatching: bool = False,
    ) -> bool:
        args: list[object] = [job_id, attempt, sources_arg(event), TRANSITIONS[event].target]
        for name, value in changes.items():
            args += [name, codec.text(value)]
        keys = [self.keys.job(job_id), self.feed(job_id)]
        if dispatching:
            def write(pipe: redis.client.Pipeline) -> None:
                in_transaction(pipe, self.scripts.transition, keys=keys, args=args)
                # In the same write, outside the script: an artist may push to the inbox,
                # but not name it in a script. An entry for a change refused is harmless
                # (adopt.lua). Replicas: its dispatch's sent() follows, and waits for them.
                pipe.rpush(self.keys.inbox, job_id)

            applied = replication.transaction(self.redis, write, replication.NO_WAIT,
                                              f"job {job_id} {event}")[0]
        else:
            applied = self._acknowledged(self.scripts.transition, f"job {job_id} {event}",
                                         keys=keys, args=args)
        if applied == -1:
            raise JobNotFound(job_id)
        return applied == 1

    def _acknowledged(self, script: Script, what: str, keys: Sequence[object],
                      args: Sequence[object]) -> Any:
        """Run a script whose write the farm acknowledges (a submission, a step's start or
        end, a stop): with replicas, only once they have it (``what`` names it in the log
        if they do not in time; see :mod:`celeryfarm.records.replication`)."""
        return replication.run(self.redis, script, keys, args, self.wait, what)

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id)).get(self.keys.events(job_id))
        fields, history = pipe.execute(raise_on_error=False)
        if isinstance(fields, Exception):
            raise fields
        if not fields:
            raise JobNotFound(job_id)
        # A record from before has its commands in the hash and its events in a list.
        return codec.decode(job_id, fields, history if isinstance(history, str) else None)

    def get_field(self, job_id: str, name: str) -> str | None:
        return self.redis.hget(self.keys.job(job_id), name)

    def log_path(self, job_id: str) -> str:
        """The job's render log, relative to the shared root (one cheap read); raises
        ``JobNotFound``."""
        state, log, context = self.redis.hmget(self.keys.job(job_id), "state", "log", "context")
        if state is None:
            raise JobNotFound(job_id)
        return log or codec.default_log(job_id, context or "")

    def state(self, job_id: str) -> states.JobState | None:
        """The job's stored state, or None if there is no such job (one cheap read)."""
        value = self.get_field(job_id, "state")
        return None if value is None else states.JobState(value)

    def lease_owners(self, job_ids: Sequence[str]) -> list[str | None]:
        """Who holds the lease of each job's running step (:func:`~celeryfarm.lease.lease_owner`):
        "" when none does, None when there is no such job. One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "state", "lease_owner")
        return [None if state is None else owner or ""
                for state, owner in pipe.execute()]

    def events(self, job_id: str) -> list[dict]:
        """The job's step executions (starts, ends, losses), oldest first."""
        key = self.keys.events(job_id)
        if self.redis.type(key) == "list":  # a record from before
            return codec.decode_events(job_id, self.redis.lrange(key, 0, -1))
        return codec.decode_events(job_id, (self.redis.get(key) or "").splitlines())

    def ids(self, kind: str = "all", value: str = "") -> list[str]:
        """Job ids of an index, newest first."""
        return self.redis.zrevrange(self.keys.index(kind, value), 0, -1)

    def ids_with(self, owner: str) -> list[str]:
        """Every job's id, newest first, ``owner``'s included before a render node has
        indexed them (see :meth:`adopt`)."""
        found = self.redis.zunion([self.keys.index(), self.keys.index("user", owner)],
                                  withscores=True)
        return [job_id for job_id, _ in sorted(found, key=lambda item: -item[1])]

    def summaries(self, job_ids: Iterable[str]) -> Iterator[JobRecord]:
        """Listing records for many jobs, ``BATCH`` ids per round trip; ids whose record is
        gone are skipped."""
        ids = list(job_ids)
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in batch:
                pipe.hmget(self.keys.job(job_id), codec.SUMMARY_FIELDS)
            for job_id, values in zip(batch, pipe.execute()):
                if values[codec.STATE_AT] is not None:  # no state: the record is gone
                    found = {k: v for k, v in zip(codec.SUMMARY_FIELDS, values) if v is not None}
                    try:
                        yield codec.decode(job_id, found)
                    except CorruptRecord as error:  # the others are still listed
                        logger.warning("%s", error)

    # -- listings (celeryfarm.listing) -------------------------------------------------------
    def index_at(self, owner: str) -> tuple[list[str], int]:
        """Where a listing of ``owner``'s jobs starts: their index's job ids, newest first,
        and their change feed's position, read together so no change after it is missed."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrevrange(self.keys.index("user", owner), 0, -1)
        pipe.zscore(self.keys.changes(owner), "")
        ids, position = pipe.execute()
        return ids, int(position or 0)

    def changes_since(self, owner: str, position: int) -> tuple[list[str], int] | None:
        """The jobs of ``owner``'s change feed changed after ``position``, and the feed's
        position now; None when the feed no longer reaches back that far (trimmed, or Redis
        lost it): the caller lists afresh."""
        feed = self.keys.changes(owner)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrangebyscore(feed, f"({position}", "+inf")
        pipe.zscore(feed, "")
        pipe.hget(self.keys.stats, _floor_field(owner))
        changed, now, floor = pipe.execute()
        now = int(now or 0)
        if int(floor or 0) > position or now < position:
            return None
        return [job_id for job_id in changed if job_id], now

    def snapshot(self, owner: str) -> tuple[int, list[Listed]] | None:
        """The change feed position and jobs of ``owner``'s listing snapshot; None if there
        is none (or one that does not decode)."""
        text = self.redis.get(self.keys.snapshot(owner))
        return codec.decode_snapshot(text) if text else None

    def save_snapshot(self, owner: str, position: int, jobs: Sequence[Listed]) -> None:
        """Write ``owner``'s listing snapshot (nothing if a value cannot be kept in one)."""
        text = codec.encode_snapshot(position, jobs)
        if text is not None:
            self.redis.set(self.keys.snapshot(owner), text, ex=SNAPSHOT_SECONDS)

    def in_index(self, kind: str, value: str, job_ids: Sequence[str]) -> list[bool]:
        """Whether each job is in an index."""
        if not job_ids:
            return []
        scores = self.redis.zmscore(self.keys.index(kind, value), list(job_ids))
        return [score is not None for score in scores]

    def listed(self, jobs: Sequence[str]) -> list[tuple[str, Listed | None]]:
        """What listings show of each job, read in one round trip (listing.lua, ``BATCH``
        jobs a call); None for a job whose record is gone or corrupt (reported)."""
        pipe = self.redis.pipeline(transaction=False)
        script = self.scripts.listing
        pipe.scripts.add(script)  # the pipeline loads it first where Redis lacks it
        for start in range(0, len(jobs), BATCH):
            keys = [self.keys.job(job_id) for job_id in jobs[start:start + BATCH]]
            # Read only (EVALSHA_RO): an artist may read, not write, others' records, and
            # Redis checks a plain EVALSHA's keys for both.
            pipe.evalsha_ro(script.sha, len(keys), *keys, *codec.LISTING_FIELDS)
        packed = [text for batch in pipe.execute() for text in batch] if jobs else []
        found: list[tuple[str, Listed | None]] = []
        for job_id, text in zip(jobs, packed):
            try:
                listed = codec.decode_listed(job_id, text) if text else None
                if text and listed is None:  # a separator inside a value: field by field
                    values = self.redis.hmget(self.keys.job(job_id), codec.LISTING_FIELDS)
                    listed = codec.decode_listed_values(job_id, [v or "" for v in values])
            except CorruptRecord as error:  # the others are still listed
                logger.warning("%s", error)
                listed = None
            found.append((job_id, listed))
        return found

    # -- retention (reapers) -----------------------------------------------------------------
    def submitted_before(self, before_ms: int, start: str | int, limit: int
                         ) -> list[tuple[str, int]]:
        """Up to ``limit`` (job id, submission time) of jobs submitted from ``start`` (a
        submission time, or "-inf") up to ``before_ms``, oldest first: the only jobs that
        can have finished before then."""
        return self.redis.zrangebyscore(self.keys.index(), start, before_ms, start=0,
                                        num=limit, withscores=True, score_cast_func=int)

    def retire(self, job_ids: Sequence[str], keep_ms: int,
               result_key: Callable[[str], str]) -> list[str]:
        """Take the jobs among ``job_ids`` that finished more than ``keep_ms`` ago (by
        Redis's clock) out of Redis with all their keys, and Celery's results of their
        steps (``result_key`` names one by task id); returns those that left. Two round
        trips, whatever the number of jobs."""
        if not job_ids:
            return []
        wanted = ("state", "user", "session", "attempt", "task_ids")
        finished = sources_arg(Event.RESTART)  # the finished states: a restart leaves them
        pipe = self.redis.pipeline(transaction=False)
        candidates = []
        for job_id, (state, user, session, attempt, task_ids) in zip(
                job_ids, self._read(job_ids, wanted)):
            if state not in finished.split(","):
                continue
            indexes = [self.keys.index()]
            indexes += [self.keys.index("user", user)] if user else []
            indexes += [self.keys.index("session", session)] if session else []
            sets = [*indexes, self.keys.leases, self.keys.awaiting, self.keys.outbox,
                    self.keys.retries]
            try:
                attempts = range(1, int(attempt or 1) + 1)
                results = [result_key(task_id) for task_id in json.loads(task_ids or "[]")]
            except ValueError:  # a corrupt record leaves with what can be named
                attempts, results = range(1, 2), []
            gone = [self.keys.events(job_id),
                    *(self.keys.frames_done(job_id, number) for number in attempts), *results]
            self.scripts.retire(
                keys=[self.keys.job(job_id), self.feed(job_id), self.keys.missing,
                      self.keys.inbox, self.keys.scratch, *sets, *gone],
                args=[job_id, keep_ms, finished, len(sets)], client=pipe)
            candidates.append(job_id)
        left = pipe.execute() if candidates else []
        return [job_id for job_id, done in zip(candidates, left) if done]

    def _read(self, job_ids: Sequence[str], wanted: Sequence[str]) -> list[list[str | None]]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), wanted)
        return pipe.execute()

    def trim_changes(self, owner: str, keep: int = CHANGES_KEPT) -> int:
        """Keep ``owner``'s change feed to the latest changes of ``keep`` jobs; returns how
        many entries left it."""
        return int(self.scripts.trim_changes(keys=[self.keys.changes(owner), self.keys.stats],
                                             args=[keep, _floor_field(owner)]))


def _floor_field(owner: str) -> str:
    """The stats field that holds the change number below which ``owner``'s feed was
    trimmed."""
    return f"changes_floor:{owner}"
