"""System users and a farm group for tests that cross user boundaries.

CI runs the tests as root on a fresh machine, so the tests make the users they need
themselves: idempotently, and safely when two test runs make them at once.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import site
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import celeryfarm

#: The group artists and render nodes share (the README's studio set-up).
FARM_GROUP = "cf-test-farm"
#: An artist submitting from a workstation, a render node's account, a render account.
ARTIST, NODE, RENDER = "cf-test-artist", "cf-test-node", "cf-test-render"
#: An account in no farm group.
OUTSIDER = "cf-test-outsider"


def ensure_group(name: str) -> int:
    """The gid of group ``name``, made if missing."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], capture_output=True)
        return grp.getgrnam(name).gr_gid  # made by us or by a concurrent run


def ensure_user(name: str, groups: Sequence[str] = ()) -> pwd.struct_passwd:
    """System user ``name`` (no home, no login shell) in ``groups``, made if missing."""
    for group in groups:
        ensure_group(group)
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--user-group", name],
                       capture_output=True)
        user = pwd.getpwnam(name)
    for group in groups:
        if name not in grp.getgrnam(group).gr_mem:
            subprocess.run(["usermod", "-a", "-G", group, name], check=True)
    return user


def as_user(name: str, umask: int = 0o022) -> dict:
    """``subprocess`` keyword arguments that run a child as ``name`` with its groups."""
    user = pwd.getpwnam(name)
    groups = [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": groups,
            "umask": umask, "cwd": "/"}


def _open_to_all(path: Path) -> bool:
    """Whether every user may execute ``path`` (and search each folder above it)."""
    path = path.resolve()
    return all(folder.stat().st_mode & 0o001 for folder in [path, *path.parents])


def python_for_others() -> tuple[str, dict[str, str]]:
    """An interpreter other users can run with this one's packages, and its environment.

    This interpreter, where it is open to all (a fresh Debian machine's, as in CI); where it
    sits in a private folder (pyenv under /root), the system's python3 of the same version,
    pointed at this virtualenv's packages and this checkout.
    """
    if _open_to_all(Path(sys.executable)):
        return sys.executable, {}
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    assert version == str(sys.version_info[:2]), (
        f"{sys.executable} is not open to other users, and {system} is Python {version}")
    checkout = Path(celeryfarm.__file__).resolve().parent.parent
    return system, {"PYTHONPATH": os.pathsep.join([str(checkout), *site.getsitepackages()])}


def python_as(name: str, code: str, env: Mapping[str, str] | None = None, umask: int = 0o022,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in Python as user ``name``; output captured as text."""
    python, python_env = python_for_others()
    return subprocess.run(
        [python, "-c", code],
        env={**os.environ, "HOME": "/nonexistent", **python_env, **(env or {})},
        capture_output=True, text=True, timeout=timeout, **as_user(name, umask),
    )


@contextlib.contextmanager
def capable_setpriv(node: str) -> Iterator[Path]:
    """A folder holding a copy of ``setpriv`` with CAP_SETUID and CAP_SETGID as file
    capabilities, which only ``node``'s group may run: the worker image's way of letting a
    node that is not root run renders as another user."""
    node_gid = pwd.getpwnam(node).pw_gid
    switch = Path(tempfile.mkdtemp(prefix="celeryfarm-switch-"))
    switch.chmod(0o755)
    try:
        setpriv = switch / "setpriv"
        shutil.copy(shutil.which("setpriv"), setpriv)
        os.chown(setpriv, 0, node_gid)
        setpriv.chmod(0o750)
        os.setxattr(setpriv, "security.capability",  # cap_setuid,cap_setgid=ep
                    struct.pack("<5I", 0x02000001, 1 << 6 | 1 << 7, 0, 0, 0))
        yield switch
    finally:
        shutil.rmtree(switch, ignore_errors=True)
