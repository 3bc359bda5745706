"""Failover loses nothing acknowledged (issue 16): real primaries, replicas and sentinels,
real render nodes.

* A submission is acknowledged (``submitJob`` returns) only once a replica has it, broker
  message included, and a primary SIGKILLed right after loses none of it.
* The primary SIGKILLed in the middle of 300 jobs with renders running: every job ends as
  intended, the renders' own marker lines show no step running twice at once, both nodes
  take steps from the new primary (Celery issue 6348: a worker that does not follow a
  failover after losing its primary), and no process is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from celeryfarm.config import Settings
from celeryfarm.errors import ConfigError
from celeryfarm.farm import Farm
from celeryfarm.records.replication import ReplicaWait
from celeryfarm.records.states import ClaimStatus, JobState, StepOutcome
from celeryfarm.records.store import Token
from celeryfarm.redisserver import RedisServer, ReplicatedRedis
from celeryfarm.testing.cluster import LocalCluster

from .conftest import WORKER_ENV, running
from .helpers import all_gone, assert_never_two_current, submit, wait_until

PASSWORD = "failover-" + uuid.uuid4().hex
#: A pool no node takes from: its messages stay in the broker's queue for the test to see.
IDLE_POOL = "nobody"


def replica_has(server: RedisServer, job_id: str, prefix: str = "celeryfarm") -> tuple[bool, bool]:
    """Whether ``server`` holds the job's record, and a broker message of it in the idle
    pool's queue (kombu keeps one list per priority: ``<queue>``, ``<queue>\\x06\\x16N``)."""
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        record = bool(client.exists(f"{prefix}:job:{job_id}"))
        queues = client.keys(f"{prefix}:celery:{IDLE_POOL}*")
        message = any(job_id.encode() in body for queue in queues
                      for body in client.lrange(queue, 0, -1))
    finally:
        client.close()
    return record, message


def job_keys(server: RedisServer) -> list[bytes]:
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        return client.keys("celeryfarm:job:*")
    finally:
        client.close()


def blocked_in_wait(server: RedisServer) -> bool:
    """Whether a client of ``server`` is blocked in ``WAIT``."""
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        return any(c.get("cmd") == "wait" and "b" in c.get("flags", "")
                   for c in client.client_list())
    finally:
        client.close()


# -- an acknowledged submission is on a replica ----------------------------------------------
@pytest.fixture(scope="module")
def one_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedRedis]:
    """A primary with one replica, which the test stops and resumes (SIGSTOP/SIGCONT), and
    three sentinels. Without ``min-replicas-to-write``: a stopped replica must not make the
    primary refuse the writes this test watches."""
    servers = ReplicatedRedis(tmp_path_factory.mktemp("one-replica"), replicas=1,
                              password=PASSWORD, down_after_ms=1000, min_replicas=0)
    with servers:
        yield servers


def farm_on(servers: ReplicatedRedis, shared: Path, wait_seconds: float) -> Farm:
    return Farm(Settings(broker_url=servers.url, shared_root=shared, user="ann",
                         wait_seconds=wait_seconds))


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """``server`` stopped (SIGSTOP) inside the block: it neither reads nor acknowledges."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_write_no_replica_acknowledges_in_time_stands_and_is_logged(
    one_replica: ReplicatedRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A replica that does not answer (dead, frozen): the submission returns after
    ``WAIT_SECONDS`` and stands (an artist who saw an error would submit it again), with a
    warning that it is not yet replicated; once the replica is back, it has it."""
    farm = farm_on(one_replica, tmp_path, wait_seconds=0.3)
    replica = next(s for s in one_replica.servers if s is not one_replica.primary())
    with caplog.at_level(logging.WARNING, "celeryfarm.records.replication"), frozen(replica):
        job_id, _ = submit(farm, [["true"]], settings={"pool": IDLE_POOL})
        assert farm.store.state(job_id) == JobState.WAITING
    assert f"job {job_id} submitted: not yet on 1 replica(s)" in caplog.text
    wait_until(lambda: replica_has(replica, job_id) == (True, True), 10,
               "the resumed replica to have the job")


