"""Redis Sentinel: a primary, two replicas and three sentinels (real redis-server processes),
real render nodes and clients on the sentinels' ``sentinel://`` URL, and the primary
SIGKILLed in the middle of jobs (the trouble of Celery issue 6348: a worker that does not
follow a failover after losing its primary)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import uuid
from collections.abc import Iterator

import kombu.exceptions
import pytest
import redis

from celeryfarm.celery import celery_config
from celeryfarm.config import Settings, redact
from celeryfarm.errors import ConfigError
from celeryfarm.farm import Farm
from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.redisserver import ReplicatedRedis
from celeryfarm.sentinel import SentinelUrl
from celeryfarm.testing.cluster import LocalCluster

from .cli_fixtures import Up, ok, up_env
from .cli_fixtures import wait_for_state as wait_for_cli_state
from .conftest import WORKER_ENV, join, running
from .helpers import (
    FINISHED,
    assert_never_two_current,
    closing_a_channel_let_go,
    read_log,
    renderboot,
    submit,
    tagged_processes,
    wait_until,
)

NODES = ("sentinel-node1", "sentinel-node2")
URL = "sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26380/2"


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    farm = LocalCluster(tmp_path_factory.mktemp("sentinel-farm"), extra_env=WORKER_ENV,
                        password="sentinel-" + uuid.uuid4().hex, replicas=2)
    with running(farm, NODES, concurrency=2):
        yield farm


@pytest.fixture
def plugin(replicated: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> CeleryFarmPlugin:
    join(replicated, monkeypatch)
    return CeleryFarmPlugin()


def finished(plugin: CeleryFarmPlugin, job_ids: list[str], timeout: float,
             cluster: LocalCluster | None = None) -> dict[str, str]:
    """The jobs' states once every one has finished; if one has not within ``timeout``,
    the failure says where each such job is, which nodes answer, and the nodes' errors."""
    def states() -> dict[str, str] | None:
        found = {job_id: plugin.getJobState(job_id) for job_id in job_ids}
        return found if set(found.values()) <= set(FINISHED) else None

    try:
        return wait_until(states, timeout, f"{len(job_ids)} jobs to finish")
    except AssertionError as error:  # say where each job that did not finish is
        farm = plugin.farm
        stuck = [farm.get(job_id) for job_id in job_ids]
        stuck = {record.job_id: (record.state.value, record.step, record.node,
                                 record.task_ids, farm.events(record.job_id))
                 for record in stuck if record.state.value not in FINISHED}
        logs = sorted(cluster.base.glob("worker-*.log")) if cluster else []
        errors = [line for log in logs for line in log.read_text(errors="replace").splitlines()
                  if "ERROR" in line or "CRITICAL" in line]
        raise AssertionError(f"{error}: {stuck}; nodes answering: "
                             f"{nodes_answering(farm.app)}; the nodes' errors: {errors[-30:]}") \
            from None


def test_jobs_run_through_the_sentinels(plugin: CeleryFarmPlugin, replicated: LocalCluster):
    assert replicated.redis.url.startswith("sentinel://")
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)] * 2, name="sentinel-job")
    assert finished(plugin, [job_id], 60) == {job_id: Job.State.kCompleted}
    # The records are on the primary and on every replica.
    key = plugin.farm.store.keys.job(job_id)
    clients = [redis.Redis.from_url(server.url) for server in replicated.redis.servers]
    wait_until(lambda: all(client.exists(key) for client in clients), 10,
               f"{key} on the primary and both replicas")


