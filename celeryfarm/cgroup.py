"""Kernel-tracked groups for render steps: a cgroup its processes cannot leave.

A render's processes can leave its session (``setsid``), its process group and its
environment (``env -i``), but not its cgroup: everything forked inside one stays there, and
only its owner (root, or whoever the tree was delegated to) can move a process out. So each
step runs in a cgroup of its own, and killing it is: freeze the group (nothing in it runs or
forks), SIGKILL every process in it, thaw it (the kills land), wait until it is empty, remove
it.

cgroup v2 (one hierarchy at ``/sys/fs/cgroup``) is used where the node has it; otherwise
cgroup v1's ``freezer`` hierarchy, and its ``memory`` hierarchy for a memory cap. A step's
group is ``celeryfarm/<name>`` under the node's own cgroup in each hierarchy, named after the
step's token, so the node's main process (in the same cgroups) finds the group a dead pool
process left. Where no group can be made (no cgroup filesystem, a read-only one in a
container, no permission), :func:`create` raises :class:`Unavailable` and the caller falls
back to its own way of finding the render's processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

#: Where cgroup filesystems are mounted.
MOUNT = Path("/sys/fs/cgroup")
#: The folder, under the node's own cgroup, that holds its steps' groups.
FOLDER = "celeryfarm"
#: How long a freeze, or the group emptying after the kill, may take.
SETTLE_SECONDS = 5.0
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class Unavailable(Exception):
    """No cgroup can be made for a step on this node; the message says why."""


def create(name: str, memory_mb: int = 0) -> StepGroup:
    """Make the cgroup of step ``name`` (a safe file name), with a memory cap of
    ``memory_mb`` MiB where the memory controller allows (see :attr:`StepGroup.memory_capped`).
    Raises :class:`Unavailable` when no group can be made."""
    if not _NAME.fullmatch(name):
        raise Unavailable(f"{name!r} cannot name a cgroup")
    try:
        group = _V2Group(name) if _unified() else _V1Group(name)
        group.make(memory_mb)
    except OSError as error:
        raise Unavailable(f"cannot make a cgroup for the steps: {_why(error)}") from None
    return group


def find(name: str) -> StepGroup | None:
    """The existing group of step ``name`` (left by a process that died), or None."""
    if not _NAME.fullmatch(name):
        return None
    try:
        group = _V2Group(name) if _unified() else _V1Group(name)
    except (OSError, Unavailable):
        return None
    return group if group.folders and group.folders[0].is_dir() else None


def names() -> list[str]:
    """The names of the step groups under this process's cgroup (those of every node that
    shares it): a node finds there the groups whose step's process died."""
    try:
        home = _v2_home() if _unified() else _v1_home("freezer")
        return [entry.name for entry in (home / FOLDER).iterdir() if entry.is_dir()]
    except (OSError, Unavailable):
        return []


