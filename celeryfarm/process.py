"""Running one render command: its own session, output streamed as it comes, and a tree kill.

A render is a tree of processes (renderboot, the renderer, its helpers), and Celery's revoke
signals only the pool process. So every command starts in a new session and in a cgroup of
its own (:mod:`celeryfarm.cgroup`), and whenever the step ends (success, failure, stop, or
the pool process exiting) every process of the group is sent SIGTERM, then after a grace
period the group is frozen and SIGKILLed, and waited for until it is empty.

Where no cgroup can be made, the node's log says so and the tree is found the older way:
every process the command starts carries a marker in its environment, and the pool process
makes itself a child subreaper, so descendants that detach from the render (double forks,
``setsid``) are reparented to it and still found, unless they also clear their environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import select
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, Callable

import psutil

from . import cgroup

logger = logging.getLogger(__name__)
#: Environment variable set in every render process to find the whole tree.
MARKER = "CELERYFARM_STEP_TOKEN"
#: How long the command's leftover children may hold its output open after it exited.
LEFTOVER_SECONDS = 1.0
_PR_SET_CHILD_SUBREAPER = 36
_READ_SIZE = 64 * 1024


@dataclasses.dataclass
class Outcome:
    """How a command ended."""

    exit_code: int | None = None  # None: it never started, or was killed by a signal
    signal: int | None = None
    stop_reason: str = ""  # set when the farm stopped it
    start_error: str = ""  # set when it could not be started
    limit: str = ""  # set when it broke the run-time or stall limit
    survivors: list[int] = dataclasses.field(default_factory=list)  # pids that outlived SIGKILL

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.stop_reason and not self.limit

    def describe(self) -> str:
        if self.start_error:
            return f"could not start: {self.start_error}"
        if self.stop_reason:
            return f"stopped: {self.stop_reason}"
        if self.limit:
            return f"killed: {self.limit}"
        if self.signal is not None:
            return f"killed by signal {signal.Signals(self.signal).name}"
        return f"exit status {self.exit_code}"


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to this process (Linux); return whether it did."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def run(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    output: BinaryIO,
    should_stop: Callable[[], str],
    poll_seconds: float = 0.25,
    grace_seconds: float = 5.0,
    max_seconds: float = 0,
    stall_seconds: float = 0,
    token: str = "",
    memory_mb: int = 0,
    spawn_options: Mapping[str, Any] | None = None,
) -> Outcome:
    """Run ``argv`` with stdout and stderr streamed into ``output`` as bytes arrive.

    ``should_stop`` is called every ``poll_seconds`` and returns a reason to stop, or "".
    ``max_seconds`` and ``stall_seconds`` (no output for that long), when set, kill the
    command and set ``Outcome.limit``; so does going over ``memory_mb`` MiB of memory, where
    the node can cap it. The command's cgroup is named ``token`` (a fresh one by default), and
    every process of the command carries it in its environment, so :func:`kill_step` can find
    them from another process. Whatever happens, including an exception raised into this
    frame, the command's whole process tree has been killed when this returns; the pids of
    any that outlived SIGKILL (stuck in the kernel) are in ``Outcome.survivors``.
    ``spawn_options`` go to ``subprocess.Popen`` (the user and groups of a render user).
    """
    become_subreaper()
    token = token or uuid.uuid4().hex
    limits = _Limits(max_seconds, stall_seconds)
    group = _step_group(token, memory_mb)
    try:
        with group.joined() if group else contextlib.nullcontext():
            proc = subprocess.Popen(
                argv,
                env={**env, MARKER: token},
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **(spawn_options or {}),
            )
    except OSError as error:
        if group:
            group.remove()
        return Outcome(start_error=_start_error(argv[0], error))
    outcome = Outcome()
    try:
        reason = _pump(proc, output, lambda: limits.check() or should_stop(), poll_seconds,
                       limits)
        # The limit that ended it, as it was seen then: asking again could find another one
        # broken by now and take the limit for a stop.
        if limits.broken:
            outcome.limit = limits.broken
        else:
            outcome.stop_reason = reason
    finally:
        outcome.survivors = kill_tree(proc, token, grace_seconds, group)
        proc.stdout.close()
        if group:
            if group.out_of_memory():
                outcome.limit = f"went over its memory cap of {memory_mb} MB"
            group.remove()
    if proc.returncode is not None and proc.returncode < 0:
        outcome.signal = -proc.returncode
    else:
        outcome.exit_code = proc.returncode
    return outcome


def _step_group(token: str, memory_mb: int) -> cgroup.StepGroup | None:
    """The step's cgroup, or None (and a warning in the node's log) where none can be made."""
    try:
        group = cgroup.create(token, memory_mb)
    except cgroup.Unavailable as error:
        _warn_once(f"{error}; stopped renders are found by their session and an environment "
                   "marker instead, which a process that leaves both (env -i, setsid) escapes")
        return None
    if group.memory_problem:
        _warn_once(group.memory_problem)
    return group


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


class _Limits:
    """Run-time and stall limits of one command (0: none)."""

    clock = staticmethod(time.monotonic)

    def __init__(self, max_seconds: float, stall_seconds: float) -> None:
        self.max_seconds, self.stall_seconds = max_seconds, stall_seconds
        self.started = self.last_output = self.clock()
        self.broken = ""  # the first limit found broken

    def check(self) -> str:
        """The limit the command has broken, or ""; once one is, always that one."""
        if not self.broken:
            now = self.clock()
            if self.max_seconds and now - self.started > self.max_seconds:
                self.broken = f"ran longer than its limit of {self.max_seconds:g} s"
            elif self.stall_seconds and now - self.last_output > self.stall_seconds:
                self.broken = f"stalled: no output for {self.stall_seconds:g} s"
        return self.broken


def _pump(
    proc: subprocess.Popen,
    output: BinaryIO,
    should_stop: Callable[[], str],
    poll_seconds: float,
    limits: _Limits,
) -> str:
    """Copy output until the command has exited and its output is closed; return a stop
    reason if ``should_stop`` gave one first. ``should_stop`` is asked every
    ``poll_seconds``, and at once after a signal with a Python handler (in a pool process,
    the SIGTERM of a revoke, which the step turns into a stop request)."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    next_check = time.monotonic() + poll_seconds
    exited_at: float | None = None
    open_output = True
    try:
        with _signal_wakeup() as wake_fd:
            if wake_fd is not None:
                selector.register(wake_fd, selectors.EVENT_READ)
            while True:
                signalled = False
                if open_output:
                    for key, _ in selector.select(timeout=poll_seconds):
                        if key.fd == wake_fd:
                            signalled = _drain(wake_fd)
                            continue
                        data = os.read(proc.stdout.fileno(), _READ_SIZE)
                        if data:
                            output.write(data)
                            limits.last_output = limits.clock()
                        else:
                            open_output = False
                            selector.unregister(proc.stdout)
                else:
                    signalled = _wait_exit(proc, poll_seconds, wake_fd)
                now = time.monotonic()
                if proc.poll() is not None:
                    exited_at = exited_at or now
                    # Done, or only leftover children hold the output open: they get killed.
                    if not open_output or now - exited_at > LEFTOVER_SECONDS:
                        return ""
                if signalled or now >= next_check:
                    next_check = now + poll_seconds
                    reason = should_stop()
                    if reason:
                        return reason
    finally:
        selector.close()


