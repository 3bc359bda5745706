"""The reaper: every node's main process re-dispatches the steps of lost nodes.

Every node runs one, so the farm keeps recovering whichever node dies. Each pass:

* loses the steps whose lease expired (``reap.lua`` gives each expired lease to exactly one
  reaper): re-dispatched at the front of the queue, or the job fails after too many losses
  in a row. The render log says so first, then the job's state changes: Katana reads the
  log as soon as a job has ended;
* rescues steps whose message a dead worker took and never started (:mod:`.rescue`);
* once per lease period (one node at a time), rescues the steps whose message vanished:
  kombu takes a message from the queue before it sets it aside, so a worker killed in
  between takes it along, and a pool process killed after its step succeeded never sends
  the next. Every step awaits a node from its sending (or its previous step's success)
  until a node claims it; the reaper looks for the messages of steps that have awaited one
  for a lease period, and a message missing from two looks in a row is lost;
* sends again the dispatches recorded in the outbox whose sender died before sending them;
* sends the failed steps whose retry is due (:mod:`.retries`);
* takes out of Redis up to ``BATCH`` jobs that finished more than ``CELERYFARM_KEEP_DAYS``
  ago, with their Celery results (their render logs and frames stay on the shared mount),
  and keeps their owners' change feeds that listings read to their newest entries;
* kills the renders on its host whose step's process is gone (:mod:`.orphans`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import redis
from celery import Celery

from . import dispatch, orphans, rescue
from .config import Settings
from .errors import CorruptRecord, JobNotFound
from .paths import SharedRoot
from .records.keys import owner_of
from .records.states import ACTIVE, LossOutcome
from .records.store import JobStore, Loss, Token, connect
from .renderenv import RenderUser
from .renderlog import append

logger = logging.getLogger(__name__)

#: Stale outbox entries are re-sent after this long (the sender must have died).
OUTBOX_SECONDS = 10.0
#: Leases and outbox entries handled per pass.
BATCH = 100
DAY_MS = 24 * 3600 * 1000
EXPIRED = "its lease expired"
NEVER_STARTED = "it took the step from the queue but never started it"
VANISHED = "its message was lost before any node started it"


class Reaper(threading.Thread):
    """Re-dispatches lost steps, every ``reap_seconds``, in a worker's main process."""

    def __init__(self, app: Celery, store: JobStore, settings: Settings, node: str = "",
                 pools: tuple[str, ...] = (), running: Callable[[], list[str]] = list,
                 render_user: RenderUser | None = None) -> None:
        super().__init__(name="celeryfarm-reaper", daemon=True)
        self.app, self.store, self.settings = app, store, settings
        self.node, self.pools, self.running = node, pools, running
        self.render_user = render_user
        self.broker = connect(settings.broker_url, settings.tls, settings.sentinel_master,
                              settings.sentinel_password)
        self.root = SharedRoot(settings.shared_root)
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.keep_ms = int(settings.keep_days * DAY_MS)
        #: Where the next retention pass looks from (a submission time): jobs it passed over
        #: (still running, or restarted) are looked at again once it has reached the end.
        self._retire_from: str | int = "-inf"
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.settings.reap_seconds):
            try:
                self._heartbeat()
                self.reap_once()
                orphans.sweep(self.store, self.render_user)
            except redis.RedisError as error:
                logger.warning("reaper: cannot reach Redis: %s", error)
            except Exception:
                logger.exception("reaper: unexpected error")

    def _heartbeat(self) -> None:
        """Record this node as live: ``celeryfarm nodes`` lists it, and bad nodes hand
        steps on to it (:mod:`.retries`). Its pools are those it started with and any it
        was told to consume since (``add_consumer``)."""
        consuming = list(self.app.amqp.queues.consume_from)
        pools = tuple(dict.fromkeys([*self.pools, *consuming]))
        self.store.heartbeat(self.node, pools, consuming, self.running())

    def stop(self) -> None:
        self._done.set()

    def reap_once(self) -> list[tuple[str, str]]:
        """One pass: expired leases, stranded messages, the inbox of clients' jobs, stale
        outbox entries. Returns the
        (job, what was done) of each step it acted on."""
        lost = [loss for loss in map(self._lose, self.store.expired(BATCH)) if loss]
        lost += self._rescue_stranded()
        lost += self._rescue_vanished()
        for loss in lost:
            self._after_loss(loss)
        for job_id, outcome in self.store.adopt(int(OUTBOX_SECONDS * 1000), BATCH):
            if outcome == "stale":
                logger.warning("reaper: job %s was recorded by a client that never sent it",
                               job_id)
        stale = self.store.stale_outbox(int(OUTBOX_SECONDS * 1000), BATCH)
        for job_id in stale:
            self._resend(job_id, "re-sending job %s dispatch %s from the outbox")
        due = self.store.due(BATCH)
        for job_id in due:
            self._resend(job_id, "job %s: a failed step runs again (dispatch %s)")
        retired = self.retire_once()
        return [(loss.job_id, loss.outcome.value) for loss in lost] + [
            (job_id, "resent") for job_id in stale] + [(job_id, "retried") for job_id in due] + [
            (job_id, "retired") for job_id in retired]

    def retire_once(self) -> list[str]:
        """Take up to ``BATCH`` jobs that finished more than ``keep_days`` ago out of Redis
        (with their Celery results); returns their ids. Bounded work: each pass looks at
        the next ``BATCH`` jobs submitted before then, oldest first."""
        before = int(time.time() * 1000) - self.keep_ms
        jobs = self.store.submitted_before(before, self._retire_from, BATCH)
        self._retire_from = jobs[-1][1] if len(jobs) == BATCH else "-inf"
        retired = self.store.retire([job_id for job_id, _ in jobs], self.keep_ms,
                                    self.app.backend.get_key_for_task)
        if retired:
            logger.info("reaper: %d job(s) finished more than %g days ago left Redis",
                        len(retired), self.settings.keep_days)
        for owner in {owner_of(job_id) for job_id in retired}:
            self.store.trim_changes(owner)
        return retired

    def _lose(self, job_id: str) -> Loss | None:
        """Lose an expired lease's step; a record the script cannot read (corrupt) is
        reported and left, so it never stops the pass for the other jobs."""
        try:
            return self.store.lose(job_id, self.settings.max_node_losses, self.lease_ms,
                                   EXPIRED)
        except redis.ResponseError as error:
            logger.error("reaper: cannot lose the step of job %s (a corrupt record?): %s",
                         job_id, error)
            return None

    def _rescue_stranded(self) -> list[Loss]:
        """Steps whose message was set aside for a lease period (a margin for clock skew:
        the broker timestamps it with the taker's clock) and whose step is current but
        unleased are lost; a message whose token is no longer current is dropped."""
        cutoff = time.time() - self.settings.lease_seconds
        lost = []
        prefix = self.settings.broker_key_prefix
        for tag, token in rescue.stranded(self.broker, cutoff, prefix):
            loss = self._rescue(token, NEVER_STARTED)
            if loss.outcome == LossOutcome.STALE:
                rescue.drop(self.broker, tag, prefix)
            elif loss.outcome != LossOutcome.LEASED:
                lost.append(loss)
        return lost

    def _rescue_vanished(self) -> list[Loss]:
        """Steps that have awaited a node for a lease period and whose message is nowhere
        (in no queue, set aside by no worker) at two looks in a row: a live worker holds a
        message outside Redis for moments only. One node looks each lease period; the
        steps missing at a look are kept in Redis for the next look, whichever node's."""
        client, keys = self.store.redis, self.store.keys
        if not client.set(keys.look_turn, self.name, nx=True, px=self.lease_ms):
            return []
        awaiting = self.store.awaiting(self.lease_ms)
        present = rescue.message_ids(
            self.broker, {queue or self.settings.default_queue for _, queue in awaiting},
            self.settings.broker_key_prefix)
        missing = {token.job_id: dispatch.task_id(token) for token, _ in awaiting
                   if dispatch.task_id(token) not in present}
        before = client.hgetall(keys.missing)
        again = {job_id for job_id, task_id in missing.items() if before.get(job_id) == task_id}
        pipe = client.pipeline(transaction=True).delete(keys.missing)
        if len(again) < len(missing):
            pipe.hset(keys.missing, mapping={job_id: task_id for job_id, task_id
                                             in missing.items() if job_id not in again})
        pipe.execute()
        lost = []
        for token, _ in awaiting:
            if token.job_id in again:
                loss = self._rescue(token, VANISHED)
                if loss.outcome not in (LossOutcome.STALE, LossOutcome.LEASED):
                    # The record names the node of the step before, not the one that took it.
                    lost.append(dataclasses.replace(loss, node=""))
        return lost

    def _rescue(self, token: Token, cause: str) -> Loss:
        return self.store.rescue(token, self.settings.max_node_losses, self.lease_ms, cause)

    def _after_loss(self, loss: Loss) -> None:
        """Say in the render log that the step was lost, then act on it: send the new
        dispatch, or (FAILING, the step held by this reaper) fail the job. The log comes
        first: Katana and the tests read it as soon as the job has ended."""
        try:
            record = self.store.get(loss.job_id)
        except JobNotFound:
            return
        except CorruptRecord as error:
            logger.error("reaper: %s", error)
            return
        label = f"step {loss.step + 1}/{len(record.spec.commands)}"
        reason = f"step {loss.step + 1} was lost on {loss.lost} nodes in a row"
        lines = [f"node {loss.node or '(unknown)'} lost while running {label}: {loss.cause} "
                 f"(loss {loss.lost} of {self.settings.max_node_losses} allowed in a row)"]
        if loss.outcome == LossOutcome.REDISPATCHED:
            lines.append(f"{label} re-dispatched (attempt {record.attempt}, "
                         f"dispatch {record.dispatch})")
        else:
            lines.append(f"job failed: {reason}")
        self._note(record.log_path, lines)
        if loss.outcome == LossOutcome.REDISPATCHED:
            dispatch.send(self.app, self.store, record, resumed=True)
        else:
            self.store.fail_lost(loss, reason)

    def _resend(self, job_id: str, message: str) -> None:
        try:
            record = self.store.get(job_id)
        except JobNotFound:
            record = None
        except CorruptRecord as error:
            logger.error("reaper: not re-sending: %s", error)
            record = None
        if record is None or record.state not in ACTIVE:
            self.store.unsendable(job_id)
            return
        logger.warning("reaper: " + message, job_id, record.dispatch)
        dispatch.send(self.app, self.store, record)

    def _note(self, log_path: str, lines: list[str]) -> None:
        try:
            path = self.root.join(log_path)
            for line in lines:
                append(path, line)
        except Exception as error:  # the log is for people; recovery must go on without it
            logger.warning("reaper: cannot write to the render log %s: %s", log_path, error)
