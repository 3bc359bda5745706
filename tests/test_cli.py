"""The ``celeryfarm`` command line, with real processes: ``celeryfarm up`` (embedded
redis-server, celery workers, Flower) started by the tests, jobs submitted and watched
through the command line, the stand-in renderboot as the renderer."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis

from celeryfarm.config import Settings
from celeryfarm.localfarm import embedded_admin_url
from celeryfarm.records.keys import short_id
from celeryfarm.redisserver import free_port

from .cli_fixtures import (
    CELERYFARM,
    RENDERBOOT,
    Output,
    Up,
    alive,
    base_env,
    cli,
    job_status,
    ok,
    processes_tagged,
    up_env,
    wait_for_state,
    wait_until,
)

HEX32 = re.compile(r"^[^.]+(\.[^.]+)*\.[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """One ``celeryfarm up`` (1 node with 2 slots, Flower) shared by this module's tests."""
    base = tmp_path_factory.mktemp("farm")
    env = up_env(base, CELERYFARM_FLOWER_PORT=str(free_port()))
    up = Up(env, "--workers", "1", "--concurrency", "2").wait_ready()
    up.base = base
    yield up
    assert up.stop() == 0, up.output.text


def submit(env, *argv: str, name: str = "test") -> str:
    job_id = ok(env, "submit", "--name", name, "--", *argv).strip()
    assert HEX32.match(job_id), job_id
    return job_id


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert a command failed with one line on stderr holding ``fragments``."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- up ---------------------------------------------------------------------------------------
def test_up_prints_how_to_join_and_keeps_the_password_private(farm):
    output = farm.output.text
    exports = dict(re.findall(r"^export (\w+)=(.*)$", ok(farm.env, "env"), re.M))
    url = shlex.split(exports["CELERYFARM_BROKER_URL"])[0]
    user, password = re.match(r"redis://([^:]+):([^@]+)@127\.0\.0\.1:\d+/0$", url).groups()
    assert password not in output  # up prints it redacted
    assert f"redis://{user}:***@127.0.0.1" in output
    assert shlex.split(exports["CELERYFARM_SHARED_ROOT"])[0] == str(farm.base / "shared")
    assert re.search(r"flower +http://127\.0\.0\.1:\d+ +login admin / \S+", output)
    data = farm.base / "data"
    for name in ("farm.json", "embedded.json", "redis/users.acl"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert password not in (data / "redis" / "users.acl").read_text()  # only its hash
    redis = [p for p in farm.descendants() if p.name() == "redis-server"]
    assert len(redis) == 1
    listening = {c.laddr.ip for c in redis[0].net_connections() if c.status == "LISTEN"}
    assert listening == {"127.0.0.1"}


def test_a_second_up_on_the_same_data_folder_is_refused(farm):
    result = cli(farm.env, "up", "--no-flower", timeout=30)
    one_line_error(result, "already running")


def test_submit_and_watch_a_job_to_completed(farm, tmp_path):
    frames = tmp_path / "frames"
    job_id = submit(farm.env, *RENDERBOOT, "--frames", "1-3", "--seconds", "0.6",
                    "--output", str(frames), name="beauty")
    assert job_status(farm.env, job_id)["state"] in ("Waiting", "Running", "Completed")
    status = wait_for_state(farm.env, job_id, ("Completed", "Failed", "Cancelled"))
    assert status["state"] == "Completed", ok(farm.env, "log", job_id)
    assert status["node"].startswith("node1@")
    assert sorted(p.name for p in frames.iterdir()) == [
        "frame.0001.ppm", "frame.0002.ppm", "frame.0003.ppm"]
    listed = [json.loads(line) for line in ok(farm.env, "jobs", "--json").splitlines()]
    assert job_id in [job["id"] for job in listed]
    table = ok(farm.env, "jobs", "--state", "Completed")
    assert table.splitlines()[0].split() == [
        "ID", "NAME", "STATE", "FRAMES", "PROGRESS", "SUBMITTED", "FINISHED", "NODE", "LOG"]
    row = next(line for line in table.splitlines() if line.startswith(short_id(job_id)))
    assert "beauty" in row and "Completed" in row and status["log"] in row
    assert "frame 3 written" in ok(farm.env, "log", job_id[:6])  # a unique prefix is enough


def test_submit_steps_with_cmd_and_wait_for_the_outcome(farm, tmp_path):
    boot = shlex.join(RENDERBOOT)
    env = farm.env
    passing = cli(env, "submit", "--name", "two steps", "--wait", "--frames", "1-10,20",
                  "--cmd", f"{boot} --seconds 0.2 --output {tmp_path}/a",
                  "--cmd", f"{boot} --seconds 0.2 --output {tmp_path}/b")
    assert passing.returncode == 0, passing.stderr
    assert "Completed" in passing.stderr
    assert (tmp_path / "a" / "frame.0001.ppm").exists()
    assert (tmp_path / "b" / "frame.0001.ppm").exists()
    assert "frames:      1-10,20, 11 frames" in ok(env, "status", passing.stdout.strip())
    for bad in ("10-1", "a-b", "1-2000000"):
        refused = cli(env, "submit", "--frames", bad, "--", "true")
        assert refused.returncode == 2 and "--frames" in refused.stderr, refused.stderr
    failing = cli(env, "submit", "--wait", "--cmd", f"{boot} --seconds 0.2 --exit-code 3",
                  "--cmd", f"{boot} --output {tmp_path}/never")
    assert failing.returncode == 1
    assert "Failed: step 1/2 failed: exit status 3" in failing.stderr
    assert not (tmp_path / "never").exists()
    mine = [json.loads(line) for line in ok(env, "jobs", "--mine", "--json").splitlines()]
    assert [job["id"] for job in mine[:2]] == [failing.stdout.strip(),
                                              passing.stdout.strip()]  # newest first
    assert ok(farm.env, "jobs", "--user", mine[0]["user"], "--state", "Failed",
              "--json").count("\n") == 1


def test_user_add_makes_an_artist_who_may_stop_only_their_own_jobs(farm):
    """The printed settings join a workstation as that artist: its jobs are the artist's
    (the Redis user, whatever CELERYFARM_USER says), and Redis refuses the artist a stop
    of the owner's job; the owner (a wrangler) may stop the artist's."""
    name = f"ann{os.getpid()}"
    printed = ok(farm.env, "user", "add", name)
    exports = dict(re.findall(r"^export (\w+)=(.*)$", printed, re.M))
    url = shlex.split(exports["CELERYFARM_BROKER_URL"])[0]
    assert url.startswith(f"redis://{name}:")
    ann = {**farm.env, "CELERYFARM_BROKER_URL": url, "CELERYFARM_USER": "someone-else"}
    theirs = submit(ann, *RENDERBOOT, "--live", name="anns")
    assert job_status(farm.env, theirs)["user"] == name and theirs.startswith(f"{name}.")
    owners = submit(farm.env, *RENDERBOOT, "--live", name="owners")
    one_line_error(cli(ann, "stop", owners), f"{name} may not stop job")
    assert job_status(farm.env, owners)["state"] in ("Waiting", "Running")
    for job_id in (owners, theirs):  # the owner of the farm is a wrangler
        ok(farm.env, "stop", job_id)
        wait_for_state(farm.env, job_id, ("Cancelled",))
    one_line_error(cli(farm.env, "user", "add", "Not A Name"), "user name 'Not A Name'")
    # Farm-wide settings are the admin's: on this machine the commands use its credential.
    one_line_error(cli(ann, "limit", "set", f"lic{os.getpid()}", "2"), "not allowed")
    assert "2 unit(s)" in ok(farm.env, "limit", "set", f"lic{os.getpid()}", "2")
    listed = ok(farm.env, "user", "list").splitlines()
    assert name in listed and any(line.endswith("  (wrangler)") for line in listed)  # owner
    assert not {"node", "flower", "admin", "default"} & set(listed)
    # After an upgrade whose rules differ (here: rules an admin took away), `user refresh`
    # gives every artist this version's rules and keeps their passwords.
    admin = redis.Redis.from_url(embedded_admin_url(Settings.from_env(farm.env).data_dir))
    admin.execute_command("ACL", "SETUSER", name, "-@all")  # its keys stay: an artist's
    # Another user of the same Redis (a monitoring tool's): not an artist, left alone.
    admin.execute_command("ACL", "SETUSER", "monitor", "on", ">monitor-password", "+info")
    one_line_error(cli(ann, "jobs"), "no permissions")
    refreshed = ok(farm.env, "user", "refresh").splitlines()
    assert f"refreshed {name}" in refreshed
    assert [line for line in refreshed if line.endswith("  (wrangler)")]  # the owner stays one
    assert "anns" in ok(ann, "jobs")
    assert admin.acl_getuser("monitor")["commands"] == ["+info"]
    assert "monitor" not in ok(farm.env, "user", "list")
    one_line_error(cli({**farm.env, "CELERYFARM_KEY_PREFIX": "other"}, "user", "refresh"),
                   "no artist's user of the key prefix 'other'")
    admin.close()
    # An artist who leaves: their workstation is refused at once, their jobs stay.
    assert ok(farm.env, "user", "remove", name).strip() == f"removed {name}"
    one_line_error(cli(ann, "jobs"), "cannot reach the farm")
    assert name not in ok(farm.env, "user", "list").splitlines()
    assert job_status(farm.env, theirs)["user"] == name
    one_line_error(cli(farm.env, "user", "remove", name), f"no user '{name}'")
    one_line_error(cli(farm.env, "user", "remove", "node"), "user name 'node'")


def test_log_follow_prints_lines_as_they_come(farm):
    job_id = submit(farm.env, *RENDERBOOT, "--frames", "1-8", "--seconds", "4", name="slow")
    follower = subprocess.Popen([*CELERYFARM, "log", "-f", job_id], env=farm.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = Output(follower.stdout)
    output.wait_for(r"progress 12%", timeout=60)
    # The first progress line came while the render was still running...
    assert job_status(farm.env, job_id)["state"] == "Running"
    assert follower.poll() is None
    # ...and the follower ends by itself once the job has ended, with the whole log.
    assert follower.wait(60) == 0, follower.stderr.read()
    output.join(5)
    assert job_status(farm.env, job_id)["state"] == "Completed"
    assert "progress 100% (frame 8)" in output.text
    assert re.search(r"step 1/1 \| exit status 0", output.lines[-1][1])
    first_progress = next(t for t, line in output.lines if "progress 12%" in line)
    last_progress = next(t for t, line in output.lines if "progress 100%" in line)
    assert last_progress - first_progress > 2  # printed as they came, not all at the end


def test_stop_kills_a_running_render_and_start_runs_it_again(farm):
    tag = f"stop-test-{os.getpid()}"
    job_id = submit(farm.env, *RENDERBOOT, "--live", "--children", "2", "--tag", tag,
                    name="live")
    wait_for_state(farm.env, job_id, ("Running",))
    renders = wait_until(lambda: len(processes_tagged(tag)) >= 5 and processes_tagged(tag),
                         30, "the render and its 4 helpers")
    result = cli(farm.env, "stop", job_id[:10])
    assert result.returncode == 0, result.stderr
    assert "Cancelled" in result.stdout
    wait_until(lambda: not alive(renders), 30, "the render processes to be gone")
    assert job_status(farm.env, job_id)["reason"].startswith("stopped by")

    result = cli(farm.env, "start", job_id)
    assert result.returncode == 0, result.stderr
    assert "attempt 2" in result.stdout
    wait_for_state(farm.env, job_id, ("Running",))
    assert "Cancelled" in ok(farm.env, "stop", job_id)
    wait_until(lambda: not processes_tagged(tag), 30, "the second attempt's render to end")


def test_bad_ids_give_one_line_errors(farm):
    unknown = "0123456789abcdef0123456789abcdef"
    for command in ("status", "log", "stop", "start"):
        one_line_error(cli(farm.env, command, unknown), "no job with id", unknown)
    one_line_error(cli(farm.env, "status", "not-an-id"), "no job with id")
    one_line_error(cli(farm.env, "log", "-f", "ffffffffffff"), "no job with id")


def test_an_unreachable_farm_gives_a_one_line_error_at_once():
    env = base_env(CELERYFARM_BROKER_URL=f"redis://:secret@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    for args in (("jobs",), ("status", "abc"), ("submit", "--", "true"), ("worker",)):
        line = one_line_error(cli(env, *args), "cannot reach the farm's Redis at")
        assert "secret" not in line
    assert time.monotonic() - started < 30


def test_env_without_a_farm_says_how_to_start_one(tmp_path):
    one_line_error(cli(up_env(tmp_path), "env"), "no farm is running", "celeryfarm up")


def test_env_hands_on_the_farm_a_broker_url_file_names(tmp_path):
    """CELERYFARM_BROKER_URL_FILE names a farm as the variable does: no running farm needed;
    and the password stays in its file, which env names rather than prints."""
    url = "redis://:pw@farm.example.com:6379/0"
    secret = tmp_path / "broker-url"
    secret.write_text(url + "\n")
    printed = ok(up_env(tmp_path, CELERYFARM_BROKER_URL_FILE=str(secret)), "env")
    exports = dict(re.findall(r"^export (\w+)=(.*)$", printed, re.M))
    assert shlex.split(exports["CELERYFARM_BROKER_URL_FILE"]) == [str(secret)]
    assert "CELERYFARM_BROKER_URL" not in exports and "pw@" not in printed


@pytest.mark.parametrize("variable", ["CELERYFARM_BROKER_URL", "CELERYFARM_STORE_URL"])
def test_a_malformed_redis_url_gives_a_one_line_error_without_the_password(variable):
    env = base_env(**{variable: "redis://u:S3CRET@[bad"})
    line = one_line_error(cli(env, "jobs"), f"{variable}: not a Redis URL")
    assert "S3CRET" not in line and "Traceback" not in line


def flower(farm, path: str, data: bytes | None = None, login: bool = True):
    """Call Flower's API as an admin would (``data`` makes it a POST)."""
    port = re.search(r"http://127\.0\.0\.1:(\d+)", farm.output.text).group(1)
    password = json.loads((farm.base / "data" / "embedded.json").read_text())["flower_password"]
    headers = {}
    if login:
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def task_events_on(farm) -> bool:
    """Whether Flower has turned task events on in every node: nodes start without them
    and Flower sends its ``enable_events`` control every few seconds."""
    logs = sorted((farm.base / "data" / "logs").glob("node*.log"))
    return bool(logs) and all("Events of group {task} enabled by remote" in log.read_text()
                              for log in logs)


def test_flower_turns_task_events_on_and_shows_steps_by_name_behind_its_login(farm):
    wait_until(lambda: task_events_on(farm), 30, "Flower to turn task events on")
    job_id = submit(farm.env, *RENDERBOOT, "--seconds", "0.2", name="flowerjob")
    wait_for_state(farm.env, job_id, ("Completed",))
    with pytest.raises(urllib.error.HTTPError) as refused:
        flower(farm, "/api/tasks", login=False)
    assert refused.value.code == 401

    found = wait_until(lambda: flower_task(farm, job_id, "SUCCESS"), 30,
                       "Flower to show the finished step")
    assert found["name"] == "flowerjob [1/1]"
    assert "renderboot" in found["kwargs"]


def flower_task(farm, job_id: str, state: str) -> dict | None:
    """The task Flower shows in ``state`` for a step of the job (its id starts with the
    job's, and its arguments hold it), as an admin finds it."""
    for task_id, task in flower(farm, f"/api/tasks?state={state}").items():
        if task_id.startswith(job_id) and job_id in task["kwargs"]:
            return {"id": task_id, **task}
    return None


def test_terminating_a_step_from_flower_cancels_the_job(farm):
    wait_until(lambda: task_events_on(farm), 30, "Flower to turn task events on")
    tag = f"flower-test-{os.getpid()}"
    job_id = submit(farm.env, *RENDERBOOT, "--live", "--tag", tag, name="flowerstop")
    wait_for_state(farm.env, job_id, ("Running",))
    renders = wait_until(lambda: processes_tagged(tag), 30, "the render")
    step = wait_until(lambda: flower_task(farm, job_id, "STARTED"), 30, "Flower to show it")
    # What Flower's Terminate button on the task page sends.
    flower(farm, f"/api/task/revoke/{step['id']}", data=b"terminate=true")
    status = wait_for_state(farm.env, job_id, ("Cancelled",), timeout=30)
    assert "revoked outside celeryfarm" in status["reason"]
    wait_until(lambda: not alive(renders), 30, "the render processes to be gone")


def test_worker_joins_this_machine_to_the_farm(farm):
    name = f"extra{os.getpid()}"
    worker = subprocess.Popen(
        [*CELERYFARM, "worker", "--name", name, "--queues", "extrapool"], env=farm.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        job_id = ok(farm.env, "submit", "--pool", "extrapool", "--", *RENDERBOOT,
                    "--seconds", "0.2").strip()
        status = wait_for_state(farm.env, job_id, ("Completed", "Failed"), timeout=90)
        assert status["state"] == "Completed"
        assert status["node"].startswith(f"{name}@")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.stderr.read()


def test_a_dead_worker_is_started_again(farm):
    children = psutil.Process(farm.process.pid).children()  # not the pool processes
    (node,) = [p for p in children if "--name node1 " in " ".join(p.cmdline()) + " "]
    node.kill()
    farm.output.wait_for(r"node1 exited with status -9: starting it again in 1 s", 30)
    farm.output.wait_for(r"node1 started again", 30)
    # The new node takes jobs.
    job_id = submit(farm.env, *RENDERBOOT, "--seconds", "0.2", name="after-restart")
    assert wait_for_state(farm.env, job_id, ("Completed",), timeout=90)["node"] \
        .startswith("node1@")


# -- stopping and restarting up -----------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_up_leaves_no_process_and_a_restart_finds_the_jobs(tmp_path, sig):
    env = up_env(tmp_path)
    up = Up(env, "--workers", "1", "--no-flower").wait_ready()
    tag = f"ctrl-c-test-{os.getpid()}-{sig}"
    try:
        done = submit(env, *RENDERBOOT, "--seconds", "0.2", name="before")
        wait_for_state(env, done, ("Completed",))
        live = submit(env, *RENDERBOOT, "--live", "--children", "1", "--tag", tag,
                      name="interrupted")
        wait_for_state(env, live, ("Running",))
        wait_until(lambda: len(processes_tagged(tag)) >= 3, 30, "the render's helpers")
        children = up.descendants()
        assert len(children) >= 6  # redis, worker + pool process, render + helpers
    finally:
        code = up.stop(sig)
    assert code == 0, up.output.text
    assert not alive(children), alive(children)
    assert not (tmp_path / "data" / "farm.json").exists()

    up = Up(env, "--workers", "1", "--no-flower").wait_ready()
    try:
        listed = {json.loads(line)["id"]: json.loads(line)
                  for line in ok(env, "jobs", "--json").splitlines()}
        assert listed[done]["state"] == "Completed"
        # The step the stop interrupted went back to the queue and runs again.
        wait_for_state(env, live, ("Running",))
        ok(env, "stop", live)
        wait_until(lambda: not processes_tagged(tag), 30, "the render to end")
        children = up.descendants()
    finally:
        assert up.stop() == 0
    assert not alive(children)


def test_up_without_redis_server_says_how_to_install_it(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = cli(up_env(tmp_path, PATH=str(empty)), "up", "--no-flower", timeout=60)
    one_line_error(result, "redis-server not found", "apt-get install redis-server")


# -- demo -------------------------------------------------------------------------------------
def test_demo_runs_its_jobs_and_exits_0(tmp_path):
    env = up_env(tmp_path)
    demo = subprocess.Popen([*CELERYFARM, "demo"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = Output(demo.stdout)
    output.wait_for(r"starting a farm", 60)
    farm_pid = demo.pid
    output.wait_for(r"Running step 1/3", 90)
    children = psutil.Process(farm_pid).children(recursive=True)
    assert demo.wait(240) == 0, output.text
    output.join(5)
    text = output.text
    assert re.search(r"ok \w{8} shot010 beauty \(disk render\): Completed", text)
    assert re.search(r"ok \w{8} shot010 preview \(preview render\): Completed", text)
    assert re.search(r"ok \w{8} shot020 lighting \(fails on purpose\): Failed .*exit status 1",
                     text)
    assert "every job ended as intended" in text
    frames = [Path(m) for m in re.findall(r"frames +(/\S+)", text)]
    assert [len(list(folder.glob("*.ppm"))) for folder in frames] == [12, 6]
    logs = re.findall(r"render log +(/\S+)", text)
    assert len(logs) == 3 and all(Path(log).is_file() for log in logs)
    assert not alive(children)
