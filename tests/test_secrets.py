"""Renders cannot reach their node's secrets, and each step starts from a clean home.

A render is code the farm did not write; these tests run renders that go looking for the
node's Redis password and the operator's environment everywhere a process can look: its own
environment, every ``/proc/*/environ`` and ``/proc/*/cmdline``, and every file it can read
under the node's data folder, the farm's folders, its home and its temporary folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from celeryfarm import process, renderenv
from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

from .conftest import WORKER_ENV
from .helpers import command_line, read_log, submit_like_katana, wait_for_state
from .users import NODE, RENDER, capable_setpriv, ensure_user, python_as, python_for_others

#: Looks for the strings whose reversals are its arguments (so its own command line does
#: not hold them) wherever it can read, and prints a JSON report.
HUNT = r"""
import json, os, sys
needles = [arg[::-1].encode() for arg in sys.argv[1:]]
roots = [os.environ["HOME"], os.environ["TMPDIR"], os.getcwd(),
         *filter(None, os.environ.get("HUNT_ROOTS", "").split(":"))]
found, looked = [], 0
def look(where, data):
    found.extend(where for needle in needles if needle in data)
look("os.environ", repr(dict(os.environ)).encode())
for pid in filter(str.isdigit, os.listdir("/proc")):
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as file:
                data = file.read()
        except OSError:
            continue
        looked += 1
        look(f"/proc/{pid}/{name}", data)
for root in roots:
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb") as file:
                    data = file.read()
            except OSError:
                continue
            looked += 1
            look(os.path.join(folder, name), data)
print("HUNT " + json.dumps({"uid": os.getuid(), "looked": looked, "found": found,
                            "env": sorted(os.environ)}), flush=True)
