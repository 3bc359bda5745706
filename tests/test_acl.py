"""Roles as Redis ACL users: Redis itself refuses what a credential may not do.

A farm whose Redis has the ACL roles of :mod:`celeryfarm.acl`: a render node running with
only the ``node`` user, Flower with only ``flower``, and artists with their own users. Each
test acts with an artist's credential as a workstation would, with the plug-in, redis-py
or ``redis-cli``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import states

from celeryfarm import acl
from celeryfarm.celery import RENDER_STEP
from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.farmapi import FarmPluginException, Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.redisserver import RedisServer, free_port
from celeryfarm.testing.cluster import LocalCluster

from .conftest import WORKER_ENV
from .helpers import (
    all_gone,
    http_status,
    pids_of,
    renderboot,
    submit,
    tagged_processes,
    wait_for_state,
    wait_until,
)

State = Job.State
NODE = "aclnode"


@pytest.fixture(scope="module")
def acl_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A farm whose Redis has the ACL roles, and one render node that has only ``node``'s."""
    farm = LocalCluster(tmp_path_factory.mktemp("aclfarm"), extra_env=WORKER_ENV,
                        acl_users=True).start()
    try:
        farm.start_worker(NODE, concurrency=1)
        farm.wait_for_workers(Farm(Settings.from_env(farm.env)).app, [NODE])
        yield farm
    finally:
        farm.stop()


def artist_plugin(farm: LocalCluster, name: str, monkeypatch: pytest.MonkeyPatch,
                  wrangler: bool = False, **env: str) -> CeleryFarmPlugin:
    """The plug-in on the workstation of a new artist ``name``, with that artist's own
    credential (what ``celeryfarm user add`` hands out)."""
    url = farm.add_artist(name, wrangler)
    for key, value in {**farm.env, "CELERYFARM_BROKER_URL": url, **env}.items():
        monkeypatch.setenv(key, value)
    plugin = CeleryFarmPlugin()
    assert plugin.farm.user == name  # made now, while the environment is this artist's
    return plugin


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def ann(acl_farm: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> CeleryFarmPlugin:
    return artist_plugin(acl_farm, unique("ann"), monkeypatch)


@pytest.fixture
def bob(acl_farm: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> CeleryFarmPlugin:
    return artist_plugin(acl_farm, unique("bob"), monkeypatch)


def long_job(plugin: CeleryFarmPlugin, tag: str) -> str:
    job_id, _ = submit(plugin.farm, [renderboot("--live", "--tag", tag)])
    wait_for_state(plugin, job_id, State.kRunning)
    wait_until(lambda: tagged_processes(tag), 30, "the render")
    return job_id


# -- what an artist's credential cannot do --------------------------------------------------
@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "0"), ("KEYS", "*"),
    ("ACL", "SETUSER", "mallory", "on", ">pw", "+@all", "~*"), ("MODULE", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"), ("FUNCTION", "FLUSH"), ("SCRIPT", "FLUSH"),
    ("MONITOR",),
])
def test_an_artist_cannot_administer_redis(ann: CeleryFarmPlugin, command: tuple[str, ...]):
    with pytest.raises(redis.exceptions.NoPermissionError):
        ann.farm.store.redis.execute_command(*command)


@pytest.mark.parametrize("command", [
    ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "127.0.0.1", "1"), ("SLAVEOF", "127.0.0.1", "1"),
    ("DEBUG", "SLEEP", "0"),
])
def test_an_artist_may_not_run_what_would_end_redis(acl_farm: LocalCluster,
                                                    ann: CeleryFarmPlugin,
                                                    command: tuple[str, ...]):
    """Asked of Redis's ACL without running it (``ACL DRYRUN``), as a wrong answer would
    end this test's Redis."""
    admin = redis.Redis.from_url(acl_farm.url_as(acl.ADMIN), decode_responses=True)
    verdict = admin.execute_command("ACL", "DRYRUN", ann.farm.user, *command)
    assert "has no permissions to run" in verdict
    assert admin.execute_command("ACL", "DRYRUN", acl.ADMIN, *command) == "OK"


