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
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celeryfarm.config import Settings
from celeryfarm.errors import ConfigError
from celeryfarm.farm import Farm
from celeryfarm.records.replication import ReplicaWait
from celeryfarm.records.states import JobState
from celeryfarm.redisserver import RedisServer, ReplicatedRedis

from .helpers import submit, wait_until

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
    assert f"job {job_id} sent: not yet on 1 replica(s)" in caplog.text
    wait_until(lambda: replica_has(replica, job_id) == (True, True), 10,
               "the resumed replica to have the job")


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