def test_the_primary_killed_mid_jobs_every_job_completes(
    plugin: CeleryFarmPlugin, replicated: LocalCluster
):
    """SIGKILL the primary while renders run and steps wait: the sentinels promote a
    replica, and the nodes, the plug-in and the records follow it by themselves. Every job
    submitted before the failover completes, with no step ever current twice at once, and
    jobs submitted after it complete too (the nodes took work from the new primary)."""
    servers = replicated.redis
    assert isinstance(servers, ReplicatedRedis)
    tag = f"failover-{uuid.uuid4().hex[:8]}"
    before = [submit(plugin.farm, [renderboot("--seconds", 0.4, "--tag", tag)] * 2,
                     name=f"before-{n}")[0] for n in range(24)]
    wait_until(lambda: tagged_processes(tag), 60, "renders to run")
    old = servers.primary()
    old.process.kill()
    old.process.wait()
    wait_until(lambda: servers.primary() is not old, 60, "the sentinels to promote a replica")
    after = [submit(plugin.farm, [renderboot("--seconds", 0.1)], name=f"after-{n}")[0]
             for n in range(4)]
    states = finished(plugin, before + after, 240, replicated)
    failed = {job_id: read_log(plugin, job_id).decode(errors="replace")[-800:]
              for job_id, state in states.items() if state != Job.State.kCompleted}
    assert not failed, failed
    for job_id in before:
        assert_never_two_current(plugin.farm.events(job_id))
    wait_until(lambda: not tagged_processes(tag), 30, "no render left")
    # Every node answers through the new primary. (A remote-control call that waits for
    # replies may fail once around a failover, when the sentinels close every client of
    # the servers they reconfigure: kombu does not retry collecting replies.)
    wait_until(lambda: nodes_answering(plugin.farm.app) >= set(NODES), 60,
               "the nodes to answer a ping through the new primary")


def test_the_farm_asks_the_sentinels_nothing_they_refuse(replicated: LocalCluster):
    """The tests above ran every Sentinel client of the farm (kombu's transport in the nodes
    and the plug-in, Celery's result backend, the records' and reapers' clients, the
    remote control) through a failover, with the farm's sentinel password, which may only
    find the primary: no sentinel refused any of them a login or a command."""
    servers = replicated.redis
    assert isinstance(servers, ReplicatedRedis) and replicated.sentinel_password
    for sentinel in servers.sentinels:
        admin = redis.Redis(port=sentinel.port, username="admin", password=servers.password,
                            socket_timeout=5)
        assert admin.execute_command("ACL", "LOG") == []


def nodes_answering(app) -> set[str]:
    try:
        replies = app.control.ping(timeout=1)
    except (redis.ConnectionError, kombu.exceptions.OperationalError):
        return set()
    return {name.split("@")[0] for reply in replies for name in reply}


# -- settings --------------------------------------------------------------------------------
def test_sentinel_urls_name_the_primary_for_every_client():
    settings = Settings(broker_url=URL, sentinel_master="farm-a")
    config = celery_config(settings)
    assert config["broker_transport_options"]["master_name"] == "farm-a"
    assert config["result_backend_transport_options"]["master_name"] == "farm-a"
    # A frozen primary is given up within seconds, by connections that ask the sentinels
    # again (Celery issue 6348).
    assert config["broker_transport"] == "celeryfarm.broker:SentinelTransport"
    assert config["broker_transport_options"]["socket_timeout"] == 10
    assert config["redis_socket_timeout"] == 10
    assert SentinelUrl.parse(URL) == SentinelUrl(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)), None, "pw", 2)
    assert settings.client_environment()["CELERYFARM_SENTINEL_MASTER"] == "farm-a"
    plain = celery_config(Settings())
    assert "master_name" not in plain["broker_transport_options"]
    assert plain["broker_transport"] == "celeryfarm.broker:Transport"
    assert "redis_socket_timeout" not in plain
    assert redact(URL) == ("sentinel://:***@10.0.0.1:26379/2;"
                           "sentinel://:***@10.0.0.2:26380/2")


def test_bad_sentinel_settings_are_refused():
    with pytest.raises(ConfigError, match="BROKER_URL: not a sentinel://host:port address"):
        Settings(broker_url="sentinel://:pw@h:1;redis://h:2")
    with pytest.raises(ConfigError, match="SENTINEL_MASTER: the primary's name is needed"):
        Settings(broker_url=URL, sentinel_master="")