def test_only_admin_may_administer_redis(acl_farm: LocalCluster):
    for role in (acl.NODE, acl.FLOWER):
        client = redis.Redis.from_url(acl_farm.url_as(role))
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_get("maxmemory")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.keys("*")
    admin = redis.Redis.from_url(acl_farm.url_as(acl.ADMIN), decode_responses=True)
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert admin.acl_whoami() == "admin"
    # The default user is off: no password, or the old shared one, gets in.
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=acl_farm.redis.port).ping()
    for password in ("", "nopass", acl_farm.passwords[acl.ADMIN]):
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=acl_farm.redis.port, username="default", password=password).ping()


def test_an_artist_cannot_write_another_artists_record(ann: CeleryFarmPlugin,
                                                       bob: CeleryFarmPlugin):
    """Nor take it out of the shared structures: Redis refuses, whatever the client."""
    job_id, _ = submit(ann.farm, [renderboot("--seconds", 0.1)],
                       settings={"pool": unique("nobody")})
    keys, client = bob.farm.store.keys, bob.farm.store.redis
    assert client.hget(keys.job(job_id), "state") == "Waiting"  # reading is allowed
    refused = [
        lambda: client.hset(keys.job(job_id), "state", "Cancelled"),
        lambda: client.delete(keys.job(job_id)),
        lambda: client.zrem(keys.index("user", ann.farm.user), job_id),
        lambda: client.set(keys.snapshot(ann.farm.user), "v1 0"),
        lambda: client.zrem(keys.index(), job_id),
        lambda: client.lrem(keys.inbox, 0, job_id),
        lambda: client.delete(keys.inbox),
        lambda: client.zrem(keys.awaiting, job_id),
        lambda: client.zrem(keys.outbox, job_id),
        lambda: client.delete(f"{bob.farm.settings.broker_key_prefix}{unique('q')}"),
        lambda: client.rename(keys.job(job_id), keys.job(f"{bob.farm.user}.{uuid.uuid4().hex}")),
        lambda: client.set(f"celery-task-meta-{job_id}-1.1-0", "{}"),
    ]
    for index, write in enumerate(refused):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
            pytest.fail(f"write {index} was allowed")
    # redis-cli with bob's credential, as anyone on his workstation could.
    cli = subprocess.run(
        ["redis-cli", "-u", bob.farm.settings.broker_url, "HSET", keys.job(job_id), "command",
         "rm -rf /"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "REDISCLI_AUTH": ""})
    assert "NOPERM" in cli.stdout + cli.stderr
    assert ann.getJobState(job_id) == State.kWaiting
    assert ann.farm.store.redis.hget(keys.job(job_id), "command") is None


def test_an_artist_cannot_stop_or_restart_another_artists_job(
    acl_farm: LocalCluster, ann: CeleryFarmPlugin, bob: CeleryFarmPlugin,
    monkeypatch: pytest.MonkeyPatch,
):
    """Refused by Redis, as a clear FarmPluginException, and nothing half done; a
    wrangler may."""
    tag = unique("acl-stop")
    job_id = long_job(ann, tag)
    with pytest.raises(FarmPluginException, match=r"may not stop job .*another artist's job"):
        bob.stopJob(job_id)
    assert ann.getJobState(job_id) == State.kRunning and tagged_processes(tag)
    ann.stopJob(job_id)
    wait_for_state(ann, job_id, State.kCancelled)
    with pytest.raises(FarmPluginException, match="may not restart job"):
        bob.startJob(job_id)
    record = ann.farm.get(job_id)
    assert (record.state, record.attempt) == (State.kCancelled, 1)
    wrangler = artist_plugin(acl_farm, unique("wrangler"), monkeypatch, wrangler=True)
    wrangler.startJob(job_id)
    wait_for_state(ann, job_id, State.kRunning)
    wrangler.stopJob(job_id)
    wait_for_state(ann, job_id, State.kCancelled)
    wait_until(lambda: not tagged_processes(tag), 30, "the render to be gone")
    assert "stopped by " + wrangler.farm.user in ann.farm.get(job_id).reason