"""


def hunt(python: str, *needles: str) -> list[str]:
    return [python, "-c", HUNT, *(needle[::-1] for needle in needles)]


def report(output: bytes) -> dict:
    (line,) = [line for line in output.splitlines() if line.startswith(b"HUNT ")]
    return json.loads(line[5:])


@pytest.fixture(scope="module")
def guarded_farm() -> Iterator[tuple[LocalCluster, Path]]:
    """A farm whose Redis has a password, in folders other users may pass through, with a
    node that reads the password from a file in its private data folder and runs renders
    as another user."""
    ensure_user(RENDER)
    base = Path(tempfile.mkdtemp(prefix="celeryfarm-secrets-"))
    base.chmod(0o755)
    data_dir = base / "node-data"
    data_dir.mkdir(mode=0o700)
    cluster = LocalCluster(base, extra_env=WORKER_ENV, password=secrets.token_hex(16)).start()
    url_file = data_dir / "broker-url"
    url_file.write_text(cluster.redis.url)
    url_file.chmod(0o600)
    try:
        cluster.start_worker("guarded", concurrency=1, queues="guarded", env={
            "CELERYFARM_BROKER_URL": "", "CELERYFARM_BROKER_URL_FILE": str(url_file),
            "CELERYFARM_DATA_DIR": str(data_dir), "CELERYFARM_RENDER_USER": RENDER,
            "SSH_AUTH_SOCK": f"/tmp/ssh-agent-{cluster.redis.password[::2]}",
        })
        cluster.wait_for_workers(Farm(Settings.from_env(cluster.env)).app, ["guarded"])
        yield cluster, data_dir
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_render_finds_none_of_its_node_s_secrets(guarded_farm, monkeypatch):
    cluster, data_dir = guarded_farm
    password = cluster.redis.password
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    plugin = CeleryFarmPlugin()
    python, python_env = python_for_others()
    context = plugin.farm.create_context()
    job_id = plugin.farm.submit_commands(
        [hunt(python, password, password[::2])], context=context.name, name="hunt",
        environment={**python_env, "HUNT_ROOTS": f"{cluster.base}:{data_dir}"},
        settings={"pool": "guarded"}).job_id
    assert wait_for_state(plugin, job_id) == Job.State.kCompleted
    found = report(read_log(plugin, job_id))
    assert found["uid"] == ensure_user(RENDER).pw_uid  # it ran as the render user
    assert found["looked"] > 20  # it could read many processes' and files' contents
    assert found["found"] == []
    assert "SSH_AUTH_SOCK" not in found["env"]
    assert not [name for name in found["env"] if name.startswith("CELERYFARM_")
                and name not in ("CELERYFARM_JOB_ID", "CELERYFARM_ATTEMPT",
                                 "CELERYFARM_RENDER_CONTEXT", process.MARKER)]


def test_a_render_as_the_node_s_own_user_cannot_read_the_node_s_environment():
    """Without a render user, the node process is not dumpable: a render running as the
    same user cannot read its ``/proc/<pid>/environ``. (The control run, without that,
    finds the password: the hunt works.)"""
    ensure_user(NODE)
    password = secrets.token_hex(16)
    code = (
        "import io, os, sys\n"
        "from celeryfarm import process, renderenv\n"
        "if not os.environ.get('STAY_DUMPABLE'):\n"
        "    assert renderenv.protect_node_process()\n"
        "with renderenv.private_folders(None) as folders:\n"
        "    out = io.BytesIO()\n"
        f"    argv = {hunt('python', password)!r}\n"
        "    argv[0] = sys.executable\n"
        "    process.run(argv, env=renderenv.environment({}, os.environ, (), folders),\n"
        "                cwd=folders['TMPDIR'], output=out, should_stop=lambda: '')\n"
        "print(out.getvalue().decode())\n"
    )
    node_env = {"CELERYFARM_BROKER_URL": f"redis://:{password}@redis-host:6379/0"}
    protected = python_as(NODE, code, env=node_env)
    assert report(protected.stdout.encode())["found"] == [], protected.stderr
    exposed = python_as(NODE, code, env={**node_env, "STAY_DUMPABLE": "1"})
    assert any(place.endswith("/environ") for place in
               report(exposed.stdout.encode())["found"]), exposed.stderr


def test_each_step_has_a_fresh_home_and_temporary_folder_removed_afterwards(
    plugin: CeleryFarmPlugin,
):
    plant = ("import os; open(os.path.join(os.environ['HOME'], 'usercustomize.py'), 'w')"
             ".write('print(1)'); print('HOME=' + os.environ['HOME']);"
             " print('TMPDIR=' + os.environ['TMPDIR'])")
    first, _ = submit_like_katana(plugin, [command_line(["python3", "-c", plant])])
    assert wait_for_state(plugin, first) == Job.State.kCompleted
    log = read_log(plugin, first).decode()
    home = log.split("HOME=")[1].split()[0]
    tmp = log.split("TMPDIR=")[1].split()[0]
    assert not os.path.exists(home) and not os.path.exists(tmp)
    look = (f"import os; print('HOME=' + os.environ['HOME']); "
            f"print('PLANTED', os.path.exists({home!r} + '/usercustomize.py'))")
    second, _ = submit_like_katana(plugin, [command_line(["python3", "-c", look])])
    assert wait_for_state(plugin, second) == Job.State.kCompleted
    log = read_log(plugin, second).decode()
    assert "PLANTED False" in log and f"HOME={home}\n" not in log


def test_the_render_environment_is_the_job_s_plus_an_allowlist():
    node = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "SSH_AUTH_SOCK": "/agent",
            "AWS_SECRET_ACCESS_KEY": "x", "CELERYFARM_BROKER_URL": "redis://:pw@h/0",
            "foundry_LICENSE": "4101@licence"}
    job = {"SHOT": "sh010", "HOME": "/home/artist", "CELERYFARM_BROKER_URL_FILE": "/etc/x",
           "CELERYFARM_RENDER_CONTEXT": "ctx", "PATH": "/studio/bin:/usr/bin"}
    env = renderenv.environment(job, node, ("foundry_LICENSE",), {"HOME": "/tmp/h"})
    assert env == {"PATH": "/studio/bin:/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C",
                   "foundry_LICENSE": "4101@licence", "SHOT": "sh010",
                   "CELERYFARM_RENDER_CONTEXT": "ctx", "HOME": "/tmp/h"}


#: A render that says who it is, which capabilities it has, writes in its home, and tries to
#: run the program given as its argument.
WHO_AM_I = (
    "import os, subprocess, sys\n"
    "print(os.getuid(), os.getgid())\n"
    "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
    "print('TMPDIR', os.environ.get('TMPDIR'))\n"
    "open(os.path.join(os.environ['HOME'], 'x'), 'w').write('x')\n"
    "subprocess.run([sys.argv[1], '--help'])\n"
)


def test_a_node_that_is_not_root_runs_renders_as_the_render_user(tmp_path_factory):
    """As in the worker image: the node may run (only it) a ``setpriv`` with CAP_SETUID and
    CAP_SETGID; its renders run as the render user, with no capability left, in a home the
    render user owns, removed afterwards."""
    ensure_user(NODE)
    render = ensure_user(RENDER)
    with capable_setpriv(NODE) as switch:
        setpriv = switch / "setpriv"
        code = (
            "import io, os, sys\n"
            "from celeryfarm import process, renderenv\n"
            f"user = renderenv.render_user({RENDER!r})\n"
            "with renderenv.private_folders(user) as folders:\n"
            "    out = io.BytesIO()\n"
            "    argv = [sys.executable, '-c', %r, %r]\n" % (WHO_AM_I, str(setpriv)) +
            "    env = renderenv.environment({}, os.environ, (), folders)\n"
            "    outcome = process.run(user.command(argv, env), env=env,\n"
            "                          spawn_options=renderenv.spawn_options(user),\n"
            "                          cwd='/', output=out, should_stop=lambda: '')\n"
            "print(out.getvalue().decode())\n"
            "print('home', folders['HOME'], os.path.exists(folders['HOME']))\n"
        )
        result = python_as(NODE, code, env={"PATH": f"{switch}:{os.environ['PATH']}"})
        lines = result.stdout.splitlines()
        who = f"{render.pw_uid} {render.pw_gid}"
        assert who in lines, result.stdout + result.stderr
        assert int(lines[lines.index(who) + 1], 16) == 0  # no capability left in the render
        assert lines[lines.index(who) + 2].startswith("TMPDIR /tmp/celeryfarm-steps-")
        assert "PermissionError" in result.stdout  # nor can it run the node's setpriv
        assert lines[-1].startswith("home ") and lines[-1].endswith(" False")