@contextlib.contextmanager
def _signal_wakeup() -> Iterator[int | None]:
    """A file descriptor that becomes readable when a signal with a Python handler arrives
    (``signal.set_wakeup_fd``), or None where that cannot be had: outside the main thread,
    or when something else (an asyncio loop) already uses the wakeup fd."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous != -1:
        if previous is not None:
            signal.set_wakeup_fd(previous)  # someone else's: leave it alone
        os.close(read_fd)
        os.close(write_fd)
        yield None
        return
    try:
        yield read_fd
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read_fd)
        os.close(write_fd)


def _drain(fd: int) -> bool:
    """Empty a non-blocking pipe; return True."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass
    return True


def _wait_exit(proc: subprocess.Popen, timeout: float, wake_fd: int | None = None) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit, without reaping it, or until ``wake_fd``
    is readable; return whether ``wake_fd`` woke it (and drain it).

    A pidfd (Linux 5.3+) wakes us when it exits; ``Popen.wait(timeout)`` instead sleeps in
    doubling steps from 0.5 ms and notices the exit up to a step late, which every step
    of every job paid once its output was closed.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Python < 3.9, kernel < 5.3, or not ours any more
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(timeout * 1000)]
    finally:
        os.close(pidfd)
    return wake_fd in ready and _drain(wake_fd)


def _start_error(program: str, error: OSError) -> str:
    if isinstance(error, FileNotFoundError) and error.filename in (None, program):
        return f"executable not found: {program}"
    return f"{error.strerror or error}: {error.filename or program}"