# -- forged messages and revokes -------------------------------------------------------------
def node_log(farm: LocalCluster) -> str:
    return (farm.base / f"worker-{NODE}.log").read_text(errors="replace")


def test_forged_step_messages_cannot_run_or_end_another_artists_job(
    acl_farm: LocalCluster, ann: CeleryFarmPlugin, bob: CeleryFarmPlugin, tmp_path: Path
):
    """Bob may push to the queue, so he can forge a step message for Ann's job: with
    another command, with another task id than its step's, with bad arguments, without the
    rest of the job's steps, or for a task no node has. None runs anything, and none fails
    or cancels her job, which stays as she submitted it."""
    marker = tmp_path / "forged-ran"
    pool = unique("held")
    job_id, _ = submit(ann.farm, [renderboot("--seconds", 0.1)] * 2, settings={"pool": pool})
    record = ann.farm.get(job_id)
    task_id = record.task_ids[0]
    real = list(record.spec.commands[0])
    kwargs = {"job_id": job_id, "attempt": record.attempt, "dispatch": record.dispatch,
              "step": 0, "steps": 2, "name": record.spec.name, "command": ["touch", str(marker)]}
    app = bob.farm.app
    forged = [
        (RENDER_STEP, task_id, kwargs),
        (RENDER_STEP, f"{job_id}-1.1-7", {**kwargs, "command": real}),
        (RENDER_STEP, task_id, {"job_id": job_id}),
        # Its real first step alone, as if the last: it would leave the second unsent.
        (RENDER_STEP, task_id, {**kwargs, "command": real, "steps": 1}),
        ("celeryfarm.no_such_task", task_id, {}),
    ]
    for name, forged_id, arguments in forged:
        app.send_task(name, queue="renders", task_id=forged_id, kwargs=arguments)
    backend = ann.farm.app.backend
    # The node refused each (Celery itself records the unregistered one as FAILURE) ...
    refused = f"refused the message of task {task_id}: "
    wait_until(lambda: node_log(acl_farm).count(refused) == 3
               and f"refused the message of task {job_id}-1.1-7: " in node_log(acl_farm)
               and backend.get_task_meta(task_id)["status"] == states.FAILURE, 60,
               "the node to refuse every forged message")
    assert f"{refused}its command is not the job record's" in node_log(acl_farm)
    assert f"{refused}it does not carry the job's remaining steps" in node_log(acl_farm)
    # ... and Ann's job is as it was: Waiting, and it runs when a node of its pool comes.
    assert ann.getJobState(job_id) == State.kWaiting
    assert not marker.exists()


def test_an_artist_cannot_revoke_another_artists_step(ann: CeleryFarmPlugin,
                                                      bob: CeleryFarmPlugin):
    """Celery's remote control (revoke, terminate) is not an artist's: Redis refuses the
    publish, and the render goes on until its owner stops it through the record."""
    tag = unique("acl-revoke")
    job_id = long_job(ann, tag)
    renders = pids_of(tagged_processes(tag))
    task_ids = list(ann.farm.get(job_id).task_ids)
    with pytest.raises(Exception) as raised:
        bob.farm.app.control.revoke(task_ids, terminate=True, signal="SIGKILL")
    assert "NOPERM" in repr(raised.value) or "permission" in repr(raised.value).lower()
    assert ann.getJobState(job_id) == State.kRunning and not all_gone(renders)
    ann.stopJob(job_id)  # the owner's stop is a write to the record, seen by the node
    wait_for_state(ann, job_id, State.kCancelled)
    wait_until(lambda: all_gone(renders), 30, "the render to be gone")


# -- identity and the roles at work ----------------------------------------------------------
def test_a_jobs_user_is_the_authenticated_redis_user(acl_farm: LocalCluster,
                                                     monkeypatch: pytest.MonkeyPatch):
    """Not CELERYFARM_USER: on a farm with ACL users, that only names the login."""
    name = unique("cat")
    plugin = artist_plugin(acl_farm, name, monkeypatch, CELERYFARM_USER="somebody-else")
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)])
    record = plugin.farm.get(job_id)
    assert record.spec.user == name and job_id.startswith(f"{name}.")
    assert [job.jobId for job in plugin.getJobs(None)] == [job_id]
    assert wait_for_state(plugin, job_id) == State.kCompleted


