"""Security: the record is the truth, input that cannot hurt, programs nodes may run."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celeryfarm import admission, passwords
from celeryfarm.celery import RENDER_STEP
from celeryfarm.config import Settings
from celeryfarm.errors import FarmError
from celeryfarm.farm import Farm
from celeryfarm.farmapi import FarmPluginException, Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.reaper import Reaper
from celeryfarm.records.fields import SUMMARY_FIELDS
from celeryfarm.records.keys import short_id
from celeryfarm.redisserver import free_port
from celeryfarm.testing.cluster import LocalCluster

from . import cli_fixtures
from .helpers import http_status, read_log, renderboot, submit, wait_for_state, wait_until

State = Job.State


def test_a_forged_message_for_a_real_job_never_runs_its_command(
    plugin: CeleryFarmPlugin, cluster: LocalCluster, tmp_path: Path
):
    """A message carrying a waiting job's current token but another command is refused and
    logged by the node, and leaves the job as it was (whoever sent it cannot end it): the
    node runs only what the job's record holds."""
    marker = tmp_path / "forged-ran"
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)],
                       settings={"pool": f"nobody-{uuid.uuid4().hex[:6]}"})
    record = plugin.farm.get(job_id)
    assert record.state == State.kWaiting
    forged = ["touch", str(marker)]
    task_id = record.task_ids[0]
    plugin.farm.app.send_task(RENDER_STEP, queue="renders", task_id=task_id, kwargs={
        "job_id": job_id, "attempt": record.attempt, "dispatch": record.dispatch, "step": 0,
        "steps": 1, "name": record.spec.name, "command": forged})
    wait_until(lambda: f"refused the message of task {task_id}: its command is not the job "
                       f"record's" in worker_logs(cluster), 30, "the node to refuse it")
    assert not marker.exists()
    assert plugin.farm.get(job_id).state == State.kWaiting
    plugin.stopJob(job_id)  # no node serves its pool: other tests list the waiting jobs


def worker_logs(cluster: LocalCluster) -> str:
    return "".join(path.read_text(errors="replace") for path in cluster.base.glob("worker-*.log"))


# -- programs nodes may run ------------------------------------------------------------------
@pytest.fixture(scope="module")
def allowlisted(cluster: LocalCluster) -> Iterator[str]:
    """A node that may run only this Python (the stand-in renderboot); its pool."""
    pool, name = f"allowlisted-{uuid.uuid4().hex[:6]}", f"allowlisted-{uuid.uuid4().hex[:6]}"
    allowed = f"{os.path.dirname(os.path.realpath(sys.executable))}/python*"
    cluster.start_worker(name, concurrency=1, queues=pool,
                         env={"CELERYFARM_ALLOWED_PROGRAMS": f" /nowhere/*, {allowed}"})
    try:
        cluster.wait_for_workers(Farm(Settings.from_env(cluster.env)).app, [name])
        yield pool
    finally:
        cluster.stop_worker(name)


def test_an_allowed_program_runs(plugin: CeleryFarmPlugin, allowlisted: str):
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)], settings={"pool": allowlisted})
    assert wait_for_state(plugin, job_id) == State.kCompleted


