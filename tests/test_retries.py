"""Retries and failure rules, on real render nodes: a failed step runs again up to the job's
retries; a licence failure backs off without using one; a fatal one is never retried.

The tests run on a node of their own whose farm-wide rules and licence back-off are set in
its environment, as a wrangler would set them on every node.
"""

from __future__ import annotations

import json
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.retries import bad_nodes
from celeryfarm.testing.cluster import LocalCluster

from .cli_fixtures import base_env, ok
from .helpers import (
    command_line,
    read_log,
    renderboot,
    submit,
    submit_like_katana,
    wait_for_state,
    wait_until,
)
from .test_plugin import render_node

State = Job.State
FARM_RULES = {"CELERYFARM_FATAL_PATTERN": "FARM-FATAL",
              "CELERYFARM_LICENCE_PATTERN": "FARM-NO-LICENCE",
              "CELERYFARM_LICENCE_BACKOFF_SECONDS": "0.2"}
#: Counts its runs in a file; prints its third argument and exits 1 for the first N runs
#: (its second argument), then prints "ok" and exits 0.
FLAKY = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
         "n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); "
         "bad = n < int(sys.argv[2]); print(sys.argv[3] if bad else 'ok', flush=True); "
         "sys.exit(1 if bad else 0)")


def flaky(counter: Path, failures: int, line: str = "render error") -> list[str]:
    return [sys.executable, "-c", FLAKY, str(counter), str(failures), line]


@pytest.fixture(scope="module")
def rules_pool(cluster: LocalCluster) -> Iterator[str]:
    """A pool served by one node with farm-wide failure rules."""
    from celeryfarm.config import Settings
    from celeryfarm.farm import Farm

    pool, node = f"retries-{uuid.uuid4().hex[:6]}", f"r{uuid.uuid4().hex[:6]}"
    cluster.start_worker(node, concurrency=1, queues=pool, env=FARM_RULES)
    try:
        cluster.wait_for_workers(Farm(Settings.from_env(cluster.env)).app, [node])
        yield pool
    finally:
        cluster.stop_worker(node)


def retry_ends(plugin: CeleryFarmPlugin, job_id: str) -> list[str]:
    """The counter each failed try that ran again added to, in order."""
    return [e["retry"] for e in plugin.farm.events(job_id) if e.get("retry")]


def test_a_failing_step_runs_again_until_it_succeeds_from_the_command_line(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin, rules_pool: str, tmp_path: Path
):
    env = base_env(**farm_env)
    job_id = ok(env, "submit", "--pool", rules_pool, "--retries", "2", "--retry-delay", "0",
                "--", *flaky(tmp_path / "runs", 2)).strip()
    assert wait_for_state(plugin, job_id) == State.kCompleted
    log = read_log(plugin, job_id)
    for header in (b"try 1 of 3", b"try 2 of 3", b"try 3 of 3"):
        assert header in log
    assert b"retry 1 of 2; runs again in 0 s" in log and b"retry 2 of 2" in log
    assert retry_ends(plugin, job_id) == ["failures", "failures"]
    assert (tmp_path / "runs").read_text() == "3"


def test_status_says_which_try_waits_and_a_stop_ends_the_wait(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin, rules_pool: str, tmp_path: Path
):
    env = base_env(**farm_env)
    job_id = ok(env, "submit", "--pool", rules_pool, "--retries", "1", "--retry-delay", "600",
                "--", *flaky(tmp_path / "runs", 5)).strip()
    wait_until(lambda: retry_ends(plugin, job_id), 30, "the first try to fail")
    status = json.loads(ok(env, "status", "--json", job_id))
    assert (status["state"], status["try"], status["retries"]) == ("Waiting", 2, 1)
    assert "try 2 of 2" in ok(env, "status", job_id)
    ok(env, "stop", job_id)
    assert plugin.getJobState(job_id) == State.kCancelled
    assert (tmp_path / "runs").read_text() == "1"


def test_a_step_that_used_up_its_retries_fails_the_job(
    plugin: CeleryFarmPlugin, rules_pool: str, tmp_path: Path
):
    job_id, _ = submit(plugin.farm, [flaky(tmp_path / "runs", 9)],
                       settings={"pool": rules_pool, "retries": 1})
    assert wait_for_state(plugin, job_id) == State.kFailed
    assert plugin.farm.get(job_id).reason == \
        "step 1/1 failed: exit status 1; no retry left (1 allowed)"
    assert (tmp_path / "runs").read_text() == "2"


