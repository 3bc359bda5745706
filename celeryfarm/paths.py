"""The shared mount: per-render folders, file copies, and the paths nodes see.

The workstation and the render nodes may mount the shared root at different places, so
records keep paths *relative* to the root and each host joins them to its own view. Every
name that comes from a request goes through :meth:`SharedRoot.join`, which refuses anything
that would land outside the root.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from . import sharing
from .errors import FarmError

LOG_NAME = "render.log"
_CONTEXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class SharedRoot:
    """The shared mount as this host sees it (``local``) and as render nodes see it
    (``remote``)."""

    def __init__(self, local: Path, remote: Path | None = None) -> None:
        self.local = Path(local)
        self._local_text = str(self.local)  # local_path's prefix
        self.remote = PurePosixPath(remote or local)
        #: Context folders this process made or found writable, not probed again: Katana's
        #: submission asks for its folder twice (createTemporaryDirectory, copyRenderFiles),
        #: and on a network mount each probe is two round trips to the file server.
        self._writable: set[Path] = set()

    def join(self, relative: str) -> Path:
        """This host's path for ``relative``; raises :class:`FarmError` if it escapes,
        symlinks and all. (``os.path`` rather than pathlib: every submission and step
        joins a path or two.)"""
        if not relative or PurePosixPath(relative).is_absolute():
            raise FarmError(f"path {relative!r} must be relative to the shared root")
        root = os.path.realpath(self.local)
        path = os.path.realpath(os.path.join(root, relative))
        if path != root and not path.startswith(root.rstrip("/") + "/"):
            raise FarmError(f"path {relative!r} escapes the shared root {root}")
        return Path(path)

    def local_path(self, relative: str) -> str:
        """The path artists are shown for a path the records keep relative to the root
        (a render log): under the root as this host was told it, symlinks and all, so the
        same file has one name in every listing and lookup. Raises :class:`FarmError` if
        its text escapes the root (:meth:`join` also follows symlinks).

        The usual ``context/render.log`` skips pathlib's parsing and the check's
        ``resolve``, which took most of the time of turning 10,000 records into jobs.
        """
        text = self._local_text
        if text not in ("/", ".") and _is_plain(relative):
            return f"{text}/{relative}"
        self.join(relative)
        return str(self.local / relative)

    def to_remote(self, relative: str) -> str:
        """The render nodes' path for ``relative``."""
        return str(self.remote / relative)

    def context_dir(self, context: str) -> str:
        """The relative folder of a render context, after checking the name is safe."""
        if not isinstance(context, str) or not _CONTEXT_NAME.fullmatch(context) or ".." in context:
            raise FarmError(
                f"invalid render context name {context!r}: use letters, digits, '_', '.', '-'"
            )
        return context

    def is_context_folder(self, folder: str, context: str) -> bool:
        """Whether ``folder`` names the context's folder: as the nodes see it (the path handed
        out for it, however spelled), or as a path on this host that resolves to it (through
        a symlinked shared root, say)."""
        expected = posixpath.normpath(self.to_remote(self.context_dir(context)))
        if not isinstance(folder, str) or not posixpath.isabs(folder):
            return False
        if posixpath.normpath(folder) == expected:
            return True
        try:
            return Path(folder).resolve(strict=True) == self.join(context)
        except OSError:
            return False

    def log_path(self, context: str) -> str:
        """The relative path of a render context's render log."""
        return f"{self.context_dir(context)}/{LOG_NAME}"

    def make_context_dir(self, context: str) -> Path:
        """Create the render context's folder (idempotent) and check nodes can write there;
        the farm's group may write in it, whatever this process's umask. Returns its
        :meth:`local_path`."""
        path = self.join(self.context_dir(context))
        try:
            # A folder this process has just made is writable to it; only one that was
            # there already (another user's, say) needs the probe.
            existed = path.is_dir()
            sharing.make_folder(path)
            if existed and path not in self._writable:
                _check_writable(path)
            self._writable.add(path)
        except OSError as error:
            raise FarmError(
                f"cannot create the render folder {path} on the shared mount: {error.strerror}"
            ) from None
        return Path(self.local_path(context))

    def copy_files(self, filenames: Iterable[str], context: str) -> dict[str, str]:
        """Copy local files into the context folder; return {local path: node path}.

        Each copy lands under a temporary name and is renamed into place, so a node never
        reads a half-written file.
        """
        folder = self.context_dir(context)
        target_dir = self.make_context_dir(context)
        copied: dict[str, str] = {}
        used: set[str] = set()
        for filename in filenames:
            source = Path(filename)
            if not source.is_file():
                raise FarmError(f"cannot copy {filename!r} to the farm: no such file")
            name = _unique_name(source.name, used)
            used.add(name)
            destination = target_dir / name
            try:
                fd, partial = tempfile.mkstemp(dir=target_dir, prefix=f".{name}.")
                os.close(fd)
                shutil.copyfile(source, partial)
                sharing.share(Path(partial))  # mkstemp made it 0600: nodes must read it
                os.replace(partial, destination)
            except OSError as error:
                raise FarmError(
                    f"cannot copy {filename!r} to {destination}: {error.strerror}"
                ) from None
            copied[str(filename)] = self.to_remote(f"{folder}/{name}")
        return copied


def _unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name`` with a counter before its suffix if another file took it."""
    candidate, stem, suffix, count = name, Path(name).stem, Path(name).suffix, 1
    while candidate in used:
        candidate = f"{stem}-{count}{suffix}"
        count += 1
    return candidate


def _check_writable(folder: Path) -> None:
    """Raise ``OSError`` unless a file can be created in ``folder`` (``os.access`` lies on
    network mounts and for root, so try it)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".writable.")
    os.close(fd)
    os.unlink(probe)


def _is_plain(relative: str) -> bool:
    """Whether a relative path is a plain one: not absolute, with no empty, "." or ".."
    part (string tests: a listing asks 10,000 times, and a regular expression takes twice
    as long)."""
    padded = f"/{relative}/"
    return (len(padded) > 2 and "//" not in padded and "/./" not in padded
            and "/../" not in padded)
