"""What a render gets from its node: the job's environment, a home of its own, and no secret.

A render runs code the farm did not write (a scene, its plug-ins, whatever a job's command
starts), so it gets only what it needs from the node that runs it:

* an environment built from the job's own plus an allowlist of the node's variables
  (:data:`ALLOWED`, and the names in ``CELERYFARM_RENDER_ENV``), never the operator's whole
  environment (``SSH_AUTH_SOCK``...) nor the node's ``CELERYFARM_*`` settings, which hold
  credentials (nor those settings from a job's environment);
* a fresh ``HOME`` and ``TMPDIR`` for each step, removed when it ends, so a job cannot leave
  a ``usercustomize.py`` or a shell profile behind for the next job to run;
* optionally another user (``CELERYFARM_RENDER_USER``) where the node can switch users, so
  the node's files (its credentials, ``celeryfarm up``'s data folder) are out of reach;
* a node process that is not dumpable (:func:`protect_node_process`), so a render running as
  the node's own user cannot read the node's ``/proc/<pid>/environ`` or memory either.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import sharing
from .config import PREFIX, SECRET_VARIABLES, ConfigError, Settings

#: The node's variables every render gets: the program search path, locale and time zone.
ALLOWED = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM")
ALLOWED_PREFIXES = ("LC_",)
#: Variables the farm sets for each step, and credentials: a job's environment cannot set them.
NOT_FROM_JOBS = ("HOME", "TMPDIR", "USER", "LOGNAME", *SECRET_VARIABLES)
_PR_SET_DUMPABLE = 4
#: How a node that is not root switches users: ``setpriv`` (util-linux) with CAP_SETUID and
#: CAP_SETGID, from the node's ambient capabilities or from file capabilities on a copy only
#: the node may run (the worker image's); it drops every capability before the render runs.
SWITCH_USER = "setpriv"
#: Variables glibc removes from the environment of a program with file capabilities (its
#: "secure execution" mode, unsecvars.h), such as that ``setpriv``: given back to the render.
SECURE_MODE_DROPS = (
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LD_AUDIT", "LD_DEBUG",
    "LD_DEBUG_OUTPUT", "LD_DYNAMIC_WEAK", "LD_HWCAP_MASK", "LD_LIBRARY_PATH", "LD_ORIGIN_PATH",
    "LD_PRELOAD", "LD_PROFILE", "LD_SHOW_AUXV", "LD_USE_LOAD_BIAS", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
)


def protect_node_process() -> bool:
    """Make this process non-dumpable: only root can then read its ``/proc/<pid>/environ``,
    ``cmdline``-adjacent files and memory, or attach to it. Kept across ``fork``, reset by
    ``exec``, so renders are dumpable as usual. Returns whether it worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def root_problem(settings: Settings) -> str:
    """Why this process may not be a render node ("" if it may): renders must not run as
    root by accident, so root needs ``--allow-root`` (``CELERYFARM_ALLOW_ROOT``)."""
    if os.geteuid() != 0 or settings.allow_root:
        return ""
    return (f"refusing to run a render node as root: run it as another user, or start it "
            f"with --allow-root ({PREFIX}ALLOW_ROOT=1) if you mean it (with "
            f"{PREFIX}RENDER_USER, renders still run as that user)")


