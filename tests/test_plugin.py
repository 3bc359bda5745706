"""The plug-in end to end, driven in Katana's order against real Redis and real workers."""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shlex
import sys
import threading
import uuid
from pathlib import Path

import pytest
import redis

from celeryfarm import farmapi as FarmAPI
from celeryfarm import nodegraphapi as NodegraphAPI
from celeryfarm import plugin as plugin_module
from celeryfarm.farmapi import Job
from celeryfarm.plugin import KATANA_RESOURCES, CeleryFarmPlugin, register_farm_settings
from celeryfarm.testing.cluster import LocalCluster

from .cli_fixtures import ok
from .conftest import WORKER_ENV, join, running
from .helpers import (
    KatanaJobRequest,
    command_line,
    read_log,
    renderboot,
    submit,
    submit_like_katana,
    tagged_processes,
    wait_for_state,
    wait_until,
)

State = Job.State


def step_headers(log: bytes) -> list[str]:
    """The "step i/n" of each step header in a render log, in order."""
    return re.findall(rb"celeryfarm \| step (\d+/\d+) \| attempt", log)


def test_three_step_job_runs_in_order_to_completed(plugin: CeleryFarmPlugin, tmp_path: Path):
    scene = tmp_path / "scene.optree"
    scene.write_bytes(b"serialised op tree \x00\x01")
    images = tmp_path / "images"
    job_id, folder = submit_like_katana(plugin, [
        command_line(renderboot("--seconds", 0.6, "--frames", "1-3", "--output", images,
                                "--tag", "first")),
        command_line(renderboot("--seconds", 0.3, "--tag", "second")),
        command_line(renderboot("--seconds", 0.3, "--tag", "third")),
    ], node_name="Render_beauty", scene=scene)

    seen = [plugin.getJobState(job_id)]
    while seen[-1] not in (State.kCompleted, State.kFailed, State.kCancelled):
        state = wait_for_state(plugin, job_id, [s for s in State.kAllStates if s != seen[-1]])
        seen.append(state)
    assert seen[0] in (State.kWaiting, State.kRunning)
    assert seen[-1] == State.kCompleted
    assert State.kRunning in seen
    order = [State.kWaiting, State.kRunning, State.kCompleted]
    assert seen == sorted(seen, key=order.index), f"states went backwards: {seen}"

    log = read_log(plugin, job_id)
    assert step_headers(log) == [b"1/3", b"2/3", b"3/3"]
    assert log.index(b"submitted") < log.index(b"step 1/3")
    assert log.count(b"| exit status 0 |") == 3
    assert b"--tag first" in log and b"progress 100% (frame 3)" in log
    assert sorted(p.name for p in images.iterdir()) == [f"frame.000{i}.ppm" for i in (1, 2, 3)]
    assert str(Path(plugin.getRenderLogFilename(job_id)).parent) == folder

    (job,) = [job for job in plugin.getJobs(None) if job.jobId == job_id]
    assert job.state == State.kCompleted and job.name == "Render_beauty"
    assert isinstance(job.startTime, int) and isinstance(job.endTime, int)
    assert 0 < job.startTime <= job.endTime
    assert job.renderLogFilename == plugin.getRenderLogFilename(job_id)


