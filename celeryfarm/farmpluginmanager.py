"""A stand-in for Katana's ``FarmAPI.FarmPluginManager`` module, for use outside Katana.

In Katana 5 this is a module of the ``FarmAPI`` package (``types-katana`` 5.0.5.0:
``PyUtilModule-stubs/FarmAPI/FarmPluginManager.pyi``), so ``FarmAPI.FarmPluginManager.JobRequest``
is a module-level class. Only the two classes a plug-in meets are here; the manager's own
functions (``SubmitJob``, ``PrepareRemoteCommand``...) are Katana's business, not a plug-in's.
"""

from __future__ import annotations

from typing import Any


class FarmPluginManagerException(Exception):
    """What Katana's farm plug-in manager raises."""


class JobRequest:
    """What Katana hands to ``submitJob``: the Render node's name, the render context, every
    frame number, the command-line strings (already rewritten for the render nodes), the
    environment, and the remote temp folder ``createTemporaryDirectory`` returned."""

    def __init__(self, nodeName: str, renderContextName: str, frames: list[int],
                 commands: list[str], environment: Any, tempDir: str) -> None:
        self.nodeName, self.renderContextName = nodeName, renderContextName
        self.frames, self.commands = frames, commands
        self.environment, self.tempDir = environment, tempDir