def environment(
    job: Mapping[str, str], node: Mapping[str, str], also_allowed: tuple[str, ...] = (),
    farm: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A render's environment: the allowed variables of the ``node``'s, then the ``job``'s,
    then the ``farm``'s own for this step (home, temporary folder, job id). No node's
    ``CELERYFARM_*`` variable, and no credential setting from anywhere, gets in."""

    def allowed(name: str) -> bool:
        return not name.startswith(PREFIX) and (
            name in ALLOWED or name in also_allowed or name.startswith(ALLOWED_PREFIXES))

    env = {name: value for name, value in node.items() if allowed(name)}
    env.update((name, value) for name, value in job.items() if name not in NOT_FROM_JOBS)
    env.update(farm or {})
    return env


@dataclasses.dataclass(frozen=True)
class RenderUser:
    """The account renders run as, when it is not the node's."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> RenderUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"{PREFIX}RENDER_USER: no user {name!r} on this node") from None
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return cls(name, entry.pw_uid, entry.pw_gid, groups)

    def spawn_options(self) -> dict[str, Any]:
        """``subprocess.Popen`` options that start a process as this user, with its groups,
        when this node is root (the switch drops root's capabilities)."""
        if os.geteuid() != 0:
            return {}  # see command()
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def command(self, argv: list[str], env: Mapping[str, str] | None = None) -> list[str]:
        """``argv`` as this user runs it with ``env``, started with :meth:`spawn_options`:
        as is on a root node; through :data:`SWITCH_USER` on a node that is not root (and
        ``env`` to give back what glibc took from that capable program's environment)."""
        if os.geteuid() == 0:
            return argv
        groups = ",".join(map(str, self.groups))
        dropped = [f"{name}={env[name]}" for name in SECURE_MODE_DROPS if name in (env or {})]
        return [SWITCH_USER, f"--reuid={self.uid}", f"--regid={self.gid}",
                f"--groups={groups}", "--inh-caps=-all", "--ambient-caps=-all", "--",
                *(["env", *dropped] if dropped else []), *argv]


def spawn_options(user: RenderUser | None) -> dict[str, Any]:
    """``subprocess.Popen`` options of a render: its user, and a umask that leaves what it
    writes on the shared mount to the farm's group (:mod:`celeryfarm.sharing`)."""
    return {"umask": sharing.RENDER_UMASK, **(user.spawn_options() if user else {})}


@contextlib.contextmanager
def private_folders(user: RenderUser | None, step: str = "") -> Iterator[dict[str, str]]:
    """A fresh ``HOME`` and ``TMPDIR`` for one step on the node's local disk, owned by the
    render's user and private to it; removed, with whatever the step left, when it ends.
    Named after ``step`` (a fresh name by default), so :func:`remove_private_folders` can
    remove them for a process that died first."""
    base = _steps_folder() / (step or secrets.token_hex(16))
    if base.exists():  # an earlier execution of this step that died
        _remove(base, user)
    base.mkdir(mode=0o700)
    home, tmp = base / "home", base / "tmp"
    if user is None:
        home.mkdir(mode=0o700)
        tmp.mkdir(mode=0o700)
    elif os.geteuid() == 0:
        for folder in (home, tmp):
            folder.mkdir(mode=0o700)
            os.chown(folder, user.uid, user.gid)
    else:  # no CAP_CHOWN: the render's user makes them
        base.chmod(0o1733)
        subprocess.run(user.command(["mkdir", "-m", "700", str(home), str(tmp)]), check=True,
                       capture_output=True)
    if user is not None:
        base.chmod(0o711)  # the render may pass through, not list
    try:
        yield {"HOME": str(home), "TMPDIR": str(tmp)}
    finally:
        _remove(base, user)


def remove_private_folders(step: str, user: RenderUser | None) -> None:
    """Remove what :func:`private_folders` made for ``step``, if anything is left."""
    with contextlib.suppress(OSError):
        base = _steps_folder() / step
        if base.exists():
            _remove(base, user)


def _steps_folder() -> Path:
    """This node user's folder of steps' folders, in the temporary folder: one that only
    this user can list, and which others may pass through to their own home."""
    folder = Path(tempfile.gettempdir()) / f"celeryfarm-steps-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o711)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{folder} is not a folder of this user's")
    folder.chmod(0o711)
    return folder


def _remove(base: Path, user: RenderUser | None) -> None:
    """Remove a step's folders, also what the render made unwritable (``chmod 0``)."""
    with contextlib.suppress(OSError):  # most renders leave them empty: three calls
        for folder in (base / "home", base / "tmp", base):
            os.rmdir(folder)
        return
    if user is not None and os.geteuid() != 0:  # files the render owns: remove them as it
        base.chmod(0o1733)  # it may remove what it owns in base, nothing else
        folders = [str(base / "home"), str(base / "tmp")]
        subprocess.run(user.command(["chmod", "-R", "u+rwx", *folders]), capture_output=True)
        subprocess.run(user.command(["rm", "-rf", *folders]), capture_output=True)

    def writable_and_retry(function: Any, path: str, _error: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            os.chmod(path, stat.S_IRWXU)
            function(path)

    shutil.rmtree(base, onerror=writable_and_retry)


def render_user(name: str) -> RenderUser | None:
    """The render user named by ``CELERYFARM_RENDER_USER``, or None to run renders as the
    node's own user (also when it names the node's own user)."""
    if not name:
        return None
    user = RenderUser.lookup(name)
    return None if user.uid == os.geteuid() else user

