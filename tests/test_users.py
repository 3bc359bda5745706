"""Workstation, node and render as different users: a studio set-up on one machine.

An artist (umask 022) submits through the command line, which goes through the plug-in as
Katana does; a render node runs as another user; both are in the farm's group, and the
shared root is ``2775`` in that group, as the README's studio set-up says. What each makes
must be readable and writable by the others, whatever their umask.
"""

from __future__ import annotations

import grp
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.testing.cluster import LocalCluster
from celeryfarm.worker import celery_command, node_command

from .cli_fixtures import CELERYFARM, base_env
from .conftest import WORKER_ENV
from .users import (
    ARTIST,
    FARM_GROUP,
    NODE,
    OUTSIDER,
    RENDER,
    as_user,
    capable_setpriv,
    ensure_group,
    ensure_user,
    python_as,
    python_for_others,
)

POOL = "studio"


class Studio:
    """A farm in folders every user may pass through, with a render node run by ``NODE``."""

    def __init__(self) -> None:
        ensure_group(FARM_GROUP)
        self.artist = ensure_user(ARTIST, [FARM_GROUP])
        self.node = ensure_user(NODE, [FARM_GROUP])
        self.gid = grp.getgrnam(FARM_GROUP).gr_gid
        self.base = Path(tempfile.mkdtemp(prefix="celeryfarm-studio-"))
        self.base.chmod(0o755)
        self.cluster = LocalCluster(self.base, extra_env=WORKER_ENV,
                                    password=secrets.token_hex(16))
        self.shared = self.cluster.shared_root
        self.shared.mkdir()
        os.chown(self.shared, 0, self.gid)
        self.shared.chmod(0o2775)  # the README's studio set-up
        self.python, self.python_env = python_for_others()

    @property
    def env(self) -> dict[str, str]:
        """A client's or node's farm variables (no --allow-root: nobody here is root)."""
        return {k: v for k, v in self.cluster.env.items() if k != "CELERYFARM_ALLOW_ROOT"}

    def start_node(self) -> None:
        argv = node_command("studio", concurrency=1, queues=POOL)
        argv[0] = self.python
        with open(self.base / "worker-studio.log", "ab") as log:
            self.cluster.workers["studio"] = subprocess.Popen(
                argv, env={**base_env(), **self.python_env, **self.env, "HOME": "/nonexistent"},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                **as_user(NODE, umask=0o022))
        self.cluster.wait_for_workers(Farm(Settings.from_env(self.env)).app, ["studio"])

    def cli_as(self, user: str, *args: str, env: dict[str, str] | None = None,
               umask: int = 0o022) -> subprocess.CompletedProcess:
        """``celeryfarm ARGS`` run by ``user`` with ``umask``."""
        code = ("import sys; from celeryfarm.cli import main; "
                f"sys.argv = {['celeryfarm', *args]!r}; main()")
        return python_as(user, code, umask=umask, env={
            **base_env(), **self.env, "CELERYFARM_USER": user, **(env or {})})


@pytest.fixture(scope="module")
def studio() -> Iterator[Studio]:
    farm = Studio()
    farm.cluster.start()
    try:
        farm.start_node()
        yield farm
    finally:
        farm.cluster.stop()
        shutil.rmtree(farm.base, ignore_errors=True)


def mode_and_group(path: Path) -> tuple[str, str]:
    info = path.stat()
    return f"{stat.S_IMODE(info.st_mode):04o}", grp.getgrgid(info.st_gid).gr_name


def test_an_artist_with_umask_022_renders_on_a_node_of_another_user(studio: Studio):
    scenes = studio.base / "artist-home"
    scenes.mkdir(mode=0o700)
    scene = scenes / "shot010.katana"
    scene.write_text("scene shot010 v3\n")
    scene.chmod(0o600)
    for path in (scenes, scene):
        os.chown(path, studio.artist.pw_uid, studio.artist.pw_gid)
    render = ("import os; print('scene:', open('shot010.katana').read().strip()); "
              "os.mkdir('frames'); open('frames/beauty.0001.exr', 'w').write('pixels'); "
              "print('rendered as', os.getuid())")
    result = studio.cli_as(ARTIST, "submit", "--name", "shot010", "--pool", POOL, "--file",
                           str(scene), "--wait", "--", studio.python, "-c", render)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"[0-9a-f]{32}", result.stdout).group(0)

    log = studio.cli_as(ARTIST, "log", job_id)
    assert log.returncode == 0, log.stderr
    assert "scene: scene shot010 v3" in log.stdout  # the node's render read the copy
    assert f"rendered as {studio.node.pw_uid}" in log.stdout
    (folder,) = [p for p in studio.shared.iterdir() if (p / "shot010.katana").exists()]
    assert folder.stat().st_uid == studio.artist.pw_uid  # the artist made it, with umask 022
    assert mode_and_group(folder) == ("2775", FARM_GROUP)
    assert mode_and_group(folder / "shot010.katana") == ("0664", FARM_GROUP)
    assert mode_and_group(folder / "render.log") == ("0664", FARM_GROUP)
    assert mode_and_group(folder / "frames") == ("2775", FARM_GROUP)
    assert mode_and_group(folder / "frames" / "beauty.0001.exr") == ("0664", FARM_GROUP)
    # And the artist can change the frames the node's render made.
    edit = python_as(ARTIST, f"open({str(folder / 'frames' / 'beauty.0001.exr')!r}, 'a')"
                             ".write('graded')")
    assert edit.returncode == 0, edit.stderr