def test_failure_in_step_two_fails_the_job_and_skips_step_three(
    plugin: CeleryFarmPlugin, tmp_path: Path
):
    third = tmp_path / "third-ran"
    job_id, _ = submit(plugin.farm, [
        renderboot("--seconds", 0.1),
        renderboot("--seconds", 0.1, "--exit-code", 3),
        [sys.executable, "-c", f"open({str(third)!r}, 'w')"],
    ])
    assert wait_for_state(plugin, job_id) == State.kFailed
    log = read_log(plugin, job_id)
    assert step_headers(log) == [b"1/3", b"2/3"]
    assert b"step 2/3 | exit status 3" in log
    assert not third.exists()
    record = plugin.farm.get(job_id)
    assert record.reason == "step 2/3 failed: exit status 3"
    assert record.end_ms is not None  # the farm keeps when it ended
    (job,) = [job for job in plugin.getJobs(None) if job.jobId == job_id]
    assert job.state == State.kFailed
    assert job.endTime == 0  # Katana Queue's "Completed" is empty for a failed job


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["/no/such/renderboot", "-v"],
         b"could not start: executable not found: /no/such/renderboot"),
        ([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
         b"killed by signal SIGSEGV"),
    ],
    ids=["missing-executable", "signal"],
)
def test_a_step_that_cannot_run_or_dies_fails_the_job_with_the_reason_in_the_log(
    plugin: CeleryFarmPlugin, command: list[str], expected: bytes
):
    job_id, _ = submit(plugin.farm, [command, renderboot("--seconds", 0.1)])
    assert wait_for_state(plugin, job_id) == State.kFailed
    log = read_log(plugin, job_id)
    assert expected in log
    assert step_headers(log) == [b"1/2"]


def test_stop_mid_render_kills_the_whole_process_tree(plugin: CeleryFarmPlugin, tmp_path: Path):
    tag = uuid.uuid4().hex
    second = tmp_path / "second-ran"
    job_id, _ = submit(plugin.farm, [
        renderboot("--seconds", 120, "--children", 2, "--grandchildren", 2, "--tag", tag),
        [sys.executable, "-c", f"open({str(second)!r}, 'w')"],
    ])
    # renderboot, 2 children and 4 grandchildren
    wait_until(lambda: len(tagged_processes(tag)) == 7, 30, "the render's 7 processes")
    assert plugin.getJobState(job_id) == State.kRunning

    plugin.stopJob(job_id)
    assert plugin.getJobState(job_id) == State.kCancelled
    wait_until(lambda: not tagged_processes(tag), 15, "every render process to be gone")
    log = wait_until(lambda: b"stopped" in (log := read_log(plugin, job_id)) and log, 15,
                     "the step's footer")
    assert b"stop requested by" in log
    assert step_headers(log) == [b"1/2"]
    assert not second.exists()
    assert plugin.getJobState(job_id) == State.kCancelled
    assert plugin.farm.get(job_id).end_ms is not None  # the farm keeps when it ended
    (job,) = [job for job in plugin.getJobs(None) if job.jobId == job_id]
    assert job.state == State.kCancelled
    assert job.endTime == 0  # Katana Queue's "Completed" is empty for a cancelled job

    plugin.stopJob(job_id)  # stopping a stopped job changes nothing
    assert plugin.getJobState(job_id) == State.kCancelled


def test_stop_escalates_to_sigkill_for_renders_that_ignore_sigterm(plugin: CeleryFarmPlugin):
    tag = uuid.uuid4().hex
    job_id, _ = submit(plugin.farm, [
        renderboot("--seconds", 120, "--children", 1, "--ignore-sigterm", "--tag", tag),
    ])
    wait_until(lambda: len(tagged_processes(tag)) == 3, 30, "the render's 3 processes")
    plugin.stopJob(job_id)
    wait_until(lambda: not tagged_processes(tag), 20, "every render process to be gone")
    assert plugin.getJobState(job_id) == State.kCancelled


def test_leftover_children_of_a_finished_step_are_killed(plugin: CeleryFarmPlugin):
    tag = uuid.uuid4().hex
    job_id, _ = submit(plugin.farm, [
        renderboot("--seconds", 0.2, "--children", 2, "--orphan-children", "--tag", tag),
    ])
    assert wait_for_state(plugin, job_id) == State.kCompleted
    wait_until(lambda: not tagged_processes(tag), 15, "the orphaned helpers to be gone")


