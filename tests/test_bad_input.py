"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from celeryfarm.farmapi import FarmPluginException, Job, JobNotFoundException
from celeryfarm.plugin import KATANA_RESOURCES, CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

from .helpers import KatanaJobRequest, read_log, renderboot, submit, wait_for_state


@pytest.mark.parametrize("method", ["getJobState", "getRenderLogFilename", "startJob", "stopJob"])
@pytest.mark.parametrize("job_id", ["0" * 32, "no-such-job", "", "../../etc/passwd"])
def test_unknown_job_ids_raise_job_not_found(plugin: CeleryFarmPlugin, method: str, job_id: str):
    with pytest.raises(JobNotFoundException) as raised:
        getattr(plugin, method)(job_id)
    assert raised.value.jobId == job_id
    assert isinstance(raised.value, FarmPluginException)


def request(plugin: CeleryFarmPlugin, **fields) -> KatanaJobRequest:
    """A Katana-shaped request for a render context the plug-in made, with ``fields``
    replaced."""
    context = str(uuid.uuid4())
    values = {"nodeName": "Render", "renderContextName": context, "frames": [1, 2, 3],
              "commands": ["true"], "environment": plugin.getEnvironmentForJob(context),
              "tempDir": plugin.createTemporaryDirectory(context), **fields}
    return KatanaJobRequest(**values)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"commands": []}, "no commands"),
        ({"commands": [""]}, "empty"),
        ({"commands": "renderboot -x"}, "list of command-line strings"),
        ({"commands": [["renderboot", "-x"]]}, "command-line string"),
        ({"commands": ["renderboot 'unclosed"]}, "cannot parse"),
        ({"commands": ["render\0boot"]}, "NUL"),
        ({"frames": ["first"]}, "frame number must be a whole number"),
        ({"frames": [1.5]}, "frame number must be a whole number"),
        ({"frames": "1-3"}, "list of frame numbers"),
        ({"environment": {"A=B": "x"}}, "environment variable name"),
        ({"environment": ["A=B"]}, "environment must be a mapping"),
        ({"nodeName": ""}, "nodeName"),
        ({"renderContextName": "../outside"}, "render context"),
        ({"renderContextName": "/etc"}, "render context"),
        ({"renderContextName": "never-made"}, "createTemporaryDirectory before submitJob"),
        ({"tempDir": "/tmp"}, "tempDir '/tmp' is not the folder createTemporaryDirectory made"),
        ({"tempDir": "relative/folder"}, "tempDir"),
        ({"tempDir": None}, "tempDir"),
    ],
)
def test_malformed_requests_are_refused_with_a_clear_message(
    plugin: CeleryFarmPlugin, fields: dict, message: str
):
    with pytest.raises(FarmPluginException, match=re.escape(message)):
        plugin.submitJob(request(plugin, **fields))
    assert plugin.getJobs(None) == []  # nothing half-submitted


def test_a_request_without_katanas_attributes_names_what_is_missing(plugin: CeleryFarmPlugin):
    class OldShape:  # the fields this project's stand-in once invented
        name, renderContextName, commands = "Render", str(uuid.uuid4()), ["true"]
        frameRange, renderType, settings = (1, 3), "Disk", {"pool": "gpu"}

    with pytest.raises(FarmPluginException) as raised:
        plugin.submitJob(OldShape())
    assert "nodeName, frames, environment, tempDir" in str(raised.value)
    assert "JobRequest(nodeName, renderContextName, frames, commands, environment, tempDir)" \
        in str(raised.value)
    with pytest.raises(FarmPluginException, match="no nodeName, renderContextName"):
        plugin.submitJob({"nodeName": "Render"})  # a mapping is not a request either
    assert plugin.getJobs(None) == []


@pytest.mark.parametrize("context", ["../escape", "a/../../b", "/abs", "..", "", "a/b"])
def test_context_names_cannot_escape_the_shared_root(plugin: CeleryFarmPlugin, context: str):
    with pytest.raises(FarmPluginException, match="render context"):
        plugin.createTemporaryDirectory(context)
    with pytest.raises(FarmPluginException, match="render context"):
        plugin.copyRenderFiles([__file__], context)


def test_copying_a_missing_file_says_which(plugin: CeleryFarmPlugin, tmp_path: Path):
    missing = tmp_path / "missing.optree"
    with pytest.raises(FarmPluginException, match=r"missing\.optree.*no such file"):
        plugin.copyRenderFiles([str(missing)], str(uuid.uuid4()))


def test_copying_keeps_files_with_the_same_name_apart(plugin: CeleryFarmPlugin, tmp_path: Path):
    first, second = tmp_path / "a" / "scene.optree", tmp_path / "b" / "scene.optree"
    for path, text in ((first, b"one"), (second, b"two")):
        path.parent.mkdir()
        path.write_bytes(text)
    copied = plugin.copyRenderFiles([str(first), str(second)], str(uuid.uuid4()))
    assert copied[str(first)] != copied[str(second)]
    assert Path(copied[str(second)]).read_bytes() == b"two"