def test_a_node_and_flower_work_with_only_their_roles(acl_farm: LocalCluster,
                                                      ann: CeleryFarmPlugin, tmp_path: Path):
    """The node (``node`` user) runs Ann's two-step job; Flower (``flower`` user) shows it
    and Celery's workers; the node's reaper indexed it for everyone."""
    port = free_port()
    login = ("admin", uuid.uuid4().hex)
    flower = subprocess.Popen(
        [sys.executable, "-m", "celeryfarm.flower", "--address=127.0.0.1", f"--port={port}"],
        env={**os.environ, **acl_farm.env, "CELERYFARM_BROKER_URL": acl_farm.url_as(acl.FLOWER),
             "FLOWER_BASIC_AUTH": ":".join(login)},
        stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        job_id, _ = submit(ann.farm, [renderboot("--seconds", 0.1)] * 2, name="acl-e2e")
        assert wait_for_state(ann, job_id) == State.kCompleted
        wait_until(lambda: job_id in ann.farm.store.ids(), 30, "a node to index the job")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{url}/api/tasks?limit=1000", login) == 200, 60,
                   "Flower to answer")

        def flower_shows_the_job() -> bool:
            import json
            import urllib.request
            request = urllib.request.Request(f"{url}/api/tasks?limit=1000")
            request.add_header("Authorization", "Basic " + __import__("base64").b64encode(
                ":".join(login).encode()).decode())
            with urllib.request.urlopen(request, timeout=10) as response:
                tasks = json.load(response)
            return any(task_id.startswith(job_id) for task_id in tasks)

        # Nodes send task events only once Flower has turned them on (its enable_events
        # control, through Celery's remote control, which its role may use).
        wait_until(lambda: "Events of group {task} enabled by remote" in node_log(acl_farm),
                   60, "Flower to turn the node's task events on")
        job_id, _ = submit(ann.farm, [renderboot("--seconds", 0.1)], name="acl-e2e-2")
        wait_until(flower_shows_the_job, 60, "Flower to show the job's steps")
        assert http_status(f"{url}/api/workers?refresh=1", login) == 200
        log = (tmp_path / "flower.log").read_text(errors="replace")
        assert "NOPERM" not in log, log
    finally:
        flower.terminate()
        flower.wait(30)
    assert "NOPERM" not in node_log(acl_farm)


def test_an_artists_transactions_survive_a_redis_restart(tmp_path: Path):
    """Redis 7 replays the append-only file's MULTI/EXEC blocks as its default user and
    checks them again: the farm's ACL file keeps that user off but with its rights, or
    every submission would be lost at a restart."""
    farm = LocalCluster(tmp_path, acl_users=True).start()
    try:
        client = redis.Redis.from_url(farm.add_artist("dee"), decode_responses=True)
        keys = Farm(Settings.from_env(farm.env)).store.keys
        job = keys.job("dee.1")
        client.pipeline(transaction=True).hset(job, "state", "Waiting") \
            .rpush(keys.inbox, "dee.1").execute()
        farm.redis.stop()
        farm.redis.start()
        assert client.hget(job, "state") == "Waiting"
        assert client.lrange(keys.inbox, 0, -1) == ["dee.1"]
    finally:
        farm.stop()