def test_restart_after_stop_and_after_failure_runs_a_new_attempt(
    plugin: CeleryFarmPlugin, tmp_path: Path
):
    flag = tmp_path / "fixed"
    fails_until_fixed = [sys.executable, "-c",
                         f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 4)"]
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1), fails_until_fixed])
    assert wait_for_state(plugin, job_id) == State.kFailed

    flag.touch()
    plugin.startJob(job_id)
    assert plugin.getJobState(job_id) in (State.kWaiting, State.kRunning, State.kCompleted)
    assert wait_for_state(plugin, job_id) == State.kCompleted
    record = plugin.farm.get(job_id)
    assert record.attempt == 2 and record.reason == ""
    log = read_log(plugin, job_id)
    assert b"restart by" in log and b"attempt 2, after attempt 1 ended Failed" in log
    assert step_headers(log) == [b"1/2", b"2/2", b"1/2", b"2/2"]

    plugin.startJob(job_id)  # a completed job starts again too (Katana's Start button)
    assert wait_for_state(plugin, job_id) == State.kCompleted
    assert plugin.farm.get(job_id).attempt == 3

    tag = uuid.uuid4().hex
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 120, "--tag", tag)])
    wait_for_state(plugin, job_id, State.kRunning)
    plugin.stopJob(job_id)
    wait_until(lambda: not tagged_processes(tag), 15, "the stopped render to be gone")
    plugin.startJob(job_id)
    wait_for_state(plugin, job_id, State.kRunning)
    assert plugin.farm.get(job_id).attempt == 2
    plugin.startJob(job_id)  # a running job is left alone
    assert plugin.farm.get(job_id).attempt == 2
    plugin.stopJob(job_id)
    wait_until(lambda: not tagged_processes(tag), 15, "the restarted render to be gone")


def test_a_job_on_a_pool_no_node_serves_waits_and_can_be_cancelled(plugin: CeleryFarmPlugin):
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)],
                                   settings={"pool": f"nobody-{uuid.uuid4().hex[:6]}"})
    assert plugin.getJobState(job_id) == State.kWaiting
    (job,) = plugin.getJobs({"state": State.kWaiting})
    assert job.jobId == job_id
    assert isinstance(job.startTime, int) and job.startTime > 0  # "Submitted", in ms
    assert job.endTime == 0  # an int, and not ended
    plugin.stopJob(job_id)
    assert plugin.getJobState(job_id) == State.kCancelled


def test_two_nodes_run_two_jobs_at_the_same_time(plugin: CeleryFarmPlugin):
    tags = [uuid.uuid4().hex, uuid.uuid4().hex]
    jobs = [submit(plugin.farm, [renderboot("--seconds", 60, "--tag", tag)])[0]
            for tag in tags]
    wait_until(lambda: all(tagged_processes(tag) for tag in tags), 30, "both renders running")
    assert [plugin.getJobState(job_id) for job_id in jobs] == [State.kRunning] * 2
    nodes = {plugin.farm.get(job_id).node for job_id in jobs}
    assert len(nodes) == 2, f"both jobs ran on {nodes}"
    for job_id in jobs:
        plugin.stopJob(job_id)
    wait_until(lambda: not any(tagged_processes(tag) for tag in tags), 15, "renders gone")


def test_many_jobs_submitted_from_several_threads_all_complete(plugin: CeleryFarmPlugin):
    submitted: list[str] = []
    errors: list[BaseException] = []

    def submit_some() -> None:
        try:
            for _ in range(5):
                submitted.append(submit(plugin.farm, [["true"], ["true"]])[0])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=submit_some) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(set(submitted)) == 30
    wait_until(lambda: all(job.state == State.kCompleted for job in plugin.getJobs(None))
               and len(plugin.getJobs(None)) == 30, 120, "all 30 jobs to complete")


