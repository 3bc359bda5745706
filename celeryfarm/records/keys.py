"""Where the farm's records live in Redis: the one place that names celeryfarm's keys.

Every key starts with the farm's ``CELERYFARM_KEY_PREFIX``, so farms can share a Redis.
Scripts get their keys as ``KEYS`` from here; none builds a key name itself.

A job's id starts with its owner's name (``alice.1f0c...``), so the keys an artist may write
(their jobs' records and histories, their own index and change feed, see :meth:`Keys.owned`)
have names that Redis ACL key patterns can express: Redis itself refuses a write to another
artist's job. Everything else an artist writes at submission goes through the append-only
inbox (see :attr:`Keys.inbox`); the shared indexes and sets are written by render nodes
only.
"""

from __future__ import annotations

import dataclasses
import uuid

#: Between the owner's name and the rest of a job id.
OWNER_SEP = "."


def new_job_id(owner: str) -> str:
    """A new job id of ``owner``'s (their name, then a UUID)."""
    return f"{owner}{OWNER_SEP}{uuid.uuid4().hex}"


def owner_of(job_id: str) -> str:
    """The owner a job id names ("" for an id without one)."""
    return job_id.rpartition(OWNER_SEP)[0]


def owner_free(job_id: str) -> str:
    """A job id without its owner: what a person may type for short."""
    return job_id.rpartition(OWNER_SEP)[2]


def short_id(job_id: str) -> str:
    """The start of a job id's hex digits, as listings show it (and ``resolve`` takes)."""
    return owner_free(job_id)[:8]


@dataclasses.dataclass(frozen=True)
class Keys:
    """The key layout of one farm."""

    prefix: str = "celeryfarm"

    def job(self, job_id: str) -> str:
        """Hash: the job's record (fields in :mod:`celeryfarm.records.fields`)."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """String: the job's history, a JSON line each (see ``add_event`` in common.lua):
        its submission (the commands and environment), then its step executions' starts,
        ends and losses. (A list of the executions for records from before.)"""
        return f"{self.prefix}:events:{job_id}"

    def index(self, kind: str = "all", value: str = "") -> str:
        """Sorted set: job id -> submission time (ms), of all jobs or of a user's or
        session's."""
        return f"{self.prefix}:index:{kind}:{value}" if value else f"{self.prefix}:index:{kind}"

    @property
    def inbox(self) -> str:
        """List of job ids whose dispatch a client recorded (a submission or a restart):
        render nodes take them from here into the shared indexes, outbox and awaiting set
        (``adopt.lua``). Clients may only push to it, so no artist can take another's
        entry out of those shared structures."""
        return f"{self.prefix}:inbox"

    def owned(self, owner: str) -> tuple[str, ...]:
        """Key patterns (Redis ACL globs) of the keys ``owner`` writes as an artist: their
        jobs' records and histories, their own index, change feed and listing snapshot.
        ``owner`` must
        hold no glob character."""
        return (self.job(f"{owner}{OWNER_SEP}*"), self.events(f"{owner}{OWNER_SEP}*"),
                self.index("user", owner), self.changes(owner), self.snapshot(owner))

    @property
    def scratch(self) -> str:
        """Sorted set: a copy made and renamed within one script (``shrink.lua``); it
        never outlives the script."""
        return f"{self.prefix}:scratch"

    @property
    def leases(self) -> str:
        """Sorted set: job id -> deadline (ms) of its running step's lease."""
        return f"{self.prefix}:leases"

    @property
    def outbox(self) -> str:
        """Sorted set: job id -> when a dispatch of it was recorded but not yet sent."""
        return f"{self.prefix}:dispatching"

    @property
    def awaiting(self) -> str:
        """Sorted set: job id -> since when (ms) its current step has awaited a node: from
        its sending (or its previous step's success) until a node claims it."""
        return f"{self.prefix}:awaiting"

    @property
    def missing(self) -> str:
        """Hash: job id -> the task id of its awaiting step, whose message the reapers'
        last look found nowhere."""
        return f"{self.prefix}:missing"

    @property
    def look_turn(self) -> str:
        """String with a time to live: held by the node whose reaper looks for missing
        messages this lease period."""
        return f"{self.prefix}:look-turn"

    @property
    def retries(self) -> str:
        """Sorted set: job id -> when (ms) its failed step is due to run again."""
        return f"{self.prefix}:retries"

    def pool_nodes(self, pool: str) -> str:
        """Sorted set: node name -> when (ms) it last said it serves ``pool``."""
        return f"{self.prefix}:pool:{pool}:nodes"

    @property
    def nodes(self) -> str:
        """Sorted set: render node name -> when (ms) it was last seen."""
        return f"{self.prefix}:nodes"

    def node(self, name: str) -> str:
        """Hash: a render node's pools, running steps (JSON task ids) and last-seen time."""
        return f"{self.prefix}:node:{name}"

    @property
    def drained(self) -> str:
        """Set: render nodes drained by a wrangler; they take no step until enabled."""
        return f"{self.prefix}:drained"

    def frames_done(self, job_id: str, attempt: int) -> str:
        """Set: the frames an attempt of the job has reported done."""
        return f"{self.prefix}:frames:{job_id}:{attempt}"

    @property
    def limits(self) -> str:
        """Hash: limit name -> the units steps may hold at once (licences, say)."""
        return f"{self.prefix}:limits"

    @property
    def limit_holders(self) -> str:
        """Sorted set (by name): ``limit|job id`` for each unit a running step holds."""
        return f"{self.prefix}:limit-holders"

    def changes(self, owner: str) -> str:
        """Sorted set, ``owner``'s change feed: job id -> the number of its latest change
        that a listing shows; the member '' holds the last number given (see touch.lua).
        One feed per owner (a job's is its id's, :func:`owner_of`), so an artist's client
        writes only its own when it creates or stops a job."""
        return f"{self.prefix}:changes:{owner}"

    def snapshot(self, owner: str) -> str:
        """String with a time to live: ``owner``'s listing as one of their clients last read
        it, with the change feed's position then (``celeryfarm.listing``). A new Katana
        session starts from it and the changes since, instead of reading every job."""
        return f"{self.prefix}:listing:{owner}"

    @property
    def stats(self) -> str:
        """Hash of farm-wide counters and the step-duration histogram (celeryfarm metrics)."""
        return f"{self.prefix}:stats"
