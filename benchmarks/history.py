"""The figures about what history costs: Redis memory per finished job, a listing among
100,000 jobs, and the memory retention gives back (figures 9 and 10 of ``benchmarks.run``).

Memory is Redis's own count (``INFO memory``'s ``used_memory``) before and after, so Celery's
results, the indexes and the change feed are in it; ``MEMORY USAGE`` of one job's keys says
where it goes.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import TYPE_CHECKING

from celeryfarm import reaper
from celeryfarm.farm import Farm
from celeryfarm.jobs import JobRecord, JobSpec
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.records import JobState
from celeryfarm.records.keys import new_job_id
from celeryfarm.records.store import CHANGES_KEPT

from .common import Row, median

if TYPE_CHECKING:
    from .run import Bench

DAY_MS = 24 * 3600 * 1000
#: Jobs of "this user" among the big history (figure 10).
MINE = 1_000
#: The part of the big history that finished longer ago than CELERYFARM_KEEP_DAYS.
OLD_SHARE = 0.9


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def fig9_job_memory(b: Bench) -> list[Row]:
    """Redis memory per finished one-step job, Celery's results included: ``MEMORY USAGE``
    of each job's own keys (record, history, frames done, Celery results) plus what the
    indexes (all, user, session) grew by, divided by N, after N one-step jobs (a Katana-like
    command line) ran on the nodes; the change feed apart (bounded: the latest 10,000 jobs'
    changes), and ``used_memory`` before and after (noisy: other clients' buffers). Against
    the SUCCESS result each of N bare Celery tasks leaves."""
    b.farm_workers()
    b.bare_workers()
    n = b.sizes.memory_jobs
    argv = ["true", "--frames", "1-100", "--scene", "/shared/sq010_sh020/scene.katana"]
    b.wait_farm([b.submit([argv], name="warm-up")])  # scripts loaded, connections made
    keys, client = b.farm.store.keys, b.redis
    shared = [keys.index(), keys.index("user", b.settings.user),
              keys.index("session", b.farm.session)]

    def usage(names: list[str]) -> int:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.memory_usage(name, samples=0)
        return sum(size or 0 for size in pipe.execute())

    shared_before, before = usage(shared), used_memory(client)
    feed_before = usage([keys.changes(b.farm.user)])
    ids = [b.submit([argv], name=f"sq010_sh{i:03d}_lighting") for i in range(n)]
    b.wait_farm(ids, interval=0.2)
    used = (used_memory(client) - before) / n
    shares = (usage(shared) - shared_before) / n
    feed = (usage([keys.changes(b.farm.user)]) - feed_before) / n
    results = b.farm.app.backend.get_key_for_task
    own = {"record": [keys.job(job) for job in ids],
           "history": [keys.events(job) for job in ids],
           "frames done": [keys.frames_done(job, 1) for job in ids],
           "Celery results": [results(task) for job in ids
                              for task in b.farm.store.get(job).task_ids]}
    parts = {name: usage(names) / n for name, names in own.items()}
    farm = sum(parts.values()) + shares
    tasks = [b.bare_signature(argv).apply_async().id for _ in range(n)]
    b.wait_bare(tasks, interval=0.2)
    backend, pipe = b.bare_app.backend, b.bare_redis.pipeline(transaction=False)
    for task in tasks:
        pipe.memory_usage(backend.get_key_for_task(task), samples=0)
    bare = sum(size or 0 for size in pipe.execute()) / n
    where = ", ".join(f"{name} {size:.0f} B" for name, size in parts.items())
    return [
        Row("9", f"Redis memory per finished one-step job, Celery results included "
            f"(MEMORY USAGE, n={n})", "B", farm, bare, "a bare task's result",
            "<= 1,500 bytes", farm <= 1500),
        Row("9", f"  of which {where}, index entries {shares:.0f} B", ""),
        Row("9", f"  besides: the change feed grew by {feed:.0f} B a job (it keeps the latest "
            f"{CHANGES_KEPT:,} jobs' changes); used_memory grew by {used:.0f} B a job", ""),
    ]


def _history(farm: Farm, total: int, now_ms: int) -> list[JobRecord]:
    """``total`` finished one-step jobs, ``MINE`` of them the farm's user's, the others
    50 other users'; ``OLD_SHARE`` of them (this user's alike) ended 40 days ago."""
    records = []
    for index in range(total):
        old = index % 10 < OLD_SHARE * 10
        end = now_ms - (40 * DAY_MS if old else DAY_MS) - index
        context = f"big-{index:06d}"
        user = farm.settings.user if index % (total // MINE) == 0 else f"artist{index % 50}"
        spec = JobSpec.build(
            name=f"sq{index // 100:03d}_sh{index % 100:03d}_lighting",
            commands=[["renderboot", "--frames", "1-100", "--scene",
                       f"/shared/{context}/scene.katana"]],
            environment={"KATANA_TMPDIR": f"/shared/{context}"}, frames=range(1, 101),
            context=context, user=user, host="ws01", session=f"ws01-{user}")
        job_id = new_job_id(user)
        records.append(JobRecord(
            job_id=job_id, spec=spec, log_path=f"{context}/render.log",
            state=JobState.COMPLETED, task_ids=(f"{job_id}-1.1-0",),
            submitted_ms=end - 60_000, start_ms=end - 50_000, end_ms=end, step=0,
            node="farm1@node01"))
    return records


def records_memory(farm: Farm) -> int:
    """``MEMORY USAGE`` of every key of ``farm``'s prefix but its change feeds and listing
    snapshots (listings' caches: a feed keeps the latest ``CHANGES_KEPT`` changes whatever
    the history, a snapshot what its user last listed; reported apart): the records'
    memory, without what Redis spends on itself (clients, scripts, its keyspace's table)."""
    store = farm.store
    caches = (store.keys.changes(""), store.keys.snapshot(""))
    return sum(store.redis.memory_usage(key, samples=0) or 0
               for key in store.redis.scan_iter(f"{store.keys.prefix}:*", count=1000)
               if not key.startswith(caches))


def _drop(farm: Farm) -> None:
    for key in farm.store.redis.scan_iter(f"{farm.settings.key_prefix}:*", count=1000):
        farm.store.redis.delete(key)


def fig10_big_history(b: Bench) -> list[Row]:
    """A history of 100,000 finished jobs (under a key prefix of its own, in the same Redis),
    1,000 of them this user's: getJobs(None) of a fresh plug-in (median of 5: a new
    session, from the user's listing snapshot), the same with no snapshot, and again with
    nothing changed; then Redis memory with all of them, and after retention has taken
    the 90% that finished more than CELERYFARM_KEEP_DAYS ago out (reaper passes of 100 jobs,
    timed), against the same 10% imported alone (:func:`records_memory`)."""
    total = b.sizes.big_history
    settings = dataclasses.replace(b.settings, key_prefix=f"big{uuid.uuid4().hex[:6]}",
                                   user="bench-artist", keep_days=30)
    farm = Farm(settings)
    history = _history(farm, total, int(time.time() * 1000))
    kept = [record for record in history if record.end_ms > time.time() * 1000 - 30 * DAY_MS]
    alone = Farm(dataclasses.replace(settings, key_prefix=f"{settings.key_prefix}alone"))
    alone.store.create_many(kept)
    recent = records_memory(alone)
    _drop(alone)
    before = used_memory(b.redis)
    farm.store.create_many(history)
    loaded = used_memory(b.redis) - before
    cold, warm, unsnapped = [], [], []
    for index in range(11):  # a new session, or (odd) the user's first with no snapshot
        if index % 2:
            farm.store.redis.delete(farm.store.keys.snapshot(settings.user))
        plugin = CeleryFarmPlugin(Farm(settings))
        plugin.farm.store.redis.ping()
        started = time.perf_counter()
        mine = plugin.getJobs(None)
        middle = time.perf_counter()
        plugin.getJobs(None)
        warm.append(time.perf_counter() - middle)
        if index:
            (unsnapped if index % 2 else cold).append(middle - started)
    if len(mine) != MINE:
        raise RuntimeError(f"listed {len(mine)} jobs of this user's, not {MINE}")

    node = reaper.Reaper(farm.app, farm.store, settings)
    started, passes, retired = time.perf_counter(), 1, 0
    while passed := node.retire_once():  # old jobs come first: submitted before the others
        passes += 1
        retired += len(passed)
    took = time.perf_counter() - started
    left = records_memory(farm)
    users = {settings.user, *(f"artist{index}" for index in range(50))}
    feed = sum(farm.store.redis.memory_usage(farm.store.keys.changes(user), samples=0) or 0
               for user in users)
    snapshot = farm.store.redis.memory_usage(farm.store.keys.snapshot(settings.user)) or 0
    expected = total - len(kept)
    _drop(farm)
    rows = [
        Row("10", f"getJobs(None), {total:,} jobs in Redis, {MINE:,} of them this user's, "
            "first call of a fresh plug-in (median of 5)", "ms", median(cold) * 1000,
            target="< 20 ms", met=median(cold) * 1000 < 20),
        Row("10", "  the same with no listing snapshot (the user's first session: every "
            "record read, the snapshot written; median of 5)", "ms",
            median(unsnapped) * 1000),
        Row("10", "  again, nothing changed", "ms", median(warm) * 1000, target="< 5 ms",
            met=median(warm) * 1000 < 5),
        Row("10", f"Redis memory, {total:,} finished jobs (imported records)", "MiB",
            loaded / 2**20),
        Row("10", f"  after retention of the {OLD_SHARE:.0%} older than KEEP_DAYS "
            f"({retired:,} of {expected:,} left, {passes} reaper passes of {reaper.BATCH} "
            f"jobs, {took:.1f} s), the records' keys without the change feeds "
            f"({feed / 2**20:.2f} MiB: the latest {CHANGES_KEPT:,} jobs' changes, whatever the "
            f"history) and the listing snapshot ({snapshot / 2**20:.2f} MiB, "
            f"{snapshot / MINE:.0f} B a job listed)", "MiB", left / 2**20, recent / 2**20,
            f"the {len(kept):,} kept jobs imported alone", "the 10% only",
            retired == expected and left <= 1.1 * recent),
    ]
    return rows
