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
"""

from __future__ import annotations

import threading

from .jobs import Listed
from .records.keys import owner_of
from .records.states import ACTIVE
from .records.store import JobStore


class Listing:
    """One user's jobs, newest first, kept up to date."""

    def __init__(self, store: JobStore, user: str) -> None:
        self.store, self.user = store, user
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
            if self.position is None or not self._update():
                self._load()
            if self._ordered is None:
                self._ordered = sorted(self.entries.values(), key=_newest_first)
                self.active = [job for job in self._ordered if job.state in ACTIVE]
            return self._ordered

    def _load(self) -> None:
        jobs, self.position = self.store.index_at(self.user)
        self.entries = {job_id: listed for job_id, listed in self.store.listed(jobs) if listed}
        self._ordered = None
        self._unowned = any(owner_of(job_id) != self.user for job_id in jobs)

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
        return True


def _newest_first(job: Listed) -> tuple[int, str]:
    """Newest submission (a restart's, for a restarted job) first, as Katana shows them."""
    return -job.submitted_ms, job.job_id
