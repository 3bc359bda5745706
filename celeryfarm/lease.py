"""The lease of one execution of a step: it runs under a fencing token, never twice at once.

Celery on Redis alone would leave a lost node's step waiting for the broker's visibility
timeout (longer than the longest render) and could then run it beside the original. Instead:

* A step runs under a *fencing token* (:class:`~celeryfarm.records.store.Token`): the job's
  attempt and dispatch numbers plus the step index. :meth:`StepLease.claim` starts it only if
  that token is current, the step is the job's next one, and no other execution holds a live
  lease on it.
* While it runs, a thread in the pool process renews its *lease* (a deadline in a Redis
  sorted set) every poll. The same call says whether the job was stopped or the step given
  to someone else. If renewals fail for a lease period, the step stops writing to the render
  log and kills its render: it can no longer be sure it is current.
* Only the current token's execution can record a step's outcome; a superseded node's
  result is dropped.

Lost steps are found by every node's :class:`~celeryfarm.reaper.Reaper`. All times in the
scripts come from Redis's own clock, so nodes' clocks need not agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis

from .config import Settings
from .jobs import JobRecord
from .records.states import ClaimStatus, FailureKind, StepOutcome
from .records.store import JobStore, Token

logger = logging.getLogger(__name__)


def lease_owner(task_id: str, node: str, pid: int) -> str:
    """Names one execution of a step: the message, the node and the pool process."""
    return f"{task_id}/{node}/{pid}"


def owner_prefix(task_id: str, node: str) -> str:
    """What every :func:`lease_owner` of ``task_id`` on ``node`` starts with."""
    return lease_owner(task_id, node, 0).rsplit("/", 1)[0] + "/"


class StepLease:
    """The lease of one execution of a step, held by the pool process that runs it."""

    def __init__(self, store: JobStore, settings: Settings, token: Token, owner: str) -> None:
        self.store, self.settings = store, settings
        self.token, self.owner = token, owner
        self.lease_ms = int(settings.lease_seconds * 1000)
        # Stop trusting the lease this long before Redis would let it expire, so the render
        # is dead (grace period included) before another node can be given the step.
        self._margin = settings.stop_grace_seconds + settings.poll_seconds + 1.0
        self._valid_until = 0.0
        self._problem = ""
        self._kind: FailureKind | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        #: Frames reported done and not yet written: they go with the next renewal or
        #: with the step's end, never one round trip a frame.
        self._frames: list[int] = []
        self._frames_lock = threading.Lock()
        #: How long the render ran, for the farm's step histogram (written with the end).
        self.seconds: float | None = None

    def claim(self, node: str, commands: Sequence[Sequence[str]] | None = None,
              ) -> tuple[ClaimStatus, str, JobRecord | None]:
        """Try to start the step, if ``commands`` (those of the step's message, from this
        step on) are the record's: (OK, '', the job's record) or (why not, detail, None)."""
        sent = time.monotonic()
        status, detail, record = self.store.claim(self.token, self.owner, node, self.lease_ms,
                                                  int(self.settings.reap_seconds * 1000),
                                                  commands)
        if status == ClaimStatus.OK:
            self._valid_until = sent + self.settings.lease_seconds
        return status, detail, record

    # -- while the step runs -----------------------------------------------------------------
    def keep(self, on_problem: Callable[[], None] = lambda: None) -> StepLease:
        """Start renewing the lease in a background thread; returns self for ``with``. When
        a renewal finds that the step must stop, the thread calls ``on_problem``, so the
        render loop hears of it at once rather than at its next poll."""
        self._on_problem = on_problem
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
        while not self._done.wait(self.settings.poll_seconds):
            sent = time.monotonic()
            frames = self._take_frames()
            try:
                kind = self.store.renew(self.token, self.owner, self.lease_ms, frames)
            except redis.RedisError as error:
                logger.warning("cannot renew the lease of job %s: %s", self.token.job_id, error)
                self._give_back(frames)
                continue
            if kind is None:
                self._valid_until = sent + self.settings.lease_seconds
            elif not self._problem:
                self._set_problem(kind, "stop requested" if kind == FailureKind.STOPPED
                                  else "the step was given to another node")
                self._on_problem()

    def frame_done(self, frame: int) -> None:
        """Count a frame the render reported done (written with the next renewal)."""
        with self._frames_lock:
            self._frames.append(frame)

    def _take_frames(self) -> list[int]:
        with self._frames_lock:
            frames, self._frames = self._frames, []
        return frames

    def _give_back(self, frames: list[int]) -> None:
        """Frames whose write failed: progress is for people, so they wait for the next
        write rather than fail anything."""
        with self._frames_lock:
            self._frames[:0] = frames

    def _set_problem(self, kind: FailureKind, text: str) -> None:
        if not self._problem:
            self._kind, self._problem = kind, text

    def valid(self) -> bool:
        """Whether this execution may still act as current (write the log, go on). A stopped
        job's step stays current: no one else will be given it."""
        if self._kind == FailureKind.STOPPED:
            return True
        return self._kind != FailureKind.SUPERSEDED and (
            time.monotonic() < self._valid_until - self._margin)

    def stop_reason(self) -> str:
        """Why the render must stop now, or "" (cheap: no I/O; the thread does that)."""
        if self._problem:
            return self._problem
        if not self.valid():
            self._set_problem(FailureKind.LAPSED, f"no contact with the farm's Redis for "
                              f"{self.settings.lease_seconds - self._margin:.0f} s")
            return self._problem
        return ""

    @property
    def problem_kind(self) -> FailureKind | None:
        """Why the step must stop (None: it need not)."""
        return self._kind

    # -- when it ends ------------------------------------------------------------------------
    def finish(self, outcome: StepOutcome, last: bool = False, reason: str = "") -> bool:
        """Record the execution's outcome, with how long it ran and its last frames done, in
        one write; False if it was no longer current (ignored)."""
        return self.store.finish(self.token, self.owner, outcome, last, reason, self.seconds,
                                 self._take_frames())

    def retry(self, delay_ms: int, counted: bool, why: str) -> bool:
        """Record a failed try whose step runs again in ``delay_ms``; False if this
        execution was no longer current or the job was stopped (see ``JobStore.retry``)."""
        return self.store.retry(self.token, self.owner, delay_ms, counted, why, self.seconds,
                                self._take_frames()) > 0
