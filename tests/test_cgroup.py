"""A step's render runs in a cgroup of its own: nothing it starts escapes the kill.

These run as root, as CI does, so the node can make cgroups (v1 ``freezer`` here, v2 where a
machine has it); the fallback test runs its node as an unprivileged user, who cannot.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import uuid
from pathlib import Path

import psutil

from celeryfarm import cgroup, process
from celeryfarm.farmapi import Job

from .helpers import (
    command_line,
    read_log,
    submit,
    submit_like_katana,
    tagged_processes,
    wait_for_state,
    wait_until,
)
from .users import NODE, ensure_user, python_as


def escaping_render(tag: str, clear_env: bool = True, then: str = "time.sleep(300)") -> list[str]:
    """A render that starts a daemon which leaves its session (``setsid``, then a fork)
    and, with ``clear_env``, its environment (``env -i``); once the daemon is up, it prints
    the daemon's pid and runs ``then``."""
    daemon = ("import os, sys, time\n"
              "if os.fork(): os._exit(0)\n"
              "print('daemon up', os.getpid(), flush=True)\n"
              "time.sleep(300)\n")
    launcher = ["env", "-i"] if clear_env else []
    script = ("import subprocess, sys, time\n"
              f"argv = {[*launcher, 'setsid']!r} + [sys.executable, '-c', {daemon!r}, {tag!r}]\n"
              "launched = subprocess.Popen(argv, stdout=subprocess.PIPE)\n"
              "print(launched.stdout.readline().decode().strip(), flush=True)\n"
              f"{then}\n")
    return [sys.executable, "-c", script]


def test_an_env_i_double_fork_is_killed_by_stop():
    tag, token = uuid.uuid4().hex, f"test-{uuid.uuid4().hex}"
    output, daemon = io.BytesIO(), {}

    def should_stop() -> str:
        if b"daemon up" not in output.getvalue():
            return ""
        proc = psutil.Process(int(output.getvalue().split()[2]))
        daemon.update(sid=os.getsid(proc.pid), environ=proc.environ(), cmdline=proc.cmdline())
        return "asked"

    outcome = process.run(escaping_render(tag), env=dict(os.environ), cwd="/", output=output,
                          should_stop=should_stop, poll_seconds=0.05, grace_seconds=1,
                          token=token)
    assert outcome.describe() == "stopped: asked"
    # It really escaped: another session, an empty environment (no marker).
    assert tag in daemon["cmdline"] and daemon["sid"] != os.getsid(0)
    assert process.MARKER not in daemon["environ"]
    assert not tagged_processes(tag), "the daemon survived the stop"
    assert cgroup.find(token) is None, "the step's cgroup was left behind"


def test_an_env_i_double_fork_is_killed_when_its_step_ends():
    tag = uuid.uuid4().hex
    output = io.BytesIO()
    outcome = process.run(escaping_render(tag, then="pass"), env=dict(os.environ), cwd="/",
                          output=output, should_stop=lambda: "", grace_seconds=1)
    assert outcome.exit_code == 0 and b"daemon up" in output.getvalue()
    assert not tagged_processes(tag)
    assert not [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def test_a_step_over_its_memory_cap_is_killed_and_says_so():
    hog = "import time; data = b'x' * (400 * 2**20); time.sleep(30)"
    outcome = process.run([sys.executable, "-c", hog], env=dict(os.environ), cwd="/",
                          output=io.BytesIO(), should_stop=lambda: "", grace_seconds=1,
                          memory_mb=64)
    assert outcome.describe() == "killed: went over its memory cap of 64 MB"


def test_stop_job_kills_an_env_i_double_fork(plugin):
    tag = uuid.uuid4().hex
    job_id, _ = submit_like_katana(plugin, [command_line(escaping_render(tag))])
    wait_until(lambda: b"daemon up" in read_log(plugin, job_id), 30, "the daemon to start")
    plugin.stopJob(job_id)
    assert wait_for_state(plugin, job_id) == Job.State.kCancelled
    wait_until(lambda: not tagged_processes(tag), 15, "the daemon to be killed")


def test_a_job_over_its_memory_cap_fails_with_the_reason(plugin):
    hog = [sys.executable, "-c", "data = b'x' * (400 * 2**20)"]
    job_id, _ = submit(plugin.farm, [hog], settings={"maxMemoryMB": 64})
    assert wait_for_state(plugin, job_id) == Job.State.kFailed
    assert b"killed: went over its memory cap of 64 MB" in read_log(plugin, job_id)


def test_without_a_cgroup_the_node_warns_and_still_kills_detached_processes():
    """An unprivileged node cannot make cgroups: its log says so, and a daemon that leaves
    the session but keeps its environment is still found by the marker."""
    ensure_user(NODE)
    tag = uuid.uuid4().hex
    code = (
        "import io, logging, os, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from celeryfarm import process\n"
        f"argv = {escaping_render(tag, clear_env=False, then='pass')!r}\n"
        "argv[0] = sys.executable\n"
        "for _ in range(2):  # two steps, one warning\n"
        "    outcome = process.run(argv, env=dict(os.environ), cwd='/', output=io.BytesIO(),\n"
        "                          should_stop=lambda: '', grace_seconds=1)\n"
        "    print(outcome.describe())\n"
    )
    result = python_as(NODE, code)
    assert result.stdout.split("\n") == ["exit status 0", "exit status 0", ""], result.stderr
    assert "cannot make a cgroup for the steps: Permission denied: " in result.stderr
    assert result.stderr.count("cannot make a cgroup") == 1
    assert "env -i" in result.stderr  # the warning says what the fallback cannot catch
    assert not tagged_processes(tag)


def test_a_dead_pool_process_s_escaped_daemon_is_killed_by_its_node(cluster, plugin):
    """The node's main process kills the group of a step whose pool process died, and
    removes the group and the step's private folders."""
    pool, node = f"pool-{uuid.uuid4().hex[:6]}", f"n{uuid.uuid4().hex[:6]}"
    cluster.start_worker(node, concurrency=1, queues=pool)
    try:
        cluster.wait_for_workers(plugin.farm.app, [node])
        tag = uuid.uuid4().hex
        job_id, _ = submit(plugin.farm, [escaping_render(tag)], settings={"pool": pool})
        wait_until(lambda: b"daemon up" in read_log(plugin, job_id), 30, "the daemon to start")
        (step,) = plugin.farm.get(job_id).task_ids
        folders = Path(tempfile.gettempdir()) / f"celeryfarm-steps-{os.geteuid()}" / step
        assert cgroup.find(step) is not None and folders.is_dir()
        (pool_process,) = psutil.Process(cluster.workers[node].pid).children()
        pool_process.kill()
        wait_until(lambda: not tagged_processes(tag), 15, "the daemon to be killed")
        wait_until(lambda: cgroup.find(step) is None and not folders.exists(), 15,
                   "the step's cgroup and folders to be removed")
        plugin.stopJob(job_id)
    finally:
        cluster.stop_worker(node)