def test_an_unwritable_shared_mount_is_reported_where_it_is(
    farm_env: dict, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CELERYFARM_SHARED_ROOT", "/proc/celeryfarm-unwritable")
    plugin = CeleryFarmPlugin()
    with pytest.raises(FarmPluginException, match="/proc/celeryfarm-unwritable"):
        plugin.createTemporaryDirectory(str(uuid.uuid4()))


def test_a_node_that_cannot_write_the_log_fails_the_job_with_the_reason(
    plugin: CeleryFarmPlugin, cluster: LocalCluster
):
    pool = f"broken-{uuid.uuid4().hex[:6]}"
    name = f"broken{uuid.uuid4().hex[:6]}"
    cluster.start_worker(name, concurrency=1, queues=pool,
                         env={"CELERYFARM_SHARED_ROOT": "/proc/celeryfarm-unwritable"})
    try:
        cluster.wait_for_workers(plugin.farm.app, [name])
        job_id, _ = submit(plugin.farm, [renderboot()], settings={"pool": pool})
        assert wait_for_state(plugin, job_id) == Job.State.kFailed
        reason = plugin.farm.get(job_id).reason
        assert "cannot write the render log" in reason and "/proc/celeryfarm-unwritable" in reason
    finally:
        cluster.stop_worker(name)


def test_a_node_that_mounts_the_share_elsewhere_refuses_the_job_with_the_reason(
    cluster: LocalCluster, farm_env: dict, monkeypatch: pytest.MonkeyPatch
):
    """The workstation was told the nodes mount the shared folder at a path this node does
    not have: the job fails before anything runs, saying so in its record and render log."""
    monkeypatch.setenv("CELERYFARM_REMOTE_SHARED_ROOT", "/celeryfarm-nodes-mount/share")
    plugin = CeleryFarmPlugin()
    context = str(uuid.uuid4())
    temp_dir = plugin.createTemporaryDirectory(context)
    job_id = plugin.submitJob(KatanaJobRequest(
        "Render", context, [1], ["true"], plugin.getEnvironmentForJob(context), temp_dir))
    assert wait_for_state(plugin, job_id) == Job.State.kFailed
    reason = plugin.farm.get(job_id).reason
    assert f"the job's folder {temp_dir} (KATANA_TMPDIR) is not on this node" in reason
    assert str(cluster.shared_root) in reason
    log = read_log(plugin, job_id).decode()
    assert "refused: the job's folder" in log and "CELERYFARM_REMOTE_SHARED_ROOT" in log
    assert "| exit status" not in log  # nothing ran


def test_an_unreachable_broker_is_a_farm_error_not_a_hang(
    farm_env: dict, monkeypatch: pytest.MonkeyPatch
):
    from celeryfarm.redisserver import free_port

    monkeypatch.setenv("CELERYFARM_BROKER_URL", f"redis://:secret@127.0.0.1:{free_port()}/0")
    code = (
        "import sys\n"
        "from celeryfarm.plugin import CeleryFarmPlugin\n"
        "from celeryfarm.farmapi import FarmPluginException\n"
        "try:\n"
        "    CeleryFarmPlugin().getJobState('x')\n"
        "except FarmPluginException as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3, done.stderr
    assert "cannot reach the farm's Redis" in done.stdout
    assert "secret" not in done.stdout


def test_a_killed_step_on_a_stopped_job_is_never_rerun_by_a_restart_race(
    plugin: CeleryFarmPlugin,
):
    """startJob on an active job is a no-op, so a double click cannot start two attempts."""
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.5)])
    plugin.startJob(job_id)
    plugin.startJob(job_id)
    assert wait_for_state(plugin, job_id) == Job.State.kCompleted
    assert plugin.farm.get(job_id).attempt == 1
    assert read_log(plugin, job_id).count(b"step 1/1 | attempt") == 1


def test_a_bad_setting_is_a_farm_plugin_exception_not_an_import_error(farm_env: dict):
    """Katana imports the plug-in and builds it before any call: a bad ``CELERYFARM_*``
    value must not break either, and each call then says what is wrong."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(KATANA_RESOURCES / 'Plugins')!r})\n"
        "import CeleryFarmPlugin as registration\n"
        "import celeryfarm, celeryfarm.celery\n"
        "from celeryfarm.farmapi import FarmPluginException\n"
        "plugin = registration.PluginRegistry[0][3]()\n"
        "for call in (lambda: plugin.getJobState('x'), lambda: plugin.getJobs(None),\n"
        "             plugin.getRemoteInstallationMetadata):\n"
        "    try:\n"
        "        call()\n"
        "    except FarmPluginException as e:\n"
        "        print(e)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**farm_env, "CELERYFARM_POLL_SECONDS": "soon", "PATH": os.environ["PATH"]}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all("CELERYFARM_POLL_SECONDS" in line for line in lines), lines