def test_threads_making_their_first_call_at_once_share_one_farm_and_session(
    plugin: CeleryFarmPlugin, monkeypatch: pytest.MonkeyPatch
):
    """Katana may call a new plug-in from several threads at once: they make one farm core
    between them, so one session, and that session's filter finds every job they sent."""
    made = []
    real_farm = plugin_module.Farm
    another_farm = threading.Event()

    def counted_farm(*args, **kwargs):
        made.append(None)
        if len(made) == 1:
            # The first farm is made slowly, so that the other threads make their first
            # calls meanwhile: they must wait for it. A second farm started ends the wait.
            another_farm.wait(2)
        else:
            another_farm.set()
        return real_farm(*args, **kwargs)

    monkeypatch.setattr(plugin_module, "Farm", counted_farm)
    first_calls = threading.Barrier(4)
    submitted: list[str] = []
    errors: list[BaseException] = []

    def submit_first() -> None:
        try:
            first_calls.wait(30)
            submitted.append(submit_like_katana(plugin, ["true"])[0])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=submit_first) for _ in range(first_calls.parties)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(submitted) == first_calls.parties
    assert len(made) == 1
    found = {job.jobId for job in plugin.getJobs({"session": plugin.session})}
    assert found == set(submitted)
    for job_id in submitted:
        assert wait_for_state(plugin, job_id) == State.kCompleted


def test_non_utf8_and_very_long_output_do_not_break_a_step(plugin: CeleryFarmPlugin):
    job_id, _ = submit(plugin.farm, [
        renderboot("--seconds", 0.1, "--binary-noise", "--output-bytes", 3_000_000),
    ])
    assert wait_for_state(plugin, job_id) == State.kCompleted
    log = read_log(plugin, job_id)
    assert b"noise: \xff\xfe\xc3\x28 latin-1 caf\xe9\n" in log
    assert log.count(b"x") >= 3_000_000


def test_the_render_gets_the_job_environment_but_not_the_farm_secrets(
    plugin: CeleryFarmPlugin, tmp_path: Path
):
    dump = [sys.executable, "-c",
            "import os; print(sorted(k for k in os.environ if k.startswith('CELERYFARM_'))); "
            "print('SHOT=' + os.environ['SHOT']); print('CWD=' + os.getcwd())"]
    job_id, folder = submit_like_katana(plugin, [command_line(dump)],
                                        environment={"SHOT": "sh010"})
    assert wait_for_state(plugin, job_id) == State.kCompleted
    log = read_log(plugin, job_id)
    assert b"SHOT=sh010" in log and f"CWD={folder}".encode() in log
    assert b"CELERYFARM_BROKER_URL" not in log
    assert b"'CELERYFARM_JOB_ID'" in log and b"'CELERYFARM_RENDER_CONTEXT'" in log


def test_the_farms_variables_win_over_the_requests_and_its_secrets_are_not_stored(
    plugin: CeleryFarmPlugin
):
    """Katana's request may carry another ``KATANA_TMPDIR`` and a workstation's farm
    credentials: the render's folder as the nodes see it is the farm's (in the record and
    in the render), and no credential reaches the record, which nodes and wranglers read."""
    dump = [sys.executable, "-c",
            "import os; print('TMPDIR_SEEN=' + os.environ['KATANA_TMPDIR']); "
            "print('CONTEXT_SEEN=' + os.environ['CELERYFARM_RENDER_CONTEXT'])"]
    job_id, folder = submit_like_katana(plugin, [command_line(dump)], environment={
        "KATANA_TMPDIR": "/elsewhere", "CELERYFARM_RENDER_CONTEXT": "another-render",
        "CELERYFARM_BROKER_URL": "redis://:secret@h/0",
        "CELERYFARM_STORE_URL_FILE": "/home/artist/secret-url", "SHOT": "sh020"})
    record = plugin.farm.get(job_id)
    environment = record.spec.environment
    assert environment["KATANA_TMPDIR"] == folder and environment["SHOT"] == "sh020"
    assert environment["CELERYFARM_RENDER_CONTEXT"] == record.spec.context != "another-render"
    assert "CELERYFARM_BROKER_URL" not in environment
    assert "CELERYFARM_STORE_URL_FILE" not in environment
    stored = plugin.farm.store.redis.hgetall(plugin.farm.store.keys.job(job_id))
    assert stored and not [field for field, value in stored.items() if "secret" in str(value)]
    assert wait_for_state(plugin, job_id) == State.kCompleted
    log = read_log(plugin, job_id)
    assert f"TMPDIR_SEEN={folder}\n".encode() in log
    assert f"CONTEXT_SEEN={record.spec.context}\n".encode() in log


