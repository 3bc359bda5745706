"""``celeryfarm doctor``: what is wrong with this node's set-up, in one line each.

A node that cannot write the shared mount, find Katana or reach Redis fails every step it
takes, each time with a reason in a job's record; these checks say it once, before a job
does, and say what to change.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .config import PREFIX, ConfigError, Settings, redact
from .errors import FarmError
from .renderenv import SWITCH_USER, RenderUser, root_problem


def checks(settings: Settings) -> Iterator[tuple[str, str, bool]]:
    """(what, finding, ok) for each part of this node's set-up."""
    for what, check in (("shared mount", _shared_mount), ("Katana root", _katana_root),
                        ("Redis", _redis), ("node user", _node_user)):
        try:
            yield what, check(settings), True
        except (FarmError, ConfigError) as problem:
            yield what, str(problem), False


def _shared_mount(settings: Settings) -> str:
    root = settings.shared_root
    if not root.is_dir():
        raise FarmError(f"{root} does not exist (set {PREFIX}SHARED_ROOT to where this "
                        f"host mounts the shared folder)")
    try:
        fd, probe = tempfile.mkstemp(dir=root, prefix=".doctor.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise FarmError(f"{root}: {_user()} cannot create files in it ({error.strerror})") \
            from None
    info = root.stat()
    mode, group = stat.S_IMODE(info.st_mode), _group_name(info.st_gid)
    if mode & 0o2070 != 0o2070:
        raise FarmError(f"{root} is {mode:04o}: make it 2775 (chmod 2775) and give it the "
                        f"farm's group, so artists and nodes can write what the others make")
    if info.st_gid not in os.getgroups() and info.st_gid != os.getegid():
        raise FarmError(f"{root} belongs to group {group}, which {_user()} is not in")
    return f"{root} (group {group}, {mode:04o}, writable)"


def _katana_root(settings: Settings) -> str:
    root = Path(settings.katana_root)
    if not root.is_dir():
        raise FarmError(f"{root} does not exist (set {PREFIX}KATANA_ROOT to where Katana is "
                        f"installed on this node)")
    renderboot = Path(settings.renderboot or root / "bin" / "renderboot")
    if not os.access(renderboot, os.X_OK):
        raise FarmError(f"{root}: no executable renderboot at {renderboot}")
    return f"{root} (renderboot {renderboot})"


def _redis(settings: Settings) -> str:
    from .localfarm import check_redis  # imports redis: only when checking

    urls = dict.fromkeys([settings.broker_url, settings.records_url, settings.results_url])
    for url in urls:
        check_redis(url, settings.tls, settings.sentinel_master,
                    settings.sentinel_password)
    return f"{redact(settings.broker_url)} answers"


def _node_user(settings: Settings) -> str:
    problem = root_problem(settings)
    if problem:
        raise FarmError(problem)
    if not settings.render_user:
        return f"{_user()}; renders run as {_user()}"
    user = RenderUser.lookup(settings.render_user)
    _switch_user(user)
    shared = settings.shared_root
    with contextlib.suppress(OSError):
        info = shared.stat()
        gid = info.st_gid
        if info.st_uid != user.uid and gid not in user.groups:
            raise FarmError(f"renders run as {user.name}, who is not in group "
                            f"{_group_name(gid)} of {shared}: they cannot write frames there")
    return f"{_user()}; renders run as {user.name}"


def _switch_user(user: RenderUser) -> None:
    """Start a program as ``user`` the way a step starts a render (as root, or through the
    capable ``setpriv`` on this node's ``PATH``, as in the worker image): what the node's
    own capabilities would not tell."""
    try:
        done = subprocess.run(user.command(["id", "-u"]), capture_output=True, text=True,
                              timeout=30, **user.spawn_options())
        problem = "" if done.stdout.strip() == str(user.uid) else (
            done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError) as error:
        problem = str(error)
    if problem:
        raise FarmError(f"{_user()} cannot run renders as {user.name} ({problem}): it needs "
                        f"root, or CAP_SETUID and CAP_SETGID (its own, or on the "
                        f"{SWITCH_USER} its PATH finds, as in the worker image)")


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