# -- celeryfarm up --replicas ----------------------------------------------------------------
def test_up_with_replicas_survives_its_primary_and_restarts_on_the_last_one(tmp_path):
    """``celeryfarm up --replicas 2``: clients get the sentinels' URL; the primary SIGKILLed,
    a job submitted afterwards completes, ``up`` starts the dead server again (the
    sentinels make it a replica), and a later ``up`` starts on the last primary, with every
    job still there. Every server has the farm's ACL users: an artist added before the
    failover submits after it, and the replicas' user may do nothing but replicate."""
    env = up_env(tmp_path, CELERYFARM_REAP_SECONDS="0.5")
    up = Up(env, "--workers", "1", "--no-flower", "--replicas", "2").wait_ready()
    try:
        assert "sentinel://" in up.output.text and "2 replicas, 3 sentinels" in up.output.text
        exports = [shlex.split(line)[1] for line in ok(env, "env").splitlines()
                   if line.startswith("export ")]
        joined = {**env, **dict(item.split("=", 1) for item in exports)}
        assert joined["CELERYFARM_BROKER_URL"].startswith("sentinel://")
        first = submit_cli(joined, "first")
        wait_for_cli_state(joined, first, ("Completed",))
        added = [shlex.split(line)[1] for line in ok(env, "user", "add", "ann").splitlines()
                 if line.startswith("export ")]
        ann = {**joined, **dict(item.split("=", 1) for item in added)}
        assert ann["CELERYFARM_BROKER_URL"].startswith("sentinel://ann:")

        # A frozen primary (a hung host): up's supervisor would start a dead one again
        # before the sentinels agree it is down, but a frozen one is not dead. Its clients'
        # connections are not reset: Celery issue 6348's case.
        kept = json.loads((tmp_path / "data" / "embedded.json").read_text())
        primary = primary_server(kept)
        as_replica = redis.Redis(port=primary.connection_pool.connection_kwargs["port"],
                                 username="replica", socket_timeout=2,
                                 password=kept["acl_passwords"]["replica"])
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_replica.get("celeryfarm:anything")
        pid = primary.info("server")["process_id"]
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: primary_server(kept, unless=primary) is not None, 60,
                       "a replica to be promoted")
            second = submit_cli(ann, "second")
            assert second.startswith("ann.")
            wait_for_cli_state(joined, second, ("Completed",), timeout=90)
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        assert up.stop() == 0, up.output.text
    kept = json.loads((tmp_path / "data" / "embedded.json").read_text())
    assert kept["redis_primary"] != 0  # the promoted replica starts as the primary next time

    again = Up(env, "--workers", "1", "--no-flower", "--replicas", "2").wait_ready()
    try:
        for job_id in (first, second):
            wait_for_cli_state(joined, job_id, ("Completed",), timeout=10)
    finally:
        assert again.stop() == 0, again.output.text


def submit_cli(env: dict[str, str], name: str) -> str:
    return ok(env, "submit", "--name", name, "--", *renderboot("--seconds", "0.2")).strip()


def primary_server(kept: dict, unless: redis.Redis | None = None) -> redis.Redis | None:
    """A client of the server the sentinels of ``up`` call the primary (None while that is
    still ``unless``)."""
    sentinel = redis.Redis(port=kept["redis_ports"][-1], socket_timeout=2,
                           password=kept["sentinel_password"])
    try:
        _host, port = sentinel.sentinel_get_master_addr_by_name("celeryfarm")
    except redis.RedisError:
        return None
    if unless is not None and unless.connection_pool.connection_kwargs["port"] == int(port):
        return None
    return redis.Redis(port=int(port), username="admin",
                       password=kept["acl_passwords"]["admin"], socket_timeout=2)


def test_a_channel_closed_after_its_connection_leaves_its_deliveries_set_aside(
        replicated: LocalCluster):
    """Seen in CI's failover test (see ``closing_a_channel_let_go``), through the sentinels."""
    closing_a_channel_let_go(Farm(Settings.from_env(replicated.env)))