# -- farm settings on the Render node, and what Katana's request carries ----------------------


def render_node(**settings) -> str:
    """A Render node in the stand-in node graph, its farm settings set as an artist would;
    returns its name."""
    node = NodegraphAPI.CreateNode("Render")
    node.setName(f"Render_{uuid.uuid4().hex[:8]}")
    for name, value in settings.items():
        node.getParameter(f"farmSettings.{name}").setValue(value, 0)
    return node.getName()


def test_loading_the_dropin_registers_the_farm_settings(katana_dropin: dict):
    assert katana_dropin["PluginRegistry"] == [
        ("FarmPlugin", 2.0, "Celery Farm", CeleryFarmPlugin)]
    added = {setting.getName(): setting for setting in FarmAPI.GetAddedFarmSettings()}
    assert {"pool", "priority", "maxStepSeconds", "stallSeconds", "maxMemoryMB",
            "renderType"} <= set(added)
    assert added["priority"].getValue() == 50 and added["renderType"].getValue() == "Disk"
    node = NodegraphAPI.GetNode(render_node())
    assert node.getParameter("farmSettings.priority").getValue(0) == 50.0  # Katana: floats
    runpy_again = register_farm_settings()  # loading twice adds nothing twice
    assert runpy_again is None and len(FarmAPI.GetAddedFarmSettings()) == len(added)


def test_inside_katana_the_dropin_registers_the_settings_again_once_katana_has_started(
    monkeypatch: pytest.MonkeyPatch,
):
    """Katana's documentation registers farm settings in an ``onStartup`` callback: the
    drop-in adds them as it loads and asks Katana's ``Callbacks`` for that too, which adds
    nothing twice."""
    callbacks: list = []

    class Callbacks:  # Katana's, as much as the drop-in uses
        class Type:
            onStartup = "onStartup"

        @staticmethod
        def addCallback(kind: str, callback) -> None:
            callbacks.append((kind, callback))

    monkeypatch.setattr(plugin_module, "Callbacks", Callbacks)
    loaded = runpy.run_path(str(KATANA_RESOURCES / "Plugins" / "CeleryFarmPlugin.py"))
    assert loaded["PluginRegistry"][0][3] is CeleryFarmPlugin
    ((kind, on_startup),) = callbacks
    assert kind == "onStartup"
    count = len(FarmAPI.GetAddedFarmSettings())
    assert {"pool", "priority"} <= {s.getName() for s in FarmAPI.GetAddedFarmSettings()}
    on_startup(objectHash=None)  # as Katana calls it, with keyword arguments
    assert len(FarmAPI.GetAddedFarmSettings()) == count


def test_farm_settings_on_the_render_node_reach_the_job(
    plugin: CeleryFarmPlugin, katana_dropin: dict
):
    pool = f"nobody-{uuid.uuid4().hex[:6]}"
    node = render_node(pool=pool, priority=80, stallSeconds=30, maxMemoryMB=512,
                       renderType="Preview")
    job_id, _ = submit_like_katana(plugin, ["true"], node_name=node,
                                   frames=[*range(1, 11), 20])
    spec = plugin.farm.get(job_id).spec
    assert (spec.name, spec.queue, spec.priority, spec.stall_seconds, spec.max_memory_mb,
            spec.render_type) == (node, pool, 80, 30, 512, "Preview")
    assert plugin.getJobState(job_id) == State.kWaiting  # no node serves that pool
    (job,) = plugin.getJobs([{"renderType": "Preview"}, {"name": node}])
    assert job.jobId == job_id and job.name == node
    plugin.stopJob(job_id)


def test_a_step_limit_set_on_the_node_is_enforced_by_the_render_node(
    plugin: CeleryFarmPlugin, katana_dropin: dict
):
    tag = uuid.uuid4().hex
    node = render_node(maxStepSeconds=1)
    job_id, _ = submit_like_katana(plugin, [command_line(renderboot("--seconds", 60,
                                                                   "--tag", tag))],
                                   node_name=node)
    assert wait_for_state(plugin, job_id, timeout=30) == State.kFailed
    assert "ran longer than its limit of 1 s" in plugin.farm.get(job_id).reason
    wait_until(lambda: not tagged_processes(tag), 15, "the render to be gone")


