"""Unit tests of pure logic: the FarmAPI stand-in, request validation, settings, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from celeryfarm import farmapi
from celeryfarm.config import Settings, redact
from celeryfarm.dispatch import celery_priority
from celeryfarm.errors import ConfigError, FarmError
from celeryfarm.jobs import JobSpec, describe_frames, frame_ranges, parse_command
from celeryfarm.paths import SharedRoot


def test_job_refuses_states_katana_does_not_know():
    job = farmapi.Job("id", "name", 1, 2, farmapi.Job.State.kRunning, "/log")
    assert (job.jobId, job.name, job.startTime, job.endTime, job.state,
            job.renderLogFilename) == ("id", "name", 1, 2, "Running", "/log")
    with pytest.raises(ValueError):
        farmapi.Job("id", "name", 0, 0, "Paused", "/log")
    assert set(farmapi.Job.State.kAllStates) == {
        "Waiting", "Running", "Completed", "Cancelled", "Failed"}


def test_job_not_found_is_a_farm_plugin_exception():
    error = farmapi.JobNotFoundException("abc", "context")
    assert isinstance(error, farmapi.FarmPluginException)
    assert error.jobId == "abc" and "abc" in str(error)


def test_commands_are_split_like_a_shell_but_never_run_by_one():
    assert parse_command("renderboot --name 'a b' $HOME;rm") == [
        "renderboot", "--name", "a b", "$HOME;rm"]
    assert parse_command(["a", "b c"]) == ["a", "b c"]
    with pytest.raises(FarmError):
        parse_command(b"bytes")


def test_spec_defaults_and_settings():
    spec = JobSpec.build(name="", commands=["true"], settings={"pool": "gpu", "priority": 90})
    assert (spec.name, spec.queue, spec.priority, spec.render_type) == ("render", "gpu", 90, "Disk")
    assert spec.commands == (("true",),)


def test_task_ids_name_the_dispatch_and_step():
    from celeryfarm.dispatch import step_of, task_ids
    from celeryfarm.jobs import JobRecord

    spec = JobSpec.build(name="r", commands=["a", "b", "c"])
    record = JobRecord(job_id="j1", spec=spec, log_path="j1/render.log", attempt=2, dispatch=5,
                       next_step=1)
    assert task_ids(record) == ("j1-2.5-1", "j1-2.5-2")
    assert [step_of(task_id) for task_id in task_ids(record)] == [1, 2]


def test_priorities_map_to_redis_order():
    assert celery_priority(100) == 0 and celery_priority(0) == 9 and celery_priority(50) in (4, 5)


def test_frames_are_kept_as_ranges_and_described_with_their_count():
    assert frame_ranges(range(1, 101)) == ((1, 100),)
    assert describe_frames(frame_ranges(range(1, 101))) == "1-100, 100 frames"
    assert frame_ranges([20, 3, 1, 2, 2, 4.0, 10]) == ((1, 4), (10, 10), (20, 20))
    assert describe_frames(frame_ranges([*range(1, 11), 20])) == "1-10,20, 11 frames"
    assert describe_frames(frame_ranges([7])) == "7, 1 frame"
    assert describe_frames(frame_ranges([-2, -1, 0, 5])) == "-2-0,5, 4 frames"
    assert describe_frames(()) == "-"
    for bad in ([1.5], ["x"], [True], "1-3", 3):
        with pytest.raises(FarmError, match="frame"):
            frame_ranges(bad)


def test_number_settings_arrive_as_floats_and_must_be_whole():
    spec = JobSpec.build(name="r", commands=["true"],
                         settings={"priority": 80.0, "maxStepSeconds": 60.0})
    assert (spec.priority, spec.max_step_seconds) == (80, 60)
    with pytest.raises(FarmError, match="priority must be a whole number"):
        JobSpec.build(name="r", commands=["true"], settings={"priority": 80.5})


def test_the_farmapi_stand_in_keeps_farm_settings_on_render_nodes():
    from celeryfarm import nodegraphapi

    farmapi.AddFarmSettingString("unitPool", "farm")
    farmapi.AddFarmSettingNumber("unitLimit", 3)
    farmapi.AddFarmSettingStringArray("unitTags", 2)
    render = nodegraphapi.CreateNode("Render")
    other = nodegraphapi.CreateNode("Render")
    assert other.getName() != render.getName()  # names are unique, as in Katana
    assert nodegraphapi.GetNode(render.getName()) is render
    render.getParameter("farmSettings.unitLimit").setValue(7, 0)
    render.getParameter("farmSettings.unitTags.i1").setValue("gpu", 0)
    values = farmapi.ExtractFarmSettingsFromNode(render)
    assert (values["unitPool"], values["unitLimit"], values["unitTags"]) == (
        "farm", 7.0, ["", "gpu"])
    merge = nodegraphapi.CreateNode("Merge")  # not a farm node: no farmSettings, defaults
    assert merge.getParameter("farmSettings") is None
    assert farmapi.ExtractFarmSettingsFromNode(merge)["unitLimit"] == 3
    assert "unitPool" in {s.getName() for s in farmapi.GetAddedFarmSettings()}
    assert farmapi.FarmPluginManager.JobRequest("n", "c", [1], ["x"], {}, "/t").tempDir == "/t"


def test_settings_from_the_environment():
    settings = Settings.from_env({
        "CELERYFARM_BROKER_URL": "redis://:pw@farm:6379/1",
        "CELERYFARM_SHARED_ROOT": "/mnt/farm",
        "CELERYFARM_REMOTE_SHARED_ROOT": "/shared",
        "CELERYFARM_RENDERER_DSO_PATHS": "dl=/opt/dl/katana, prman=/opt/prman/katana",
        "CELERYFARM_MAX_RENDER_SECONDS": "3600",
    })
    assert settings.results_url == settings.records_url == "redis://:pw@farm:6379/1"
    assert settings.node_shared_root == Path("/shared")
    assert settings.renderer_dso_paths == {"dl": "/opt/dl/katana", "prman": "/opt/prman/katana"}
    assert settings.visibility_timeout > settings.max_render_seconds
    with pytest.raises(ConfigError, match="CELERYFARM_POLL_SECONDS"):
        Settings.from_env({"CELERYFARM_POLL_SECONDS": "soon"})
    with pytest.raises(ConfigError, match="RENDERER_DSO_PATHS"):
        Settings.from_env({"CELERYFARM_RENDERER_DSO_PATHS": "dl"})


def test_passwords_are_redacted():
    assert redact("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("redis://user:pw@host/0") == "redis://user:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
    # A ';' splits only a Sentinel URL: in a redis:// password it is a character.
    assert redact("redis://u:pa;ss/x@host/0") == "redis://u:***@host/0"
    assert redact("sentinel://:a@h1:26379;sentinel://:b@h2:26380") == (
        "sentinel://:***@h1:26379;sentinel://:***@h2:26380")
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"CELERYFARM_BROKER_URL": "redis://u:pa;ss/x@host"})
    assert "pa;ss" not in str(refused.value) and "ss/x" not in str(refused.value)


def test_shared_root_maps_node_paths_and_refuses_escapes(tmp_path: Path):
    root = SharedRoot(tmp_path, Path("/shared"))
    assert root.to_remote("ctx/render.log") == "/shared/ctx/render.log"
    assert root.join("ctx/render.log") == tmp_path.resolve() / "ctx" / "render.log"
    (tmp_path / "link").symlink_to("/etc")
    for bad in ("../x", "/etc/passwd", "link/passwd", ""):
        with pytest.raises(FarmError):
            root.join(bad)


def test_a_record_s_path_has_one_local_name_even_behind_a_symlink(tmp_path: Path):
    real = tmp_path / "real"
    (real / "ctx").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    root = SharedRoot(link)
    assert root.local_path("ctx/render.log") == f"{link}/ctx/render.log"
    assert root.make_context_dir("ctx") == link / "ctx"
    assert root.local_path("ctx/./render.log") == f"{link}/ctx/render.log"
    for bad in ("../x", "ctx/../../x", "/etc/passwd", ""):
        with pytest.raises(FarmError):
            root.local_path(bad)


def test_the_public_api_is_what_all_says():
    import celeryfarm

    for name in celeryfarm.__all__:
        assert getattr(celeryfarm, name) is not None, name
    assert issubclass(celeryfarm.ConfigError, celeryfarm.FarmError)
    assert issubclass(celeryfarm.RedisServerError, celeryfarm.FarmError)
    assert issubclass(celeryfarm.StepFailed, celeryfarm.FarmError)
    assert issubclass(celeryfarm.JobNotFound, celeryfarm.FarmError)
    with pytest.raises(AttributeError):
        celeryfarm.app  # noqa: B018 - no Celery app is made by importing the package


def test_the_environment_that_joins_a_farm():
    settings = Settings.from_env({
        "CELERYFARM_BROKER_URL": "redis://:pw@farm:6379/1",
        "CELERYFARM_SHARED_ROOT": "/mnt/farm",
        "CELERYFARM_REMOTE_SHARED_ROOT": "/shared",
        "CELERYFARM_KEY_PREFIX": "farm2",
        "CELERYFARM_POLL_SECONDS": "1",  # a node's own timing: not needed to join
    })
    env = settings.client_environment()
    assert env == {
        "CELERYFARM_BROKER_URL": "redis://:pw@farm:6379/1",
        "CELERYFARM_SHARED_ROOT": "/mnt/farm",
        "CELERYFARM_REMOTE_SHARED_ROOT": "/shared",
        "CELERYFARM_KEY_PREFIX": "farm2",
    }
    joined = Settings.from_env(env)
    assert (joined.broker_url, joined.node_shared_root, joined.key_prefix) == (
        settings.broker_url, settings.node_shared_root, settings.key_prefix)


def test_a_context_folder_removed_after_its_first_use_is_made_again(tmp_path: Path):
    root = SharedRoot(tmp_path)
    folder = root.make_context_dir("ctx")
    folder.rmdir()
    assert root.make_context_dir("ctx").is_dir()


def test_events_idle_seconds_0_means_never(monkeypatch: pytest.MonkeyPatch):
    """0 is documented as "never" for this setting (and only for it): the node starts,
    and keeps Celery's own enable_events, which never turns task events off."""
    from celery.worker import control

    from celeryfarm import controls

    assert Settings.from_env({"CELERYFARM_EVENTS_IDLE_SECONDS": "0"}).events_idle_seconds == 0
    for name, value, problem in (("EVENTS_IDLE_SECONDS", "-1", "must be 0 or more"),
                                 ("POLL_SECONDS", "0", "must be positive"),
                                 ("MAX_RENDER_SECONDS", "0", "must be positive")):
        with pytest.raises(ConfigError, match=f"CELERYFARM_{name}: {problem}"):
            Settings.from_env({f"CELERYFARM_{name}": value})
    for handler in ("enable_events", "add_consumer"):  # install() changes the registry
        monkeypatch.setitem(control.Panel.data, handler, control.Panel.data[handler])
    controls.install(0)
    assert control.Panel.data["enable_events"] is controls._CELERY_ENABLE
    controls.install(60)
    assert control.Panel.data["enable_events"].__self__.idle_seconds == 60