def _tree(root_pid: int, token: str) -> list[psutil.Process]:
    """The render's processes other than its root: the root's descendants, and this
    process's descendants (orphans reparented here) that carry the render's marker."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        found.update((p.pid, p) for p in psutil.Process(root_pid).children(recursive=True))
    for proc in psutil.Process().children(recursive=True):
        if proc.pid not in found and proc.pid != root_pid and _carries(proc, token):
            found[proc.pid] = proc
    return [proc for proc in found.values() if _alive(proc)]


def kill_step(token: str, grace_seconds: float) -> list[int]:
    """Kill what is left of the step ``token`` when the process that ran it is gone: its
    cgroup, and the processes carrying its marker; returns pids that outlived SIGKILL."""
    group = cgroup.find(token)
    survivors = _end_group(group, grace_seconds) if group else []
    if group:
        group.remove()
    return survivors + kill_marked(token, grace_seconds)


def kill_marked(token: str, grace_seconds: float) -> list[int]:
    """Kill every process carrying ``token``, wherever it is in the process table (used when
    the process that ran the command is gone); returns pids that outlived SIGKILL."""
    procs = [proc for proc in psutil.process_iter() if _carries(proc, token)]
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        for proc in procs:
            with contextlib.suppress(*_GONE):
                proc.send_signal(sig)
        procs = _wait(None, procs, wait)
        if not procs:
            break
    return [proc.pid for proc in procs]


def _has_children() -> bool:
    """Whether this process has any child, without reaping one (cheap: no /proc scan)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _reap_orphan_zombies(born_after: float) -> None:
    """Reap zombie children born since the render started: orphans of its tree that were
    reparented to this subreaper and exited. (A zombie's environment cannot be read, so
    birth time is what ties it to the render.)"""
    if not _has_children():
        return
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE and child.create_time() >= born_after:
                os.waitpid(child.pid, os.WNOHANG)


def _carries(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(MARKER) == token
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs; a zombie child of ours is reaped on the way."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return True
        os.waitpid(proc.pid, os.WNOHANG)
    except (psutil.NoSuchProcess, ChildProcessError):
        pass
    return False


_GONE = (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied)


def _signal_all(root: subprocess.Popen, others: list[psutil.Process], sig: int) -> None:
    """Send ``sig`` once to every process of the render: to its process group, then to each
    process outside it. A second SIGTERM can deadlock a handler still busy with the first
    (seen: a Python helper's handler re-entered while it waited for its own children)."""
    with contextlib.suppress(*_GONE):
        os.killpg(root.pid, sig)  # the session that start_new_session made
    if not _in_group(root.pid, root.pid):
        with contextlib.suppress(*_GONE):
            root.send_signal(sig)  # a no-op once Popen has reaped it
    for proc in others:
        if not _in_group(proc.pid, root.pid):
            with contextlib.suppress(*_GONE):
                proc.send_signal(sig)


def _in_group(pid: int, group: int) -> bool:
    """Whether ``pid`` is in process group ``group`` (so ``killpg`` reached it)."""
    try:
        return os.getpgid(pid) == group
    except OSError:
        return False


def _wait(
    root: subprocess.Popen | None, others: list[psutil.Process], timeout: float
) -> list[psutil.Process]:
    """Wait up to ``timeout`` for the root (through Popen, which keeps its exit status) and
    the others to be gone; return the others still alive.

    Polls with :func:`_alive`, which reaps as it goes the helpers that were orphaned while
    we waited and so became our zombies (their pids stay until we reap them).
    """
    deadline = time.monotonic() + timeout
    while True:
        others = [proc for proc in others if _alive(proc)]
        if not others and (root is None or root.poll() is not None):
            return []
        if time.monotonic() >= deadline:
            return others
        time.sleep(0.01)


def kill_tree(
    root: subprocess.Popen, token: str, grace_seconds: float,
    group: cgroup.StepGroup | None = None,
) -> list[int]:
    """SIGTERM every process of the render (its cgroup's, or else its session and tree),
    SIGKILL what is left after the grace period, and wait until all are gone. Returns the
    pids that outlived SIGKILL: normally none, only a process stuck in the kernel."""
    if root.poll() is not None and not _has_children():
        return []  # as a subreaper, we would have inherited anything left of the tree
    try:
        born = psutil.Process(root.pid).create_time()
    except psutil.NoSuchProcess:
        born = 0.0
    if group:
        survivors = _end_group(group, grace_seconds, root)
    else:
        survivors = _kill(root, token, grace_seconds)
    _reap_orphan_zombies(born)
    return survivors


def _end_group(
    group: cgroup.StepGroup, grace_seconds: float, root: subprocess.Popen | None = None
) -> list[int]:
    """SIGTERM every process in ``group`` once; after the grace period, freeze and SIGKILL
    what is left. Returns the pids still in the group."""

    def gone() -> bool:
        return not group.pids() and (root is None or root.poll() is not None)

    if not gone():
        group.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not gone():
            group.kill()
    if root is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            root.wait(cgroup.SETTLE_SECONDS)  # out of the group: a zombie, or stuck
    return group.pids()


def _kill(root: subprocess.Popen, token: str, grace_seconds: float) -> list[int]:
    others = _tree(root.pid, token)
    if root.poll() is not None and not others:
        return []
    _signal_all(root, others, signal.SIGTERM)
    _wait(root, others, grace_seconds)
    others = _tree(root.pid, token)  # includes processes forked while we waited
    if root.poll() is None or others:
        _signal_all(root, others, signal.SIGKILL)
        _wait(root, others, 5.0)
        others = _tree(root.pid, token)
    return [proc.pid for proc in others] + ([root.pid] if root.poll() is None else [])