def assert_default_settings(plugin: CeleryFarmPlugin, job_id: str) -> None:
    spec = plugin.farm.get(job_id).spec
    assert (spec.queue, spec.priority, spec.max_step_seconds, spec.stall_seconds,
            spec.render_type) == (plugin.farm.settings.default_queue, 50, 0, 0, "Disk")


@pytest.mark.parametrize("node_name", ["no-such-node", "merge"])
def test_a_node_without_farm_settings_gets_the_defaults(
    plugin: CeleryFarmPlugin, katana_dropin: dict, node_name: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Katana renders remotely from any 3D node: one with no ``farmSettings`` is not asked
    for them (real Katana's ExtractFarmSettingsFromNode may raise there)."""
    if node_name == "merge":  # a 3D node that is not a Render node has no farmSettings
        merge = NodegraphAPI.CreateNode("Merge")
        node_name = merge.setName(f"Merge_{uuid.uuid4().hex[:8]}")
    extract = FarmAPI.ExtractFarmSettingsFromNode

    def extract_like_katana(node):
        if node.getParameter("farmSettings") is None:
            raise AttributeError("'NoneType' object has no attribute 'getChildren'")
        return extract(node)

    monkeypatch.setattr(FarmAPI, "ExtractFarmSettingsFromNode", extract_like_katana)
    job_id, _ = submit_like_katana(plugin, ["true"], node_name=node_name)
    assert_default_settings(plugin, job_id)
    assert "farm settings" not in caplog.text  # nothing to warn about
    assert wait_for_state(plugin, job_id) == State.kCompleted


def test_farm_settings_that_cannot_be_read_give_the_defaults_and_a_warning(
    plugin: CeleryFarmPlugin, katana_dropin: dict, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
):
    """Reading a farm node's settings raised (Katana's own function): the render is not
    lost; it gets the defaults, and Katana's log says why."""
    def extract_raises(node):
        raise RuntimeError("parameter farmSettings.priority has no value")

    monkeypatch.setattr(FarmAPI, "ExtractFarmSettingsFromNode", extract_raises)
    node = render_node(priority=90, pool="nowhere")
    with caplog.at_level(logging.WARNING, logger="celeryfarm.plugin"):
        job_id, _ = submit_like_katana(plugin, ["true"], node_name=node)
    assert_default_settings(plugin, job_id)
    (warning,) = [r for r in caplog.records if r.name == "celeryfarm.plugin"]
    assert warning.levelno == logging.WARNING
    assert f"cannot read the farm settings of node '{node}'" in warning.getMessage()
    assert "RuntimeError: parameter farmSettings.priority has no value" in \
        warning.getMessage()
    assert wait_for_state(plugin, job_id) == State.kCompleted


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"priority": 500}, "priority must be 0..100, got 500"),
        ({"priority": 50.5}, "priority must be a whole number"),
        ({"pool": "a b"}, "invalid pool name 'a b'"),
        ({"maxStepSeconds": -1}, "maxStepSeconds must not be negative"),
        ({"maxMemoryMB": -5}, "maxMemoryMB must not be negative"),
        ({"renderType": "Batch"}, "unknown render type 'Batch'"),
    ],
)
def test_bad_farm_settings_are_refused_with_a_clear_message(
    plugin: CeleryFarmPlugin, katana_dropin: dict, settings: dict, message: str
):
    with pytest.raises(FarmAPI.FarmPluginException, match=re.escape(message)):
        submit_like_katana(plugin, ["true"], node_name=render_node(**settings))
    assert plugin.getJobs(None) == []