@pytest.mark.parametrize("by_path", [False, True])
def test_a_program_outside_the_allowlist_fails_the_job_and_nothing_runs(
    plugin: CeleryFarmPlugin, allowlisted: str, tmp_path: Path, by_path: bool
):
    """Refused by its absolute path, whether named so or found on a PATH the job sets."""
    marker = tmp_path / "ran"
    if by_path:
        program = tmp_path / "renderboot"
        program.write_text(f"#!/bin/sh\ntouch {marker}\n")
        program.chmod(0o755)
        command, environment = ["renderboot"], {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    else:
        program, command, environment = Path(shutil.which("touch")), ["touch", str(marker)], {}
    context = plugin.farm.create_context()
    job_id = plugin.farm.submit_commands([command], context=context.name,
                                         environment=environment,
                                         settings={"pool": allowlisted}).job_id
    assert wait_for_state(plugin, job_id) == State.kFailed
    assert not marker.exists()
    reason = plugin.farm.get(job_id).reason
    assert f"program {program} is not one this node may run" in reason
    assert f"program {program} is not one this node may run".encode() in read_log(plugin, job_id)


def test_the_allowlist_matches_the_resolved_program(tmp_path: Path):
    real = tmp_path / "katana" / "bin" / "renderboot"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    link = tmp_path / "renderboot"
    link.symlink_to(real)
    allowed = [f"{tmp_path}/katana/bin/*"]
    assert admission.allowed_program("renderboot", allowed, str(real.parent)) == str(real)
    assert admission.allowed_program(str(link), allowed, None) == str(link)  # links to it
    with pytest.raises(admission.Refused, match="not found"):
        admission.allowed_program("no-such-program", allowed, str(tmp_path))
    with pytest.raises(admission.Refused, match="not one this node may run"):
        admission.allowed_program("sh", allowed, "/bin:/usr/bin")


# -- input that cannot hurt ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "x" * (10 * 1024 * 1024)}, "the job name is 10485760 characters long; at most"),
        ({"name": "shot010\nfake log line"}, "contains control characters"),
        ({"commands": [["renderboot", "x" * 200_000]]}, "command 1 is 200012 bytes long"),
        ({"commands": [["true"]] * 10_001}, "the job has 10001 commands; at most 10000"),
        ({"environment": {"BIG": "x" * 300_000}}, "bytes long; at most 262144 are allowed"),
        ({"settings": {"pool": "renders\n"}}, "invalid pool name 'renders\\n'"),
    ],
)
def test_oversized_or_malformed_input_is_refused_with_a_clear_message(
    plugin: CeleryFarmPlugin, fields: dict, message: str
):
    context = plugin.farm.create_context()
    request = {"commands": [["true"]], "name": "Render", **fields}
    with pytest.raises(FarmError) as raised:
        plugin.farm.submit_commands(request.pop("commands"), context=context.name, **request)
    assert message in str(raised.value)
    assert plugin.getJobs(None) == []  # nothing was created: this test's user has no job


def test_a_context_name_with_a_trailing_newline_is_refused(plugin: CeleryFarmPlugin):
    with pytest.raises(FarmPluginException, match="invalid render context name"):
        plugin.createTemporaryDirectory("ctx\n")


@pytest.fixture
def corrupt_job(plugin: CeleryFarmPlugin) -> Iterator[tuple[str, str]]:
    """(a waiting job of this test's user whose record is then corrupted, a sound one)."""
    pool = {"pool": f"nobody-{uuid.uuid4().hex[:6]}"}
    bad, _ = submit(plugin.farm, [["true"]], settings=pool)
    good, _ = submit(plugin.farm, [["true"]], settings=pool)
    yield bad, good
    for job_id in (bad, good):
        plugin.farm.store.redis.delete(plugin.farm.store.keys.job(job_id))


@pytest.mark.parametrize("field, value", [("state", "Bogus"), ("commands", "[not json"),
                                          ("submitted", "yesterday"),
                                          ("log", "../../etc/passwd")])
def test_a_corrupt_record_is_a_clear_error_and_the_others_are_still_listed(
    plugin: CeleryFarmPlugin, corrupt_job: tuple[str, str], farm_env: dict, field: str,
    value: str
):
    bad, good = corrupt_job
    plugin.farm.store.redis.hset(plugin.farm.store.keys.job(bad), field, value)
    with pytest.raises(FarmPluginException) as raised:
        plugin.getRenderLogFilename(bad) if field == "log" else plugin.getJobState(bad)
    assert bad in str(raised.value) or "escapes the shared root" in str(raised.value)
    listed = [job.jobId for job in plugin.getJobs(None)]
    assert good in listed
    assert (bad in listed) == (field not in SUMMARY_FIELDS)  # listings read only those
    env = {**cli_fixtures.base_env(), **farm_env}
    listing = cli_fixtures.cli(env, "jobs", "--mine")
    assert listing.returncode == 0 and short_id(good) in listing.stdout, listing.stderr
    if field != "log":
        status = cli_fixtures.cli(env, "status", bad)
        assert status.returncode == 1
        assert status.stderr.count("\n") == 1 and bad in status.stderr
        assert "Traceback" not in status.stderr


