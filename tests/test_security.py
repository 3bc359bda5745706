"""Security: the record is the truth, input that cannot hurt, programs nodes may run."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celeryfarm import admission
from celeryfarm.celery import RENDER_STEP
from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

from .helpers import read_log, renderboot, submit, wait_for_state

State = Job.State


def test_a_forged_message_for_a_real_job_never_runs_its_command(
    plugin: CeleryFarmPlugin, tmp_path: Path
):
    """A message carrying a waiting job's current token but another command is refused: the
    node runs only what the job's record holds, and the job fails with the reason."""
    marker = tmp_path / "forged-ran"
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)],
                       settings={"pool": f"nobody-{uuid.uuid4().hex[:6]}"})
    record = plugin.farm.get(job_id)
    assert record.state == State.kWaiting
    forged = ["touch", str(marker)]
    plugin.farm.app.send_task(RENDER_STEP, queue="renders", kwargs={
        "job_id": job_id, "attempt": record.attempt, "dispatch": record.dispatch, "step": 0,
        "steps": 1, "name": record.spec.name, "command": forged})
    assert wait_for_state(plugin, job_id) == State.kFailed
    assert not marker.exists()
    reason = plugin.farm.get(job_id).reason
    assert "refused: the message's command is not the job record's" in reason
    assert b"not the job record's" in read_log(plugin, job_id)


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