def test_another_farms_settings_on_the_same_node_are_left_alone(
    plugin: CeleryFarmPlugin, katana_dropin: dict
):
    FarmAPI.AddFarmSettingString("Tractor.engine", "tractor-engine:80")  # a studio's other farm
    node = render_node(priority=70)
    assert FarmAPI.ExtractFarmSettingsFromNode(NodegraphAPI.GetNode(node))[
        "Tractor.engine"] == "tractor-engine:80"
    job_id, _ = submit_like_katana(plugin, ["true"], node_name=node)
    assert plugin.farm.get(job_id).spec.priority == 70


def test_commands_are_command_lines_split_without_a_shell(
    plugin: CeleryFarmPlugin, tmp_path: Path
):
    target = tmp_path / "a file; with $SHELL stuff"
    script = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    line = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} " \
           f"{shlex.quote(str(target))} 'two words' > {tmp_path}/redirected"
    job_id, _ = submit_like_katana(plugin, [line])
    assert wait_for_state(plugin, job_id) == State.kCompleted
    assert target.read_text() == "two words"  # quoting kept; '>' was an argument
    assert not (tmp_path / "redirected").exists()


def test_temp_dir_is_the_working_folder_and_may_be_spelled_through_a_symlink(
    plugin: CeleryFarmPlugin, tmp_path: Path
):
    context = str(uuid.uuid4())
    temp_dir = plugin.createTemporaryDirectory(context)
    link = tmp_path / "farm-link"
    link.symlink_to(plugin.farm.root.local)
    pwd = [sys.executable, "-c", "import os; print('CWD=' + os.getcwd())"]
    for spelling in (f"{temp_dir}/", str(link / context)):
        request = KatanaJobRequest("Render", context, [1], [command_line(pwd)],
                                   plugin.getEnvironmentForJob(context), spelling)
        job_id = plugin.submitJob(request)
        assert wait_for_state(plugin, job_id) == State.kCompleted
        cwd = Path(read_log(plugin, job_id).rsplit(b"CWD=", 1)[1].split()[0].decode())
        assert cwd.resolve() == Path(temp_dir).resolve()


def test_frames_are_kept_and_shown_by_status_and_jobs(plugin: CeleryFarmPlugin):
    env = dict(os.environ)  # the farm's variables and this test's user, set by farm_env
    job_id, _ = submit_like_katana(plugin, ["true"], frames=[20, *range(1, 11), 5])
    assert plugin.farm.get(job_id).spec.frames == ((1, 10), (20, 20))
    assert wait_for_state(plugin, job_id) == State.kCompleted
    assert re.search(r"frames: +1-10,20, 11 frames", ok(env, "status", job_id))
    assert "1-10,20, 11 frames" in ok(env, "jobs", "--mine")
    assert json.loads(ok(env, "status", "--json", job_id))["frames"] == \
        "1-10,20, 11 frames"


def test_get_jobs_filters(plugin: CeleryFarmPlugin):
    job_id, _ = submit(plugin.farm, [["true"]], name="Render_filters")
    for mine in (None, []):
        assert [job.jobId for job in plugin.getJobs(mine)] == [job_id]
    assert [job.jobId for job in plugin.getJobs([{"name": "filters"}, {"state": [
        State.kWaiting, State.kRunning, State.kCompleted]}])] == [job_id]
    with pytest.raises(FarmAPI.FarmPluginException, match="must be a dict, got 'state'"):
        plugin.getJobs(["state"])
    with pytest.raises(FarmAPI.FarmPluginException, match="unknown job filter 'colour'"):
        plugin.getJobs([{"name": "x"}, {"colour": "red"}])
    with pytest.raises(FarmAPI.FarmPluginException, match="list of dicts"):
        plugin.getJobs("mine")


