"""One user's jobs as getJobs lists them, kept in the client and brought up to date from the
change feed, so a listing costs what changed rather than what the farm holds.

Katana polls ``getJobs`` on its UI thread. The first call reads this user's index and a
compact string per job (``listing.lua``); later calls read the change feed (the jobs
changed since the last call: a sorted set of change numbers that every write a listing
shows adds to, see ``touch.lua``) and re-read only those of this user's. A finished job
never changes except by a restart, which is a change like any other, and a job that left
Redis (retention) is one too, so the cache stays exact. When the feed no longer reaches
back to the last call (trimmed), the listing is read afresh.
"""

from __future__ import annotations

import threading

from .jobs import Listed
from .records.store import JobStore


class Listing:
    """The jobs of one index (a user's), newest first, kept up to date."""

    def __init__(self, store: JobStore, kind: str, value: str) -> None:
        self.store, self.kind, self.value = store, kind, value
        self.position: int | None = None  # the change feed's, when last read
        self.entries: dict[str, Listed] = {}
        self._ordered: list[Listed] | None = None
        self._lock = threading.Lock()  # Katana may call from more than one thread

    def jobs(self) -> list[Listed]:
        """The index's jobs, newest first: read afresh the first time (and whenever the
        change feed no longer reaches back to the last call), else only what changed."""
        with self._lock:
            if self.position is None or not self._update():
                self._load()
            if self._ordered is None:
                self._ordered = sorted(self.entries.values(), key=lambda job: job.order_ms,
                                       reverse=True)
            return self._ordered

    def _load(self) -> None:
        jobs, self.position = self.store.index_at(self.kind, self.value)
        self.entries = {job_id: listed for job_id, listed in self.store.listed(jobs) if listed}
        self._ordered = None

    def _update(self) -> bool:
        """Re-read the jobs changed since the last call; False if the feed cannot say."""
        changes = self.store.changes_since(self.position or 0)
        if changes is None:
            return False
        changed, position = changes
        if not changed:
            return True
        known = [(job_id, self.entries[job_id].order_ms) for job_id in changed
                 if job_id in self.entries]
        others = [job_id for job_id in changed if job_id not in self.entries]
        places = self.store.places(self.kind, self.value, others)
        new = [(job_id, place) for job_id, place in zip(others, places) if place is not None]
        for job_id, listed in self.store.listed(known + new):
            if listed is None:  # it left Redis
                self.entries.pop(job_id, None)
            else:
                self.entries[job_id] = listed
        self.position, self._ordered = position, None
        return True
