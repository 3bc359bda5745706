"""One user's jobs as getJobs lists them, kept in the client and brought up to date from the
change feed, so a listing costs what changed rather than what the farm holds.

Katana polls ``getJobs`` on its UI thread. The first call reads this user's index and a
compact string per job (``listing.lua``); later calls read this user's change feed (the jobs
changed since the last call: a sorted set of change numbers that every write a listing
shows adds to, see ``touch.lua``; a job's changes go in its owner's feed, the one its id
names) and re-read only those. A finished job
never changes except by a restart, which is a change like any other, and a job that left
Redis (retention) is one too, so the cache stays exact. When the feed no longer reaches
back to the last call (trimmed), or the user has jobs whose ids name no owner (from before
ids carried one: their changes are in no user's feed), the listing is read afresh.

A user's own client also keeps a *snapshot* of their listing in Redis (``Keys.snapshot``:
one string, each job's listing fields and the feed's position), written after a listing
read afresh and again once a tenth of it has changed since. A new Katana session starts
from it and the changes since, one read of the string rather than of every record: Redis
takes 13 us a job to read records through ``listing.lua``, under half a microsecond a job to
send the string.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import operator
import threading
from collections.abc import Iterator

import redis

from .jobs import Listed
from .records.keys import owner_of
from .records.states import ACTIVE
from .records.store import JobStore

logger = logging.getLogger(__name__)
#: Jobs re-read since the snapshot was written (besides a tenth of the listing) before it
#: is written again.
SNAPSHOT_AFTER = 100
#: Sorted by, in reverse: the newest submission (a restart's, for a restarted job) first,
#: as Katana shows them, and as the indexes list them (ties by job id, as ``ZREVRANGE``).
NEWEST_FIRST = operator.attrgetter("submitted_ms", "job_id")


class Listing:
    """One user's jobs, newest first, kept up to date."""

    def __init__(self, store: JobStore, user: str, keeps_snapshot: bool = False) -> None:
        self.store, self.user = store, user
        #: Whether this client reads and writes the user's snapshot: only their own client
        #: may write it, and only their own listing is worth one.
        self.keeps_snapshot = keeps_snapshot
        #: Jobs re-read since the snapshot was written; None after a read afresh.
        self._unsaved: int | None = 0
        self.position: int | None = None  # the change feed's, when last read
        self.entries: dict[str, Listed] = {}
        self._ordered: list[Listed] | None = None
        #: The waiting and running ones, of the same call (settled with Celery's states).
        self.active: list[Listed] = []
        self._unowned = False  # jobs in the index whose changes this user's feed misses
        self._lock = threading.Lock()  # Katana may call from more than one thread

    def jobs(self) -> list[Listed]:
        """The user's jobs, newest first: read afresh the first time (and whenever the
        change feed no longer reaches back to the last call), else only what changed. The
        same list object while nothing changed."""
        with self._lock:
            fresh = self.position is None and not self._from_snapshot()
            if fresh or not self._update():
                self._load()
            if self._ordered is None:
                self._ordered = sorted(self.entries.values(), key=NEWEST_FIRST, reverse=True)
                self.active = [job for job in self._ordered if job.state in ACTIVE]
            if self._unsaved is None or self._unsaved > SNAPSHOT_AFTER + len(self.entries) // 10:
                self._save()
            return self._ordered

    def _load(self) -> None:
        jobs, self.position = self.store.index_at(self.user)
        self.entries = {job_id: listed for job_id, listed in self.store.listed(jobs) if listed}
        self._ordered = None
        self._unowned = any(owner_of(job_id) != self.user for job_id in jobs)
        self._unsaved = None  # all of it, written once sorted

    def _from_snapshot(self) -> bool:
        """Start from the user's snapshot; False if there is none to start from."""
        snapshot = self.store.snapshot(self.user) if self.keeps_snapshot else None
        if snapshot is None:
            return False
        self.position, jobs = snapshot
        self.entries = {job.job_id: job for job in jobs}
        self._ordered, self._unowned, self._unsaved = None, False, 0
        return True

    def _save(self) -> None:
        """Write the user's snapshot of this listing (their own client's, whose every job's
        changes the feed has); a failure only costs the next session a full read."""
        self._unsaved = 0
        if not self.keeps_snapshot or self._unowned or self.position is None:
            return
        try:
            # In listing order: the next session's sort finds it sorted.
            self.store.save_snapshot(self.user, self.position, self._ordered or [])
        except redis.exceptions.NoPermissionError:  # an ACL user made before snapshots
            logger.warning("%s may not write a listing snapshot, so each new session reads "
                           "every job: an admin's `celeryfarm user add %s` allows it",
                           self.user, self.user)
            self.keeps_snapshot = False
        except redis.RedisError as error:
            logger.warning("cannot write %s's listing snapshot: %s", self.user, error)

    def _update(self) -> bool:
        """Re-read the jobs changed since the last call; False if the feed cannot say."""
        if self._unowned:
            return False
        changes = self.store.changes_since(self.user, self.position or 0)
        if changes is None:
            return False
        changed, position = changes
        if not changed:
            return True
        known = [job_id for job_id in changed if job_id in self.entries]
        others = [job_id for job_id in changed if job_id not in self.entries]
        new = [job_id for job_id, here in zip(others, self.store.in_index(
            "user", self.user, others)) if here]
        for job_id, listed in self.store.listed(known + new):
            if listed is None:  # it left Redis
                self.entries.pop(job_id, None)
            else:
                self.entries[job_id] = listed
        self.position, self._ordered = position, None
        self._unsaved += len(changed)
        return True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a listing builds its objects (as
    Mercurial's ``util.nogc`` does for its big reads): tens of thousands of new objects
    would set off collections that walk all of Katana's and Celery's objects, and none of
    the new ones is garbage. Measured: a third of a cold 10,000-job getJobs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