def test_a_bad_sentinel_address_is_named_without_its_password():
    from celeryfarm.sentinel import SentinelUrl

    for part in ("redis://node:S3CRET@10.0.0.2:6379", "sentinel://node:S3CRET/x@h:26379",
                 "sentinel://:S3CRET@[bad", "node:S3CRET@h:26379"):
        with pytest.raises(ValueError, match="not a sentinel://host:port address") as error:
            SentinelUrl.parse(f"sentinel://:pw@h1:26379;{part}")
        assert "S3CRET" not in str(error.value) and "***@" in str(error.value)
        with pytest.raises(ConfigError, match="CELERYFARM_BROKER_URL: not a sentinel") as error:
            Settings.from_env({"CELERYFARM_BROKER_URL": f"sentinel://h1:26379;{part}"})
        assert "S3CRET" not in str(error.value)


@pytest.mark.parametrize("url", [
    "redis://u:S3CRET@[bad", "redis://u:S3C/RET@host:6379/0", "redis://:S3CRET@host:63x9/0",
    "redis://:S3CRET@host:6379/zero", "localhost:6379", "redis://:S3CRET@:6379/0",
    "http://:S3CRET@host/0",
])
@pytest.mark.parametrize("name", ["BROKER_URL", "RESULT_BACKEND", "STORE_URL", "ADMIN_URL"])
def test_a_malformed_redis_url_is_refused_naming_the_variable_not_the_password(
    name: str, url: str, tmp_path: Path
):
    with pytest.raises(ConfigError, match=f"^CELERYFARM_{name}: not a Redis URL") as error:
        Settings.from_env({f"CELERYFARM_{name}": url})
    assert "S3CRET" not in str(error.value)
    secret = tmp_path / "url"
    secret.write_text(url)
    with pytest.raises(ConfigError, match=f"^CELERYFARM_{name}: not a Redis URL") as error:
        Settings.from_env({f"CELERYFARM_{name}_FILE": str(secret)})
    assert "S3CRET" not in str(error.value)
    for good in ("redis://:pw@host:6379/0", "rediss://u:p%40ss@[::1]:6380/2", "redis://h"):
        assert Settings.from_env({"CELERYFARM_BROKER_URL": good}).broker_url == good