def test_doctor_says_what_is_wrong_with_a_node_s_set_up(studio: Studio):
    katana = studio.base / "katana"
    (katana / "bin").mkdir(parents=True)
    (katana / "bin" / "renderboot").write_text("#!/bin/sh\n")
    (katana / "bin" / "renderboot").chmod(0o755)
    result = studio.cli_as(NODE, "doctor", env={"CELERYFARM_KATANA_ROOT": str(katana)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["shared", "mount:"], ["Katana", "root:"], ["Redis:", "ok"], ["node", "user:"]]
    assert result.stdout.count(" ok ") == 4

    private = studio.base / "not-shared"
    private.mkdir(mode=0o755)
    result = studio.cli_as(NODE, "doctor", env={
        "CELERYFARM_SHARED_ROOT": str(private), "CELERYFARM_KATANA_ROOT": str(katana / "no"),
        "CELERYFARM_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1
    shared, katana_root, redis, user = result.stdout.splitlines()
    assert shared.startswith("shared mount: PROBLEM ")
    assert f"{private}: {NODE} cannot create files in it" in shared
    assert katana_root.startswith("Katana root:  PROBLEM ") and "does not exist" in katana_root
    assert "cannot reach the farm's Redis at redis://127.0.0.1:1/0" in redis
    assert user.startswith(f"node user:    ok {NODE}")

    os.chown(private, studio.node.pw_uid, -1)  # writable now, but not shared with a group
    result = studio.cli_as(NODE, "doctor", env={"CELERYFARM_SHARED_ROOT": str(private)})
    assert "is 0755: make it 2775" in result.stdout.splitlines()[0]


def test_doctor_tries_the_switch_to_the_render_user_as_a_step_would(studio: Studio):
    """A node that is not root switches users through a capable ``setpriv`` on its PATH (the
    worker image's way), with no capability of its own: doctor says ok only where that
    switch works, and that the render user must be in the shared folder's group."""
    ensure_user(RENDER, [FARM_GROUP])
    katana = {"CELERYFARM_KATANA_ROOT": str(studio.base)}
    with capable_setpriv(NODE) as switch:
        env = {**katana, "CELERYFARM_RENDER_USER": RENDER,
               "PATH": f"{switch}:{os.environ['PATH']}"}
        line = studio.cli_as(NODE, "doctor", env=env).stdout.splitlines()[-1]
        assert line.startswith(f"node user:    ok {NODE}; renders run as {RENDER}"), line
        outsider = ensure_user(OUTSIDER)  # in no farm group
        line = studio.cli_as(NODE, "doctor", env={**env, "CELERYFARM_RENDER_USER": OUTSIDER}
                             ).stdout.splitlines()[-1]
        assert f"renders run as {outsider.pw_name}, who is not in group {FARM_GROUP}" in line
    line = studio.cli_as(NODE, "doctor", env={**katana, "CELERYFARM_RENDER_USER": RENDER}
                         ).stdout.splitlines()[-1]  # the system's setpriv: no capability
    assert line.startswith("node user:    PROBLEM ") and "cannot run renders as" in line, line


def test_a_node_refuses_to_run_as_root_unless_told(tmp_path):
    env = {k: v for k, v in base_env().items() if k != "CELERYFARM_ALLOW_ROOT"}
    env.update(CELERYFARM_BROKER_URL="redis://127.0.0.1:1/0",
               CELERYFARM_SHARED_ROOT=str(tmp_path))
    refused = subprocess.run([*CELERYFARM, "worker"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("Error: refusing to run a render node as root")
    allowed = subprocess.run([*CELERYFARM, "worker", "--allow-root"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert "cannot reach the farm's Redis" in allowed.stderr  # past the check
    # Celery's own command line, with the farm's app, refuses too (the render node bootstep).
    node = subprocess.run(celery_command("celeryfarm", "root-node"), env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert node.returncode != 0
    assert "refusing to run a render node as root" in node.stderr + node.stdout