def test_a_corrupt_record_never_stops_the_reaper(plugin: CeleryFarmPlugin,
                                                 corrupt_job: tuple[str, str]):
    """A corrupt job in the outbox and one with an expired lease: each pass goes on, and
    the outbox entry is dropped rather than re-sent for ever."""
    bad, good = corrupt_job
    store = plugin.farm.store
    store.redis.hset(store.keys.job(bad), mapping={"commands": "[not json", "lost": "many"})
    store.redis.zadd(store.keys.outbox, {bad: 1})
    store.redis.zadd(store.keys.leases, {good: 1})
    store.redis.hset(store.keys.job(good), "lost", "many")  # reap.lua cannot count it
    reaper = Reaper(plugin.farm.app, store, plugin.farm.settings)
    reaper.reap_once()  # raises nothing
    wait_until(lambda: store.redis.zscore(store.keys.outbox, bad) is None, 30,
               "the corrupt job to leave the outbox")
    assert store.redis.zscore(store.keys.leases, good) is None


# -- two farms on one Redis ------------------------------------------------------------------
def test_two_farms_on_one_redis_never_touch_each_others_steps(
    cluster: LocalCluster, plugin: CeleryFarmPlugin
):
    """Farm B (another KEY_PREFIX) has a node on pool P; farm A has none there. A's job on P
    waits (B's node never takes it), B's runs on B's node, and A's nodes cannot see B's."""
    pool, name = f"p-{uuid.uuid4().hex[:6]}", f"farmb-{uuid.uuid4().hex[:6]}"
    env_b = {**cluster.env, "CELERYFARM_KEY_PREFIX": "farmb"}
    farm_b = Farm(Settings.from_env(env_b))
    cluster.start_worker(name, concurrency=1, queues=f"renders,{pool}", env=env_b)
    try:
        cluster.wait_for_workers(farm_b.app, [name])
        assert name not in str(plugin.farm.app.control.ping(timeout=1))
        job_a, _ = submit(plugin.farm, [["true"]], settings={"pool": pool})
        job_b, _ = submit(farm_b, [["true"]], settings={"pool": pool})
        job_b_default, _ = submit(farm_b, [["true"]])
        for job_id in (job_b, job_b_default):
            wait_until(lambda job_id=job_id: farm_b.get(job_id).finished, 60, "B's jobs")
            record = farm_b.get(job_id)
            assert (record.state, record.node.split("@")[0]) == (State.kCompleted, name)
        assert plugin.farm.get(job_a).state == State.kWaiting
        plugin.farm.stop(job_a)
    finally:
        cluster.stop_worker(name)


# -- secure by default -----------------------------------------------------------------------
@pytest.mark.parametrize(("password", "problem"), [
    ("", "is empty"), ("change-me", "placeholder"), ("Change_Me-0123456789abcdef", "placeholder"),
    ("s3cret", "shorter than 16"), ("a" * 15, "shorter than 16"), (secrets.token_hex(8), ""),
])
def test_weak_passwords_are_named(password: str, problem: str):
    assert problem in passwords.weakness(password) and bool(problem) == bool(
        passwords.weakness(password))