class StepGroup:
    """One step's cgroup, in one or more hierarchies; the first folder tracks its processes."""

    def __init__(self, name: str, homes: list[Path]) -> None:
        #: This process's own cgroups, one per hierarchy used.
        self.homes = homes
        self.folders = [home / FOLDER / name for home in homes]
        #: Whether a memory cap is in force, and why not when one was asked for.
        self.memory_capped = False
        self.memory_problem = ""

    def make(self, memory_mb: int) -> None:
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """Run the body with this process in the group, so the processes it starts are born
        there (and cannot fork before they are in it); then move back."""
        for folder in self.folders:
            _write(folder / "cgroup.procs", "0")
        try:
            yield
        finally:
            for home in self.homes:
                _write(home / "cgroup.procs", "0")

    def pids(self) -> list[int]:
        """The processes in the group (zombies are not: they have left it)."""
        try:
            text = (self.folders[0] / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        own = os.getpid()
        return [pid for pid in map(int, text.split()) if pid != own]

    def signal(self, sig: int) -> None:
        """Send ``sig`` once to every process in the group."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> list[int]:
        """Freeze the group, SIGKILL everything in it, thaw it, and wait until it is empty;
        return the pids that are still there (only a process stuck in the kernel)."""
        self._freeze(True)
        _settle(self._frozen)
        self.signal(signal.SIGKILL)
        self._freeze(False)
        _settle(lambda: not self.pids())
        return self.pids()

    def remove(self) -> None:
        """Remove the group's folders (a group that still holds a process stays)."""
        for folder in self.folders:
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the group for breaking its memory cap."""
        return False

    def _freeze(self, frozen: bool) -> None:
        raise NotImplementedError

    def _frozen(self) -> bool:
        raise NotImplementedError


class _V1Group(StepGroup):
    """cgroup v1: the ``freezer`` hierarchy tracks and freezes, ``memory`` caps."""

    def __init__(self, name: str) -> None:
        super().__init__(name, [_v1_home("freezer")])
        self._memory: Path | None = None

    def make(self, memory_mb: int) -> None:
        super().make(memory_mb)
        if not memory_mb:
            return
        try:
            memory = _v1_home("memory") / FOLDER / self.folders[0].name
            memory.mkdir(parents=True, exist_ok=True)
            _write(memory / "memory.limit_in_bytes", str(memory_mb * 1024 * 1024))
        except OSError as error:
            self.memory_problem = f"no memory cap on this node: {_why(error)}"
            return
        except Unavailable as error:
            self.memory_problem = f"no memory cap on this node: {error}"
            return
        self._memory = memory
        self.homes.append(_v1_home("memory"))
        self.folders.append(memory)
        self.memory_capped = True

    def out_of_memory(self) -> bool:
        return self._memory is not None and _count(self._memory / "memory.oom_control",
                                                   "oom_kill") > 0

    def _freeze(self, frozen: bool) -> None:
        _write(self.folders[0] / "freezer.state", "FROZEN" if frozen else "THAWED")

    def _frozen(self) -> bool:
        return (self.folders[0] / "freezer.state").read_text().strip() == "FROZEN"


class _V2Group(StepGroup):
    """cgroup v2: one folder; ``cgroup.kill`` (Linux 5.14+) kills it all at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name, [_v2_home()])

    def make(self, memory_mb: int) -> None:
        super().make(memory_mb)
        if not memory_mb:
            return
        folder = self.folders[0]
        try:
            if "memory" not in (folder.parent / "cgroup.subtree_control").read_text().split():
                _write(folder.parent / "cgroup.subtree_control", "+memory")
            _write(folder / "memory.max", str(memory_mb * 1024 * 1024))
        except OSError as error:
            self.memory_problem = (f"no memory cap on this node: the memory controller is "
                                   f"not delegated to {folder.parent} ({error.strerror})")
            return
        self.memory_capped = True

    def kill(self) -> list[int]:
        if (self.folders[0] / "cgroup.kill").exists():
            _write(self.folders[0] / "cgroup.kill", "1")
            _settle(lambda: not self.pids())
            return self.pids()
        return super().kill()

    def out_of_memory(self) -> bool:
        return self.memory_capped and _count(self.folders[0] / "memory.events", "oom_kill") > 0

    def _freeze(self, frozen: bool) -> None:
        _write(self.folders[0] / "cgroup.freeze", "1" if frozen else "0")

    def _frozen(self) -> bool:
        return _count(self.folders[0] / "cgroup.events", "frozen") == 1


@functools.cache
def _unified() -> bool:
    """Whether the node has the cgroup v2 hierarchy only (not v1's, nor a hybrid)."""
    return (MOUNT / "cgroup.controllers").exists()


def _own_path(controller: str) -> str:
    """This process's cgroup in the v1 hierarchy of ``controller``, or in v2's (""): read
    once per process (a step moves its process out and back, to the same place)."""
    return _own_path_of(os.getpid(), controller)


@functools.lru_cache(maxsize=16)
def _own_path_of(pid: int, controller: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    raise Unavailable(f"this process is in no {controller or 'v2'} cgroup")


def _v2_home() -> Path:
    return MOUNT / _own_path("").lstrip("/")


def _v1_home(controller: str) -> Path:
    mount = MOUNT / controller
    if not (mount / "cgroup.procs").exists():
        raise Unavailable(f"no cgroup v1 {controller} hierarchy at {mount}")
    return mount / _own_path(controller).lstrip("/")


def _why(error: OSError) -> str:
    """What went wrong, naming the folder of steps rather than one step's (so a node's log
    says it once, not once per step)."""
    where = Path(error.filename) if error.filename else MOUNT
    while where.name and where.name != FOLDER and FOLDER in where.parts:
        where = where.parent
    return f"{error.strerror or error}: {where}"


def _write(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _count(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup file of ``key value`` lines (0 if absent)."""
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _settle(done: Callable[[], bool], timeout: float = SETTLE_SECONDS) -> None:
    """Poll ``done`` until it is true or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.005)
