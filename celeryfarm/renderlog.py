"""The render log: one file per job on the shared mount, which Katana follows as it grows.

Steps append their output as raw bytes (renderers print whatever encoding they like), framed
by celeryfarm lines that say what ran, where, and how it ended. Every write goes straight to
the file, so the artist sees a line soon after the renderer prints it.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import BinaryIO, Callable

from . import sharing

_CHUNK = 64 * 1024


def stamp() -> str:
    """A UTC timestamp for log lines."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


class RenderLog:
    """An open render log, appended to without buffering."""

    def __init__(self, path: Path) -> None:
        # Created group-writable: the submitter starts it, nodes (other users) append. The
        # folder is made only when missing: on a network mount each call is a round trip.
        try:
            fd = sharing.open_append(path)
        except FileNotFoundError:
            sharing.make_folder(path.parent)
            fd = sharing.open_append(path)
        self._file = open(fd, "ab", buffering=0)  # noqa: SIM115
        self._line_open = False

    def write(self, data: bytes) -> None:
        """Append command output as it came."""
        if data:
            self._file.write(data)
            self._line_open = not data.endswith(b"\n")

    def mark(self, text: str) -> None:
        """Append a celeryfarm line, on a line of its own."""
        prefix = b"\n" if self._line_open else b""
        self.write(prefix + f"==== celeryfarm | {text} ====\n".encode())

    def step_started(self, index: int, steps: int, argv: list[str], node: str, attempt: int,
                     tries: str = ""):
        which = f" | {tries}" if tries else ""
        self.mark(f"step {index + 1}/{steps} | attempt {attempt}{which} | node {node} | "
                  f"{stamp()}")
        self.write(f"$ {shlex.join(argv)}\n".encode())

    def step_ended(self, index: int, steps: int, outcome: str, seconds: float) -> None:
        self.mark(f"step {index + 1}/{steps} | {outcome} | after {seconds:.1f} s")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RenderLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def append(path: Path, text: str) -> None:
    """Append one celeryfarm line (submission, restart, stop) to the log at ``path``."""
    with RenderLog(path) as log:
        log.mark(f"{text} | {stamp()}")


def follow(
    path: Path,
    out: BinaryIO,
    finished: Callable[[], bool],
    poll_seconds: float = 0.2,
) -> None:
    """Copy the log at ``path`` to ``out`` as it grows, until ``finished()`` says the job is
    over (then whatever the last step wrote is copied too), like ``tail -f`` that knows when
    to stop. ``finished`` is asked only while nothing new has come."""
    while not path.exists():
        if finished():
            return
        time.sleep(poll_seconds)
    with open(path, "rb") as log:
        while True:
            data = log.read(_CHUNK)
            if data:
                out.write(data)
                out.flush()
                continue
            if finished():
                out.write(log.read())  # written between the last read and the check
                out.flush()
                return
            time.sleep(poll_seconds)
