"""Helpers for the command-line tests: run ``celeryfarm`` commands and ``celeryfarm up`` as
real processes in a temporary data folder, and wait on what they print or on the farm's
state, always with a bounded timeout (``wait_until`` and ``renderboot`` are the core tests'
helpers)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from .helpers import renderboot, wait_until

SCRIPT = Path(sys.executable).with_name("celeryfarm")
#: The command under test: the installed console script, else the module.
CELERYFARM = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "celeryfarm"]
RENDERBOOT = renderboot()


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any CELERYFARM_* variable, plus ``extra``; as root (CI), it
    lets render nodes run as root (``--allow-root``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERYFARM_")}
    if os.geteuid() == 0:
        env["CELERYFARM_ALLOW_ROOT"] = "1"
    env.update(extra)
    return env


def up_env(base: Path, **extra: str) -> dict[str, str]:
    """The environment of a farm whose data folder and shared root are under ``base``."""
    return base_env(CELERYFARM_DATA_DIR=str(base / "data"),
                    CELERYFARM_SHARED_ROOT=str(base / "shared"), **extra)


def cli(env: Mapping[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run one ``celeryfarm`` command to its end."""
    return subprocess.run([*CELERYFARM, *args], env=dict(env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(env: Mapping[str, str], *args: str, timeout: float = 60) -> str:
    """Run a command that must succeed; return its stdout."""
    result = cli(env, *args, timeout=timeout)
    assert result.returncode == 0, f"celeryfarm {' '.join(args)}: {result.stderr}"
    return result.stdout


def job_status(env: Mapping[str, str], job_id: str) -> dict:
    return json.loads(ok(env, "status", "--json", job_id))


def wait_for_state(env: Mapping[str, str], job_id: str, states: tuple[str, ...],
                   timeout: float = 60) -> dict:
    def reached() -> dict | None:
        status = job_status(env, job_id)
        return status if status["state"] in states else None

    return wait_until(reached, timeout, f"job {job_id} to be {' or '.join(states)}")


def processes_tagged(tag: str) -> list[psutil.Process]:
    """Running processes whose command line holds ``tag`` (renderboot's ``--tag``)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and tag in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (the same process: pid and start time match)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


class Output:
    """Lines a child prints, collected by a thread, each with the time it arrived."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._changed.notify_all()

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for _, line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():  # or the child is done
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; "
                                         f"output so far:\n{self.text}")
                self._changed.wait(min(remaining, 0.5))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Up:
    """A ``celeryfarm up`` process in the foreground of a test."""

    def __init__(self, env: Mapping[str, str], *args: str) -> None:
        self.env = dict(env)
        self.process = subprocess.Popen(
            [*CELERYFARM, "up", *args], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )
        self.output = Output(self.process.stdout)

    def wait_ready(self, timeout: float = 90) -> Up:
        try:
            self.output.wait_for(r"Press Ctrl-C", timeout)
        except AssertionError:
            self.stop()
            raise
        return self

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Signal ``up`` and wait for it to exit; SIGKILL (and fail) if it does not."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            for proc in [*self.descendants(), psutil.Process(self.process.pid)]:
                proc.kill()
            self.process.wait()
            raise AssertionError(f"celeryfarm up did not stop within {timeout} s") from None
        self.output.join(5)
        return code