def test_the_compose_preflight_writes_the_roles_for_redis(tmp_path: Path):
    """``python -m celeryfarm.acl PATH`` (the compose file's preflight): the roles with the
    passwords of its environment as hashes, which a Redis then loads."""
    passwords = {role: uuid.uuid4().hex for role in acl.ROLES}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CELERYFARM_")},
           **{acl.password_variable(role): password for role, password in passwords.items()}}
    path = tmp_path / "roles.acl"
    subprocess.run([sys.executable, "-m", "celeryfarm.acl", str(path)], env=env, check=True,
                   timeout=60)
    assert not any(password in path.read_text() for password in passwords.values())
    server = RedisServer(tmp_path / "redis", password=passwords[acl.ADMIN], user=acl.ADMIN,
                         acl_file=path).start()
    try:
        node = redis.Redis(port=server.port, username=acl.NODE, password=passwords[acl.NODE])
        assert node.acl_whoami() == "node"
        with pytest.raises(redis.exceptions.NoPermissionError):
            node.flushall()
    finally:
        server.stop()
    del env[acl.password_variable(acl.FLOWER)]
    refused = subprocess.run([sys.executable, "-m", "celeryfarm.acl", str(path)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "CELERYFARM_REDIS_FLOWER_PASSWORD not set" in \
        refused.stderr


def test_listings_follow_every_change_with_artists_credentials(ann: CeleryFarmPlugin,
                                                               bob: CeleryFarmPlugin):
    """Ann's plug-in keeps her listing from her own change feed, which her client's writes
    (a submission, a stop) and the nodes' (a start, an end) both reach; Bob sees her jobs
    by a user filter and, once a node indexed them, in the listing of every job, where his
    own show at once."""

    def states(plugin: CeleryFarmPlugin, filters=None) -> dict[str, str]:
        return {job.jobId: job.state for job in plugin.getJobs(filters)}

    done, _ = submit(ann.farm, [renderboot("--seconds", 0.1)])
    assert list(states(ann)) == [done]  # the first call reads her index
    wait_until(lambda: states(ann)[done] == State.kCompleted, 60, "the listing to say done")
    tag = unique("acl-listing")
    running = long_job(ann, tag)
    renders = pids_of(tagged_processes(tag))
    assert states(ann)[running] == State.kRunning
    ann.stopJob(running)
    assert states(ann) == {running: State.kCancelled, done: State.kCompleted}
    changed, _ = ann.farm.store.changes_since(ann.farm.user, 0)
    assert set(changed) == {done, running}  # her feed, not a fresh read, said so
    assert not ann.farm.store.redis.exists(ann.farm.store.keys.changes(bob.farm.user))
    # Her first listing wrote her snapshot with her own credential; a new session of hers
    # starts from it.
    assert ann.farm.store.redis.exists(ann.farm.store.keys.snapshot(ann.farm.user))
    assert states(CeleryFarmPlugin(Farm(ann.farm.settings))) == states(ann)

    assert states(bob, {"user": ann.farm.user}) == states(ann)
    mine, _ = submit(bob.farm, [["true"]])
    assert mine in states(bob, [{"renderType": "Disk"}])
    wait_until(lambda: running in bob.farm.store.ids(), 30, "a node to index Ann's jobs")
    assert {mine, running, done} <= set(states(bob, [{"renderType": "Disk"}]))
    wait_until(lambda: all_gone(renders), 30, "the render to be gone")


def test_an_artist_user_made_before_snapshots_still_lists(acl_farm: LocalCluster,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture):
    """An artist user made by an earlier celeryfarm may not write the listing snapshot:
    listings still work (each session reads every record) and say how to allow it."""
    carol = artist_plugin(acl_farm, unique("carol"), monkeypatch)
    name, keys = carol.farm.user, carol.farm.store.keys
    admin = redis.Redis.from_url(acl_farm.redis.url)
    older = [rule for rule in acl.artist_rules(name, acl_farm.settings)
             if rule.startswith(("~", "%R~")) and rule != f"~{keys.snapshot(name)}"]
    admin.execute_command("ACL", "SETUSER", name, "resetkeys", *older)
    job, _ = submit(carol.farm, [["true"]])
    with caplog.at_level(logging.WARNING, logger="celeryfarm.listing"):
        assert [j.jobId for j in carol.getJobs(None)] == [job]
        fresh = CeleryFarmPlugin(Farm(carol.farm.settings))
        assert [j.jobId for j in fresh.getJobs(None)] == [job]
    assert f"celeryfarm user add {name}" in caplog.text
    assert not admin.exists(keys.snapshot(name))
