"""Modes on the shared mount: the farm's group reads and writes everything, whatever umask.

The artist's workstation creates a render's folder and copies the scene into it; render
nodes, as other users, write the render log there and the renders write frames. They share
one group (the studio set-up: the shared root belongs to the farm's group and is ``2775``,
so what is made in it inherits that group), and every folder and file the farm makes gets an
explicit mode: the submitter's umask (often ``022``) must not decide whether a node can
write the log. Renders run with umask :data:`RENDER_UMASK`, so their frames are shared too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: Render folders: the group may write, and what is made inside inherits the group.
FOLDER_MODE = 0o2775
#: Logs and copies: the group may read and write.
FILE_MODE = 0o664
#: What renders create (frames, caches) is group-writable.
RENDER_UMASK = 0o002


def make_folder(path: Path) -> Path:
    """Create ``path`` (and missing parents) and give it :data:`FOLDER_MODE` if it is ours."""
    path.mkdir(parents=True, exist_ok=True)
    share(path, FOLDER_MODE)
    return path


def share(path: Path, mode: int = FILE_MODE) -> None:
    """Give ``path`` ``mode`` when this user owns it (another user's is theirs to set)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if path.stat().st_uid == os.geteuid():
            path.chmod(mode)


def open_append(path: Path) -> int:
    """Open ``path`` to append, creating it with :data:`FILE_MODE` whatever the umask;
    returns the file descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, FILE_MODE)
    return fd
