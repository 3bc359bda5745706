"""Frame progress from the render's output: `jobs` and `status` show frames done of total and
an estimate of the time left, on real render nodes."""

from __future__ import annotations

import json

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.progress import describe, seconds_left
from celeryfarm.records.keys import short_id

from .cli_fixtures import base_env, ok
from .helpers import renderboot, submit, wait_for_state, wait_until

State = Job.State


def test_a_running_job_shows_frames_done_and_the_time_left(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    env = base_env(**farm_env)
    job_id, _ = submit(plugin.farm, [renderboot("--frames", "1-40", "--seconds", 120)],
                       frames=range(1, 41))
    status = wait_until(
        lambda: (s := json.loads(ok(env, "status", "--json", job_id)))["frames_done"] >= 2 and s,
        60, "two frames to be done")
    assert status["frames_total"] == 40 and status["state"] == "Running"
    assert status["seconds_left"] > 0
    assert "/40 frames, about" in ok(env, "status", job_id)
    row = next(line for line in ok(env, "jobs").splitlines() if line.startswith(short_id(job_id)))
    assert "/40 frames" in row
    plugin.stopJob(job_id)


def test_each_frame_of_the_job_counts_once_and_others_not_at_all(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    # two steps render frames 1-3 again and frames 4-5, which the job does not have
    job_id, _ = submit(plugin.farm, [renderboot("--frames", "1-3", "--seconds", 0.3),
                                     renderboot("--frames", "1-5", "--seconds", 0.3)],
                       frames=range(1, 4))
    assert wait_for_state(plugin, job_id) == State.kCompleted
    status = json.loads(ok(base_env(**farm_env), "status", "--json", job_id))
    assert (status["frames_done"], status["frames_total"], status["seconds_left"]) == (3, 3, None)
    plugin.startJob(job_id)  # a new attempt counts from 0 again
    assert plugin.farm.get(job_id).frames_done == 0
    assert wait_for_state(plugin, job_id) == State.kCompleted
    assert plugin.farm.get(job_id).frames_done == 3


def test_the_estimate_is_the_pace_so_far():
    assert seconds_left(done=2, total=10, running_ms=20_000) == 80
    assert seconds_left(done=0, total=10, running_ms=20_000) is None
    assert seconds_left(done=10, total=10, running_ms=20_000) is None
    assert describe(2, 10, 80) == "2/10 frames, about 1m20s left"
    assert describe(0, 0, None) == "-"