@pytest.mark.parametrize(("line", "settings"), [
    ("cannot open scene shot010.katana", {"fatalPattern": r"cannot open scene \S+"}),
    ("renderer says FARM-FATAL", {}),
], ids=["job-rule", "farm-rule"])
def test_a_fatal_failure_is_never_retried(
    plugin: CeleryFarmPlugin, rules_pool: str, tmp_path: Path, line: str, settings: dict
):
    job_id, _ = submit(plugin.farm, [flaky(tmp_path / "runs", 9, line)],
                       settings={"pool": rules_pool, "retries": 3, **settings})
    assert wait_for_state(plugin, job_id) == State.kFailed
    assert "matched a fatal failure rule" in plugin.farm.get(job_id).reason
    assert (tmp_path / "runs").read_text() == "1"


def test_a_licence_failure_backs_off_without_using_a_retry_set_on_the_render_node(
    plugin: CeleryFarmPlugin, katana_dropin: dict, rules_pool: str, tmp_path: Path
):
    node = render_node(pool=rules_pool, retries=1, licencePattern="no licen[cs]e available")
    commands = [command_line(flaky(tmp_path / "first", 2, "no licence available")),
                command_line(flaky(tmp_path / "second", 1, "FARM-NO-LICENCE"))]
    job_id, _ = submit_like_katana(plugin, commands, node_name=node)
    spec = plugin.farm.get(job_id).spec
    assert (spec.retries, spec.licence_pattern) == (1, "no licen[cs]e available")
    assert wait_for_state(plugin, job_id) == State.kCompleted
    # three licence waits (two by the job's rule, one by the farm's), no retry used
    assert retry_ends(plugin, job_id) == ["licence_waits"] * 3
    assert read_log(plugin, job_id).count(b"no retry used") == 3


def test_a_bad_failure_rule_is_refused_at_submission(plugin: CeleryFarmPlugin):
    with pytest.raises(Exception, match="fatalPattern: invalid regular expression"):
        submit(plugin.farm, [["true"]], settings={"fatalPattern": "(unclosed"})


def test_a_node_a_job_failed_on_twice_leaves_its_steps_to_the_pool_s_other_nodes(
    cluster: LocalCluster, farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    pool, bad, good = (f"{kind}{uuid.uuid4().hex[:6]}" for kind in ("bad-", "a", "b"))
    marked = {"CELERYFARM_RENDER_ENV": "NODE_MARK"}
    cluster.start_worker(bad, concurrency=1, queues=pool, env={**marked, "NODE_MARK": "bad"})
    try:
        cluster.wait_for_workers(plugin.farm.app, [bad])
        fails_on_bad = [sys.executable, "-c",
                        "import os, sys; sys.exit(os.environ['NODE_MARK'] == 'bad')"]
        job_id, _ = submit(plugin.farm, [fails_on_bad],
                           settings={"pool": pool, "retries": 30, "retryDelaySeconds": 1})
        record = wait_until(lambda: bad_nodes((r := plugin.farm.get(job_id)).bad_nodes) and r,
                            30, "the job to fail twice on the only node, which runs it still")
        (bad_node,) = record.bad_nodes
        assert bad_node.startswith(bad + "@")
        # A good node busy with a job of another pool, then told to serve this pool too:
        # the bad node, alone to take the job's step, must leave it for the good one.
        cluster.start_worker(good, concurrency=1, queues=f"{pool}-b",
                             env={**marked, "NODE_MARK": "good"})
        cluster.wait_for_workers(plugin.farm.app, [good])
        blocker, _ = submit(plugin.farm, [renderboot("--seconds", 600)],
                            settings={"pool": f"{pool}-b"})
        wait_for_state(plugin, blocker, State.kRunning)
        plugin.farm.app.control.add_consumer(pool, destination=[f"{good}@{socket.gethostname()}"],
                                             reply=True)
        wait_until(lambda: any(e.get("outcome") == "avoided" for e in plugin.farm.events(job_id)),
                   30, "the bad node to hand the step on")
        failed_on_bad = plugin.farm.get(job_id).bad_nodes[bad_node]
        assert plugin.getJobState(job_id) in (State.kWaiting, State.kRunning)
        status = json.loads(ok(base_env(**farm_env), "status", "--json", job_id))
        assert status["bad_nodes"] == [bad_node]
        assert bad_node in ok(base_env(**farm_env), "status", job_id)
        plugin.stopJob(blocker)
        assert wait_for_state(plugin, job_id) == State.kCompleted
        record = plugin.farm.get(job_id)
        assert record.node.startswith(good + "@")
        assert record.bad_nodes == {bad_node: failed_on_bad}  # never run there again
    finally:
        for node in (bad, good):
            if node in cluster.workers:
                cluster.stop_worker(node)