def test_temp_dir_is_the_nodes_path_when_they_mount_the_share_elsewhere(
    farm_env: dict, katana_dropin: dict, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CELERYFARM_REMOTE_SHARED_ROOT", "/nodes/share")
    plugin = CeleryFarmPlugin()
    pool = f"nobody-{uuid.uuid4().hex[:6]}"
    node = render_node(pool=pool)  # a pool no node serves: the jobs wait, then are stopped
    context = str(uuid.uuid4())
    temp_dir = plugin.createTemporaryDirectory(context)
    assert temp_dir == f"/nodes/share/{context}"
    assert plugin.getEnvironmentForJob(context)["KATANA_TMPDIR"] == temp_dir
    local = str(plugin.farm.root.local / context)  # this host's spelling: the same folder
    for spelling in (temp_dir, local):
        request = KatanaJobRequest(node, context, [1], ["true"],
                                   plugin.getEnvironmentForJob(context), spelling)
        plugin.stopJob(plugin.submitJob(request))
    with pytest.raises(FarmAPI.FarmPluginException, match="is not the folder"):
        plugin.submitJob(KatanaJobRequest("Render", context, [1], ["true"], {},
                                          f"/nodes/share/{uuid.uuid4()}"))


def test_a_shared_root_behind_a_symlink_gives_one_log_path_everywhere(
    cluster: LocalCluster, farm_env: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The workstation mounts the shared root through a symlink: every path the plug-in
    hands Katana for a job's log is the same one, under the root as configured."""
    link = tmp_path / "farm-link"
    link.symlink_to(cluster.shared_root)
    monkeypatch.setenv("CELERYFARM_SHARED_ROOT", str(link))
    plugin = CeleryFarmPlugin()
    job_id, folder = submit_like_katana(plugin, [command_line(renderboot("--seconds", 0.1))])
    assert wait_for_state(plugin, job_id) == State.kCompleted
    path = plugin.getRenderLogFilename(job_id)
    (job,) = [job for job in plugin.getJobs(None) if job.jobId == job_id]
    assert job.renderLogFilename == path == f"{folder}/render.log"
    assert path.startswith(f"{link}/")
    assert b"| exit status 0 |" in Path(path).read_bytes()


def test_a_host_without_the_shared_mount_lists_jobs_with_an_empty_log_name(
    plugin: CeleryFarmPlugin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Katana's ``Job`` declares ``renderLogFilename: str``: a host that does not mount the
    shared root gets "" there, and None from ``getRenderLogFilename`` (``str | None``)."""
    job_id, _ = submit(plugin.farm, [["true"]])
    monkeypatch.setenv("CELERYFARM_SHARED_ROOT", str(tmp_path / "not-mounted"))
    elsewhere = CeleryFarmPlugin()
    (job,) = [job for job in elsewhere.getJobs(None) if job.jobId == job_id]
    assert job.renderLogFilename == ""
    assert elsewhere.getRenderLogFilename(job_id) is None
    assert wait_for_state(elsewhere, job_id) == State.kCompleted


def test_a_farm_whose_records_are_apart_from_the_broker_runs_and_restarts_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``CELERYFARM_STORE_URL`` apart from the broker (here another database): a dispatch's
    messages cannot ride in the record's write, so they go to the broker in one of their
    own, after a new job's record and before a dispatch is recorded as sent. Jobs run and
    restart, and each Redis database holds only its own keys."""
    farm = LocalCluster(tmp_path / "farm", extra_env=WORKER_ENV)
    broker = redis.Redis.from_url(farm.redis.url, decode_responses=True)
    farm.extra_env["CELERYFARM_STORE_URL"] = farm.redis.url.rsplit("/", 1)[0] + "/2"
    with running(farm, ["apart1"]):
        join(farm, monkeypatch)
        plugin = CeleryFarmPlugin()
        assert plugin.farm.store.broker is not None
        job_id, _ = submit(plugin.farm, [["true"], ["true"]])
        assert wait_for_state(plugin, job_id) == State.kCompleted
        plugin.startJob(job_id)
        wait_until(lambda: plugin.farm.get(job_id).attempt == 2
                   and plugin.getJobState(job_id) == State.kCompleted, 60, "attempt 2 done")
        assert step_headers(read_log(plugin, job_id)) == [b"1/2", b"2/2"] * 2
        assert not list(broker.scan_iter(plugin.farm.store.keys.job("*")))
        assert plugin.farm.store.redis.exists(plugin.farm.store.keys.job(job_id))
