"""What a render node agrees to run: the job record's command, of a program it allows.

Anyone who can write to the broker can put a message in a queue, so a message is never
trusted for *what* to run: it names a step (its fencing token), and the node runs the
command the job's record holds for that step. The command the message carries is there for
Flower to show; a message whose command differs from the record's is dropped before it
touches the job (:func:`celeryfarm.tasks.checked_message`).

A node may also narrow which programs it runs (``CELERYFARM_ALLOWED_PROGRAMS``: globs over
the executable's absolute path). The program is found on the render's own ``PATH`` once,
checked, and run by that absolute path, so nothing can swap it between check and start.

And a node runs a job only where its files are: in the job's folder on the shared mount,
which every node must mount at one path (:func:`check_job_folder`).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import FarmError
from .jobs import JobRecord


class Refused(FarmError):
    """The node will not run a step; the message says why (also in the log and record)."""


def check_job_folder(record: JobRecord, shared_root: Path) -> None:
    """Refuse a job whose folder (``KATANA_TMPDIR``: the shared mount as the workstation was
    told the nodes mount it, ``CELERYFARM_REMOTE_SHARED_ROOT``) is not on this node, which
    mounts the shared folder at ``shared_root``: Katana's commands name the scene's files
    under that folder, and would fail later with a less clear message."""
    folder = record.spec.environment.get("KATANA_TMPDIR", "")
    if folder and not os.path.isdir(folder):
        raise Refused(f"the job's folder {folder} (KATANA_TMPDIR) is not on this node, which "
                      f"mounts the shared folder at {shared_root}: every node must mount it "
                      f"at the path the workstations' CELERYFARM_REMOTE_SHARED_ROOT names")


def command_to_run(
    record: JobRecord, step: int, allowed: Sequence[str] = (), search_path: str | None = None,
) -> list[str]:
    """The argv to run for ``step``: the record's command, with its program made absolute
    when ``allowed`` globs restrict programs. Raises :class:`Refused`."""
    commands = record.spec.commands
    if not 0 <= step < len(commands):
        raise Refused(f"the job's record has no step {step + 1} ({len(commands)} step(s))")
    command = list(commands[step])
    if not allowed:
        return command
    return [allowed_program(command[0], allowed, search_path), *command[1:]]


def allowed_program(program: str, allowed: Sequence[str], search_path: str | None) -> str:
    """The absolute path of ``program`` (as the render's ``PATH`` finds it) if it, or the
    file it links to, matches one of the ``allowed`` globs. Raises :class:`Refused`."""
    found = shutil.which(program, path=search_path)
    if found is None:
        raise Refused(f"program {program!r} not found (or not executable) on the render's PATH")
    found = os.path.abspath(found)
    candidates = {os.path.normpath(found), os.path.realpath(found)}
    if not any(fnmatch.fnmatchcase(path, glob) for path in candidates for glob in allowed):
        raise Refused(f"program {found} is not one this node may run "
                      f"(CELERYFARM_ALLOWED_PROGRAMS: {', '.join(allowed)})")
    return found