@pytest.mark.parametrize("char", ["@", "/", "#", "%", ":", "?", "+", " "])
def test_the_preflight_refuses_passwords_that_would_break_redis_urls(
    char: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """The compose file writes its passwords into redis://user:password@ URLs as they are."""
    bad = f"{secrets.token_hex(8)}{char}{secrets.token_hex(8)}"
    monkeypatch.setenv("CELERYFARM_REDIS_NODE_PASSWORD", bad)
    monkeypatch.setenv("CELERYFARM_REDIS_ADMIN_PASSWORD", secrets.token_hex(16))
    assert passwords.main(["CELERYFARM_REDIS_ADMIN_PASSWORD",
                           "CELERYFARM_REDIS_NODE_PASSWORD"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("refusing to start: CELERYFARM_REDIS_NODE_PASSWORD holds characters "
                           "other than letters (A-Z, a-z), digits (0-9) and - . _ ~")
    assert bad not in line
    assert passwords.preflight_problem(secrets.token_hex(16) + "XYZ") == ""
    # URL-safe characters pass: those of secrets.token_urlsafe, and . ~
    assert passwords.preflight_problem(secrets.token_urlsafe(24) + "-_.~") == ""


def test_the_example_env_file_holds_no_password_that_passes():
    """What the compose file's preflight service checks, on .env.example as it is."""
    example = Path(__file__).parent.parent / ".env.example"
    values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    names = [name for name in values if name.endswith("PASSWORD")]
    assert names == ["CELERYFARM_REDIS_ADMIN_PASSWORD", "CELERYFARM_REDIS_NODE_PASSWORD",
                     "CELERYFARM_REDIS_FLOWER_PASSWORD", "CELERYFARM_FLOWER_PASSWORD",
                     "CELERYFARM_REDIS_REPLICA_PASSWORD", "CELERYFARM_REDIS_SENTINEL_PASSWORD",
                     "CELERYFARM_SENTINEL_PASSWORD"]
    check = subprocess.run([sys.executable, "-m", "celeryfarm.passwords", *names],
                           env={**os.environ, **values}, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 1
    assert check.stderr.count("refusing to start") == len(names)
    strong = {name: secrets.token_hex(16) for name in names}
    assert subprocess.run([sys.executable, "-m", "celeryfarm.passwords", *names],
                          env={**os.environ, **strong}, timeout=60).returncode == 0


def test_up_refuses_a_weak_flower_password_and_starts_nothing(tmp_path: Path):
    env = cli_fixtures.up_env(tmp_path, CELERYFARM_FLOWER_PASSWORD="change-me")
    result = cli_fixtures.cli(env, "up", timeout=60)
    assert result.returncode == 1
    assert "CELERYFARM_FLOWER_PASSWORD is still the placeholder" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "data" / "redis").exists()


def test_redis_has_a_memory_cap_and_never_evicts(cluster: LocalCluster):
    client = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert int(client.config_get("maxmemory")["maxmemory"]) == 1024 ** 3


@pytest.fixture(scope="module")
def flower(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Flower as celeryfarm runs it, with a login; its URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("flower") / "flower.log", "wb")  # noqa: SIM115
    env = {**os.environ, **cluster.env, "FLOWER_BASIC_AUTH": "admin:" + FLOWER_PASSWORD}
    process = subprocess.Popen(
        [sys.executable, "-m", "celeryfarm.flower", "--address=127.0.0.1", f"--port={port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(f"{url}/healthcheck") == 200 or process.poll() is not None,
                   60, "Flower to answer")
        assert process.poll() is None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


FLOWER_PASSWORD = secrets.token_hex(12)


def _status(url: str, login: bool = False, **options) -> int:
    return http_status(url, ("admin", FLOWER_PASSWORD) if login else None, **options)


def test_flowers_metrics_need_its_login(flower: str):
    assert _status(f"{flower}/metrics") == 401
    assert _status(f"{flower}/metrics", login=True) == 200


def test_flower_refuses_cross_site_requests_to_its_api(flower: str):
    """The pinned Flower checks where API calls come from, even with the right login: a
    page elsewhere cannot make an admin's browser revoke steps."""
    revoke = f"{flower}/api/task/revoke/{uuid.uuid4()}"
    assert _status(revoke, login=True, method="POST") == 200  # from Flower's own pages
    assert _status(revoke, login=True, method="POST",
                   headers={"Sec-Fetch-Site": "cross-site"}) == 403
    assert _status(revoke, login=True, method="POST",
                   headers={"Origin": "http://evil.example"}) == 403
