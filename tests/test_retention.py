"""Retention against a real redis-server, with records that finished long ago: finished jobs
older than CELERYFARM_KEEP_DAYS leave Redis with every key of theirs and Celery's results,
a bounded number per reaper pass; the rest, render logs included, stay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celeryfarm import reaper
from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.jobs import JobRecord, JobSpec
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.records import JobState
from celeryfarm.records.keys import new_job_id
from celeryfarm.redisserver import RedisServer

from .cli_fixtures import base_env, cli

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    """A farm core on a Redis of its own (no nodes: jobs are recorded as they ended)."""
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        settings = Settings(broker_url=server.url, shared_root=tmp_path / "shared",
                            user="artist", keep_days=30, key_prefix="keep")
        yield Farm(settings)


def record(farm: Farm, state: JobState, ended_days_ago: float | None, user: str = "artist",
           attempt: int = 1) -> JobRecord:
    """A one-step job in ``state`` that ended ``ended_days_ago`` (None: it has not), stored
    with its events, frames done and Celery result as a real run leaves them."""
    now = int(time.time() * 1000)
    end = None if ended_days_ago is None else now - int(ended_days_ago * DAY_MS)
    job_id = new_job_id(user)
    job = JobRecord(job_id=job_id, spec=JobSpec.build(name="old", commands=["true"],
                                                      user=user, session="s1",
                                                      frames=range(1, 3)),
                    log_path=f"ctx-{job_id}/render.log", state=state, attempt=attempt,
                    submitted_ms=(end or now) - 60_000, end_ms=end,
                    task_ids=(f"{job_id}-{attempt}.1-0",))
    farm.store.create(job, dispatching=False)
    keys, client = farm.store.keys, farm.store.redis
    client.append(keys.events(job_id), '{"e": "start"}\n{"e": "end"}\n')
    for number in range(1, attempt + 1):
        client.sadd(keys.frames_done(job_id, number), 1, 2)
    farm.app.backend.store_result(job.task_ids[0], None, "FAILURE" if state ==
                                  JobState.FAILED else "REVOKED")
    log = farm.root.join(job.log_path)
    log.parent.mkdir(parents=True)
    log.write_text("render log\n")
    return job


def keys_of(farm: Farm, job: JobRecord) -> list[str]:
    """Every Redis key the job has left, and every index or set that still names it."""
    keys, client = farm.store.keys, farm.store.redis
    own = [keys.job(job.job_id), keys.events(job.job_id),
           *(keys.frames_done(job.job_id, n) for n in range(1, job.attempt + 1)),
           farm.app.backend.get_key_for_task(job.task_ids[0])]
    found = [key for key in own if client.exists(key)]
    for index in (keys.index(), keys.index("user", job.spec.user),
                  keys.index("session", "s1")):
        if client.zscore(index, job.job_id) is not None:
            found.append(index)
    return found


def test_finished_jobs_older_than_keep_days_leave_redis_a_batch_a_pass(farm: Farm, monkeypatch):
    old = [record(farm, state, 40) for state in
           (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)]
    old.append(record(farm, JobState.COMPLETED, 31, attempt=3))  # restarted twice, long ago
    recent = record(farm, JobState.COMPLETED, 29)
    waiting = record(farm, JobState.WAITING, None)
    waiting.submitted_ms -= 40 * DAY_MS  # submitted long ago and still waiting
    farm.store.redis.zadd(farm.store.keys.index(), {waiting.job_id: waiting.submitted_ms})
    plugin = CeleryFarmPlugin(farm)
    assert len(plugin.getJobs(None)) == 6  # the plug-in keeps this listing

    monkeypatch.setattr(reaper, "BATCH", 2)
    node = reaper.Reaper(farm.app, farm.store, farm.settings)
    passes = []
    while passed := node.retire_once():
        passes.append(passed)
        assert len(passes) < 10
    assert all(len(retired) <= 2 for retired in passes)
    assert sorted(job for retired in passes for job in retired) == sorted(
        job.job_id for job in old)

    for job in old:
        assert keys_of(farm, job) == [], job.state
        assert farm.root.join(job.log_path).read_text() == "render log\n"  # logs stay
    for job in (recent, waiting):
        assert len(keys_of(farm, job)) == 7
    # The plug-in's kept listing drops them on its next call, as a fresh one lists.
    assert {job.jobId for job in plugin.getJobs(None)} == {recent.job_id, waiting.job_id}
    assert {job.jobId for job in CeleryFarmPlugin(farm).getJobs(None)} == {
        recent.job_id, waiting.job_id}


def test_a_job_restarted_since_it_ended_stays(farm: Farm):
    job = record(farm, JobState.FAILED, 40)
    # What a restart does to the record, the moment before the reaper's script runs.
    farm.store.redis.hset(farm.store.keys.job(job.job_id), "state", "Waiting")
    assert farm.store.retire([job.job_id], 30 * DAY_MS, farm.app.backend.get_key_for_task) == []
    assert len(keys_of(farm, job)) == 7


def test_the_change_feed_keeps_its_newest_entries_and_listings_behind_it_start_again(
        farm: Farm):
    jobs = [record(farm, JobState.COMPLETED, 1) for _ in range(3)]
    plugin = CeleryFarmPlugin(farm)
    assert len(plugin.getJobs(None)) == 3
    jobs += [record(farm, JobState.COMPLETED, 1) for _ in range(3)]
    # A change the feed never saw (written by hand): only a fresh read finds it.
    farm.store.redis.hset(farm.store.keys.job(jobs[0].job_id), "state", "Failed")
    assert farm.store.trim_changes("artist", keep=2) == 4
    # Changes after the listing's position have left the feed: it reads afresh.
    states = {job.jobId: job.state for job in plugin.getJobs(None)}
    assert len(states) == 6 and states[jobs[0].job_id] == "Failed"


def test_jobs_says_how_far_back_it_sees(farm: Farm):
    env = base_env(CELERYFARM_BROKER_URL=farm.settings.broker_url,
                   CELERYFARM_SHARED_ROOT=str(farm.settings.shared_root),
                   CELERYFARM_KEY_PREFIX="keep", CELERYFARM_KEEP_DAYS="45")
    listing = cli(env, "jobs")
    assert listing.returncode == 0, listing.stderr
    assert "the last 45 days (CELERYFARM_KEEP_DAYS)" in listing.stderr


def test_an_index_retention_emptied_gives_its_memory_back(farm: Farm, monkeypatch):
    """Redis before 7.4 keeps a sorted set's hash table at its biggest size: after
    retention took most of an index, the index must cost what a fresh one of the jobs
    left costs (shrink.lua), with every job left still in it at its submission time."""
    old = [record(farm, JobState.COMPLETED, 40) for _ in range(300)]
    kept = [record(farm, JobState.COMPLETED, 1) for _ in range(40)]
    monkeypatch.setattr(reaper, "BATCH", 100)
    node = reaper.Reaper(farm.app, farm.store, farm.settings)
    while node.retire_once():
        pass
    assert all(keys_of(farm, job) == [] for job in old)
    client, keys = farm.store.redis, farm.store.keys
    for index in (keys.index(), keys.index("user", "artist"), keys.index("session", "s1")):
        left = client.zrange(index, 0, -1, withscores=True)
        assert sorted(left) == sorted((job.job_id, job.submitted_ms) for job in kept)
        client.zadd("fresh", dict(left))
        fresh = client.memory_usage("fresh", samples=0)
        assert client.memory_usage(index, samples=0) <= 1.1 * fresh  # allocator rounding
        client.delete("fresh")
