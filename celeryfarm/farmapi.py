"""A stand-in for Katana's ``FarmAPI`` module, for use outside Katana.

Inside Katana, ``from Katana import FarmAPI`` gives the real types; everywhere else (tests,
the command line, the demo) this module gives the same names with the same behaviour, so one
plug-in class runs in both places. It holds plain types only: no celeryfarm logic lives here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class FarmPluginException(Exception):
    """What a farm plug-in raises when something is wrong."""


class JobNotFoundException(FarmPluginException):
    """The farm knows no job with the given id."""

    def __init__(self, jobId: str, contextMessage: str = "") -> None:
        self.jobId = jobId
        self.contextMessage = contextMessage
        detail = f": {contextMessage}" if contextMessage else ""
        super().__init__(f"no job with id {jobId!r}{detail}")


class Job:
    """A farm job as Katana sees it: a plain record. Times are integers in milliseconds."""

    class State:
        kWaiting = "Waiting"
        kRunning = "Running"
        kCompleted = "Completed"
        kCancelled = "Cancelled"
        kFailed = "Failed"
        kAllStates = (kWaiting, kRunning, kCompleted, kCancelled, kFailed)

    def __init__(
        self,
        jobId: str,
        name: str,
        startTime: int | None,
        endTime: int | None,
        state: str,
        renderLogFilename: str | None,
    ) -> None:
        if state not in Job.State.kAllStates:
            raise ValueError(f"invalid job state {state!r}; expected one of {Job.State.kAllStates}")
        self.jobId = jobId
        self.name = name
        self.startTime = startTime
        self.endTime = endTime
        self.state = state
        self.renderLogFilename = renderLogFilename

    def __repr__(self) -> str:
        return f"Job(jobId={self.jobId!r}, name={self.name!r}, state={self.state!r})"


class FarmPluginManager:
    """Namespace matching Katana's ``FarmAPI.FarmPluginManager``."""

    class JobRequest:
        """What Katana hands to ``submitJob``.

        Katana's real attribute list is not public; plug-ins must read requests tolerantly.
        ``commands`` is ordered; each command is an argv list or a command-line string.
        """

        def __init__(
            self,
            name: str = "",
            renderContextName: str = "",
            commands: Sequence[str | Sequence[str]] = (),
            environment: Mapping[str, str] | None = None,
            frameRange: tuple[int, int] | None = None,
            renderType: str = "Disk",
            settings: Mapping[str, Any] | None = None,
        ) -> None:
            self.name = name
            self.renderContextName = renderContextName
            self.commands = commands
            self.environment = dict(environment or {})
            self.frameRange = frameRange
            self.renderType = renderType
            self.settings = dict(settings or {})


class BaseFarmPlugin:
    """Base class of farm plug-ins; every method must be implemented by the subclass."""

    class InstallationMetadata(NamedTuple):
        """The Katana installation on the render nodes."""

        katanaRoot: str
        renderPluginDsoPaths: Mapping[str, str]
        renderbootCommand: str | None = None

    def createTempDirectory(self, renderContextName: str) -> str:
        raise NotImplementedError

    def copyRenderFiles(self, filenames: Sequence[str], renderContextName: str) -> dict[str, str]:
        raise NotImplementedError

    def getRemoteInstallationMetadata(self) -> BaseFarmPlugin.InstallationMetadata:
        raise NotImplementedError

    def getEnvironmentForJob(self, renderContextName: str) -> dict[str, str]:
        raise NotImplementedError

    def submitJob(self, jobRequest: FarmPluginManager.JobRequest) -> str:
        raise NotImplementedError

    def getJobState(self, jobId: str) -> str:
        raise NotImplementedError

    def getRenderLogFilename(self, jobId: str) -> str | None:
        raise NotImplementedError

    def getJobs(self, filters: Any) -> list[Job]:
        raise NotImplementedError

    def startJob(self, jobId: str) -> None:
        raise NotImplementedError

    def stopJob(self, jobId: str) -> None:
        raise NotImplementedError
