"""The Katana farm plug-in: a thin adapter from Katana's FarmAPI to the farm core.

Inside Katana the base class and types come from ``Katana.FarmAPI``; elsewhere from the
stand-in :mod:`celeryfarm.farmapi`, so the same class runs in both. Each method converts
Katana's arguments, calls :class:`celeryfarm.farm.Farm`, and turns the core's errors into
``FarmPluginException`` / ``JobNotFoundException``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from kombu.exceptions import OperationalError

from .config import redact
from .errors import FarmError, JobNotFound
from .farm import Farm
from .jobs import JobRecord, JobSpec

try:  # inside Katana
    from Katana import FarmAPI  # type: ignore[import-not-found]
except ImportError:  # tests, the command line, the demo
    from . import farmapi as FarmAPI

#: Attribute names tried, in order, for each field of Katana's JobRequest (whose attribute
#: list is not public): plain attributes, getter methods and mapping keys all work.
REQUEST_FIELDS = {
    "name": ("name", "getName", "nodeName", "renderNodeName"),
    "context": ("renderContextName", "getRenderContextName"),
    "commands": ("commands", "getCommands", "renderCommands"),
    "environment": ("environment", "getEnvironment", "environmentVariables"),
    "frame_range": ("frameRange", "getFrameRange"),
    "render_type": ("renderType", "getRenderType", "renderMethod"),
    "settings": ("settings", "getSettings", "farmSettings"),
}


def read_request(request: Any, field: str) -> Any:
    """Read one field of a job request, whatever shape the request has."""
    for name in REQUEST_FIELDS[field]:
        if isinstance(request, Mapping):
            value = request.get(name)
        else:
            value = getattr(request, name, None)
            if callable(value):
                value = value()
        if value is not None:
            return value
    return None


class CeleryFarmPlugin(FarmAPI.BaseFarmPlugin):
    """Sends Katana renders to a celeryfarm; configured by ``CELERYFARM_*`` variables."""

    def __init__(self, farm: Farm | None = None) -> None:
        super().__init__()
        self._farm = farm
        self._session = ""
        self.host = socket.gethostname()

    @property
    def farm(self) -> Farm:
        """The farm core, made from the environment on first use: a bad ``CELERYFARM_*``
        value then raises inside a plug-in method, which reports it as a
        ``FarmPluginException``, and never while Katana loads or builds the plug-in."""
        if self._farm is None:
            self._farm = Farm()
        return self._farm

    @property
    def session(self) -> str:
        """Identifies this Katana session's jobs (``getJobs({'session': ...})``)."""
        if not self._session:
            self._session = (self.farm.settings.session
                             or f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return self._session

    # -- job submission, in the order Katana calls it ----------------------------------------
    def createTempDirectory(self, renderContextName: str) -> str:
        with self._errors():
            return str(self.farm.prepare_context(renderContextName))

    def copyRenderFiles(self, filenames: Sequence[str], renderContextName: str) -> dict:
        with self._errors():
            return self.farm.copy_files(filenames, renderContextName)

    def getRemoteInstallationMetadata(self) -> FarmAPI.BaseFarmPlugin.InstallationMetadata:
        with self._errors():
            settings = self.farm.settings
        return FarmAPI.BaseFarmPlugin.InstallationMetadata(
            settings.katana_root,
            dict(settings.renderer_dso_paths),
            settings.renderboot or None,
        )

    def getEnvironmentForJob(self, renderContextName: str) -> dict:
        with self._errors():
            root = self.farm.root
            folder = root.context_dir(renderContextName)
        return {
            "CELERYFARM_RENDER_CONTEXT": renderContextName,
            "KATANA_TMPDIR": root.to_remote(folder),
        }

    def submitJob(self, jobRequest: Any) -> str:
        with self._errors():
            spec = JobSpec.build(
                name=read_request(jobRequest, "name"),
                commands=read_request(jobRequest, "commands") or (),
                environment=read_request(jobRequest, "environment"),
                render_type=read_request(jobRequest, "render_type"),
                frame_range=read_request(jobRequest, "frame_range"),
                settings=read_request(jobRequest, "settings"),
                default_queue=self.farm.settings.default_queue,
                context=read_request(jobRequest, "context") or "",
                user=self.farm.settings.user,
                host=self.host,
                session=self.session,
            )
            return self.farm.submit(spec).job_id

    # -- information retrieval ---------------------------------------------------------------
    def getJobState(self, jobId: str) -> str:
        with self._errors():
            return self.farm.state(jobId).value

    def getRenderLogFilename(self, jobId: str) -> str | None:
        with self._errors():
            path = self.farm.log_file(jobId)
        return None if path is None else str(path)

    def getJobs(self, filters: Any = None) -> list:
        """Jobs matching ``filters``: None (this user's jobs), a dict, or a list of dicts that
        are ANDed. Keys: user, session, host, state, name (substring), renderType."""
        with self._errors():
            if filters is None:
                filters = [{"user": self.farm.settings.user}]
            elif isinstance(filters, Mapping):
                filters = [filters]
            return [self._job(record) for record in self.farm.jobs(list(filters))]

    # -- job control -------------------------------------------------------------------------
    def startJob(self, jobId: str) -> None:
        with self._errors():
            self.farm.start(jobId)

    def stopJob(self, jobId: str) -> None:
        with self._errors():
            self.farm.stop(jobId)

    # -- helpers -----------------------------------------------------------------------------
    def _job(self, record: JobRecord) -> FarmAPI.Job:
        return FarmAPI.Job(
            record.job_id,
            record.spec.name,
            record.start_ms,
            record.end_ms,
            record.state.value,
            self.farm.log_path(record),
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Raise the core's errors as the FarmAPI exceptions Katana expects."""
        try:
            yield
        except JobNotFound as error:
            raise FarmAPI.JobNotFoundException(error.job_id, "celeryfarm has no such job") \
                from None
        except FarmError as error:
            raise FarmAPI.FarmPluginException(str(error)) from None
        except (redis.RedisError, OperationalError) as error:
            url = redact(self.farm.settings.records_url)
            raise FarmAPI.FarmPluginException(f"cannot reach the farm's Redis at {url}: "
                                              f"{error}") from None