def test_a_steps_start_and_end_and_a_stop_wait_for_a_replica(
    one_replica: ReplicatedRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """The other writes the farm acknowledges wait for a replica too, each on its own
    connection: a node's claim of a step (its fencing token: the render starts after it),
    the step's end (here Completed), and a stop. The replica frozen, each is logged as not
    yet replicated: the ``WAIT`` ran after it and timed out."""
    farm = farm_on(one_replica, tmp_path, wait_seconds=0.2)
    replica = next(s for s in one_replica.servers if s is not one_replica.primary())
    ran, _ = submit(farm, [["true"]], settings={"pool": IDLE_POOL})
    stopped, _ = submit(farm, [["true"]], settings={"pool": IDLE_POOL})
    token, owner = Token(ran, 1, 1, 0), "test-owner"
    with caplog.at_level(logging.WARNING, "celeryfarm.records.replication"), frozen(replica):
        status, _detail, _record = farm.store.claim(token, owner, "test-node", 60_000)
        assert status == ClaimStatus.OK
        assert farm.store.finish(token, owner, StepOutcome.SUCCEEDED, last=True)
        farm.stop(stopped)
    not_yet = ": not yet on 1 replica(s) after 200 ms"
    for what in (f"job {ran} step 0 claimed", f"job {ran} step 0 succeeded",
                 f"job {stopped} cancel"):
        assert what + not_yet in caplog.text, caplog.text
    wait_until(lambda: farm.store.state(ran) == JobState.COMPLETED
               and farm.store.state(stopped) == JobState.CANCELLED, 10, "the writes")


def test_submit_returns_once_a_replica_has_the_job_and_its_message(
    one_replica: ReplicatedRedis, tmp_path: Path
):
    """``submitJob`` returns only once a replica has the record and the broker message
    (kombu's LPUSH on another connection: WAIT after the submission's last write covers
    it, the replication stream being ordered); then the primary SIGKILLed, the promoted
    replica has the whole job. While the replica is frozen, the submission waits in
    ``WAIT`` on the primary, which has the job already: without ``WAIT`` it would have
    returned with the job on the primary alone."""
    farm = farm_on(one_replica, tmp_path, wait_seconds=9)
    primary = one_replica.primary()
    replica = next(s for s in one_replica.servers if s is not primary)
    before = len(job_keys(primary))
    done: dict[str, str] = {}

    def submit_job() -> None:
        done["job_id"], _ = submit(farm, [["true"]], settings={"pool": IDLE_POOL})

    with frozen(replica):
        thread = threading.Thread(target=submit_job)
        thread.start()
        wait_until(lambda: blocked_in_wait(primary), 10, "the submission to wait in WAIT")
        assert thread.is_alive() and "job_id" not in done
        assert len(job_keys(primary)) == before + 1  # the primary has it already
    thread.join(15)
    assert not thread.is_alive()
    job_id = done["job_id"]
    # Read at once, straight from the replica: the record and the message are there.
    assert replica_has(replica, job_id) == (True, True)

    primary.process.kill()
    primary.process.wait()
    wait_until(lambda: one_replica.primary() is replica, 60, "the replica to be promoted")
    assert farm.store.state(job_id) == JobState.WAITING
    assert replica_has(replica, job_id) == (True, True)


# -- a primary with no replica takes no write ----------------------------------------------
def test_a_primary_left_without_replicas_takes_no_write_and_the_farm_waits(tmp_path: Path):
    """``min-replicas-to-write 1`` (as ``up --replicas`` runs it): the only replica gone, the
    primary refuses writes, even the nodes' ``BRPOP``. A submission then fails with a
    clear error after the clients' retries (never acknowledged, so nothing is lost), and
    the node is not stopped by the refusals (Celery takes a reply error from its broker as
    unrecoverable: the connection turns it into a lost connection); once the replica is
    back, a job submitted runs on that same node."""
    cluster = LocalCluster(tmp_path, extra_env=WORKER_ENV, password=PASSWORD, replicas=1)
    with running(cluster, ["lonely-node"]):
        farm = Farm(Settings.from_env({**cluster.env, "CELERYFARM_USER": "ann"}))
        servers = cluster.redis
        assert isinstance(servers, ReplicatedRedis)
        primary = servers.primary()
        replica = next(s for s in servers.servers if s is not primary)
        first, _ = submit(farm, [["true"]])
        wait_until(lambda: farm.store.state(first) == JobState.COMPLETED, 60, "a first job")
        replica.stop()
        direct = redis.Redis.from_url(primary.url, socket_timeout=5)
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            direct.set("celeryfarm:probe", 1)
        with pytest.raises(redis.ConnectionError, match="the primary refuses writes"):
            submit(farm, [["true"]])
        replica.start()
        servers.wait_ready(30)
        second, _ = submit(farm, [["true"]])
        wait_until(lambda: farm.store.state(second) == JobState.COMPLETED, 60,
                   "a job submitted once the replica is back")
        assert cluster.workers["lonely-node"].poll() is None


# -- settings --------------------------------------------------------------------------------
def test_wait_settings():
    sentinel = "sentinel://:pw@10.0.0.1:26379/0"
    assert ReplicaWait.of(Settings(broker_url=sentinel)) == ReplicaWait(1, 1000)
    assert not ReplicaWait.of(Settings(broker_url="redis://h:6379/0"))  # no replicas
    env = {"CELERYFARM_BROKER_URL": sentinel, "CELERYFARM_WAIT_REPLICAS": "0"}
    assert not ReplicaWait.of(Settings.from_env(env))
    env.update(CELERYFARM_WAIT_REPLICAS="2", CELERYFARM_WAIT_SECONDS="0.5")
    assert ReplicaWait.of(Settings.from_env(env)) == ReplicaWait(2, 500)
    with pytest.raises(ConfigError, match="WAIT_REPLICAS: expected a whole number"):
        Settings.from_env({"CELERYFARM_WAIT_REPLICAS": "-1"})
    with pytest.raises(ConfigError, match="WAIT_SECONDS between 0 and 10 s"):
        Settings(wait_seconds=12)
    lines = ReplicatedRedis(Path("/nonexistent"), replicas=2).servers[0].config()
    assert "min-replicas-to-write 1" in lines and "min-replicas-max-lag 5" in lines


# -- the primary killed in the middle of 300 jobs --------------------------------------------
NODES = ("failover-node1", "failover-node2")
JOBS = 300
#: A step of the test's renders: a start line and an end line (or "killed", on SIGTERM)
#: with the time in ns and the shell's pid, appended to the marker file its argument names.
MARKED_STEP = ('m() { echo "$1 $(date +%s%N) $$" >> "$0"; }; '
               'trap "m killed; exit 143" TERM; m start; sleep "$1" & wait $!; m end')


def marked(markers: Path, name: str, step: int, seconds: float) -> list[str]:
    return ["sh", "-c", MARKED_STEP, str(markers / f"{name}.{step}"), str(seconds)]


def runs(marker: Path) -> list[tuple[int, int | None]]:
    """The (start, end) of each run a marker file records, in ns; end None if the run
    wrote none (it was SIGKILLed)."""
    found: dict[str, list] = {}
    for line in marker.read_text().splitlines():
        what, at, pid = line.split()
        run = found.setdefault(pid, [None, None])
        run[0 if what == "start" else 1] = int(at)
    return sorted((start, end) for start, end in found.values())


def assert_never_two_at_once(marker: Path) -> None:
    ordered = runs(marker)
    for (_start, end), (later, _) in zip(ordered, ordered[1:]):
        assert end is not None and end <= later, f"{marker.name} ran twice at once: {ordered}"


def processes_of(pids: list[int]) -> set[int]:
    """``pids`` and all their descendants now."""
    found = set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    return found


def test_the_primary_killed_mid_300_jobs_every_job_ends_as_intended(tmp_path: Path):
    """300 two-step jobs (0.1 s renders) on two nodes of two slots, a primary, two replicas
    (``min-replicas-to-write 1``, as ``up --replicas`` runs them) and three sentinels. The
    primary is SIGKILLed once a third of the jobs completed, renders running. Then: the
    sentinels promote a replica; a running job and two waiting ones are stopped through
    the new primary; every other job completes. The renders' marker lines show no step
    running twice at once; both nodes take steps from the new primary (Celery issue 6348);
    nothing of the farm is left afterwards. The time from the kill to the next job
    completing on the new primary is printed, not asserted."""
    markers = tmp_path / "markers"
    markers.mkdir()
    cluster = LocalCluster(tmp_path / "farm", extra_env=WORKER_ENV, password=PASSWORD,
                           replicas=2)
    cluster.start()
    farm_pids: list[int] = []
    try:
        for name in NODES:
            cluster.start_worker(name, concurrency=2)
        farm = Farm(Settings.from_env({**cluster.env, "CELERYFARM_USER": "ann"}))
        cluster.wait_for_workers(farm.app, list(NODES))
        servers = cluster.redis
        assert isinstance(servers, ReplicatedRedis)
        farm_pids = [p.process.pid for p in [*servers.servers, *servers.sentinels]]
        long_job, _ = submit(farm, [marked(markers, "long", 0, 600)], name="long")
        jobs = [submit(farm, [marked(markers, f"job{n}", step, 0.1) for step in (0, 1)],
                       name=f"job{n}")[0] for n in range(JOBS)]
        to_stop = [long_job, *jobs[-2:]]
        wanted = jobs[:-2]

        def states() -> dict[str, str]:
            return {record.job_id: record.state for record in farm.store.summaries(jobs)}

        completed = wait_until(
            lambda: (done := [j for j, s in states().items() if s == JobState.COMPLETED])
            and len(done) >= JOBS // 3 and done, 240, f"{JOBS // 3} jobs to complete")
        assert not all(s == JobState.COMPLETED for s in states().values())
        running = [path for path in markers.iterdir() if path.read_text().count("start")
                   > path.read_text().count("end")]
        assert running, "renders run at the kill"

        old = servers.primary()
        killed = time.time()
        old.process.kill()
        old.process.wait()
        # The time the farm takes to carry on: until a job that had not completed at the
        # kill is Completed in the new primary's records.
        carried_on = wait_until(
            lambda: any(state == JobState.COMPLETED and job_id not in completed
                        for job_id, state in states().items()) and time.time(),
            120, "a job to complete after the kill")
        new = servers.primary()
        assert new is not old
        print(f"\nfailover: {len(completed)} of {JOBS} jobs completed at the kill; the next "
              f"job completed {carried_on - killed:.2f} s after it, on the new primary "
              f"(down-after 1 s)")

        for job_id in to_stop:
            farm.stop(job_id)
        ended = wait_until(
            lambda: (found := {r.job_id: r.state for r in farm.store.summaries(
                [*wanted, *to_stop])}) and all(s in (JobState.COMPLETED, JobState.FAILED,
                                                     JobState.CANCELLED)
                                               for s in found.values()) and found,
            240, "every job to end")
        assert {j for j in wanted if ended[j] != JobState.COMPLETED} == set()
        assert {ended[j] for j in to_stop} == {JobState.CANCELLED}

        ran = list(markers.iterdir())
        assert len(ran) >= 2 * len(wanted) + 1  # every step of every job, and the long one
        for marker in ran:
            assert_never_two_at_once(marker)
        for job_id in jobs:
            assert_never_two_current(farm.events(job_id))
        # Both nodes took steps from the new primary (each had lost its connection).
        after = {event["node"].split("@")[0] for job_id in wanted
                 if job_id not in completed for event in farm.events(job_id)
                 if event["event"] == "start" and int(event["at"]) / 1000 > carried_on}
        assert after == set(NODES), after
        farm_pids += processes_of([p.pid for p in cluster.workers.values()])
    finally:
        cluster.stop()
    wait_until(lambda: all_gone(set(farm_pids)), 30, "no process of the farm left")
    renders = [p for p in psutil.process_iter(["cmdline"])
               if str(markers) in " ".join(p.info["cmdline"] or [])]
    assert not renders, renders