def test_a_malformed_redis_url_reaches_katana_as_a_farm_plugin_exception(
    monkeypatch: pytest.MonkeyPatch
):
    from celeryfarm.plugin import CeleryFarmPlugin

    monkeypatch.setenv("CELERYFARM_BROKER_URL", "redis://u:S3CRET@[bad")
    with pytest.raises(farmapi.FarmPluginException,
                       match="CELERYFARM_BROKER_URL: not a Redis URL") as error:
        CeleryFarmPlugin().getJobs(None)
    assert "S3CRET" not in str(error.value)


def test_the_broker_url_or_its_file_names_the_farm_up_does_not_start_its_own(tmp_path: Path):
    from celeryfarm.config import names_farm_redis
    from celeryfarm.localfarm import wants_embedded_redis

    secret = tmp_path / "broker-url"
    secret.write_text("redis://:pw@farm.example.com:6379/0\n")
    only_file = {"CELERYFARM_DATA_DIR": str(tmp_path / "data"),
                 "CELERYFARM_BROKER_URL_FILE": str(secret)}
    assert names_farm_redis(only_file)
    assert names_farm_redis({"CELERYFARM_BROKER_URL": "redis://farm:6379/0"})
    assert not names_farm_redis({"CELERYFARM_BROKER_URL": " ", "CELERYFARM_BROKER_URL_FILE": ""})
    assert not wants_embedded_redis(Settings.from_env(only_file), only_file)
    alone = {"CELERYFARM_DATA_DIR": str(tmp_path / "data")}
    assert wants_embedded_redis(Settings.from_env(alone), alone)
