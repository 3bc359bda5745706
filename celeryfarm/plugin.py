"""The Katana farm plug-in: a thin adapter from Katana's FarmAPI to the farm core.

Inside Katana the base class and types come from ``Katana.FarmAPI`` and the node graph from
``Katana.NodegraphAPI``; elsewhere from the stand-ins :mod:`celeryfarm.farmapi` and
:mod:`celeryfarm.nodegraphapi`, so the same class runs in both. This is the only code that
touches FarmAPI types: each method converts Katana's arguments, calls
:class:`celeryfarm.farm.Farm`, and turns the core's errors into ``FarmPluginException`` /
``JobNotFoundException``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import redis
from kombu.exceptions import OperationalError

from .config import redact
from .errors import FarmError, JobNotFound
from .farm import Farm
from .jobs import DEFAULT_PRIORITY, RENDER_TYPES, Listed
from .listing import collector_paused
from .records.states import JobState

try:  # inside Katana
    from Katana import FarmAPI, NodegraphAPI  # type: ignore[import-not-found]
except ImportError:  # tests, the command line, the demo
    from . import farmapi as FarmAPI
    from . import nodegraphapi as NodegraphAPI
try:  # apart: Katana's FarmAPI must never give way to the stand-in for want of Callbacks
    from Katana import Callbacks  # type: ignore[import-not-found]
except ImportError:
    Callbacks = None

logger = logging.getLogger(__name__)

#: The folder to put on Katana's ``KATANA_RESOURCES``: its ``Plugins/CeleryFarmPlugin.py``
#: registers this plug-in. It is part of the installed package (``celeryfarm env`` prints it).
KATANA_RESOURCES = Path(__file__).resolve().parent / "katana"

#: The parameter group of Katana's farm settings on a farm node (Render, ImageWrite...).
FARM_SETTINGS_GROUP = "farmSettings"
#: The attributes of Katana 5's ``FarmPluginManager.JobRequest``, in its constructor's order.
JOB_REQUEST_ATTRIBUTES = ("nodeName", "renderContextName", "frames", "commands", "environment",
                          "tempDir")

def _setting(name: str, label: str, default: int | str, help_text: str) -> tuple:
    """A whole number (from 0) or a string farm setting, by its default's type."""
    if isinstance(default, int):
        return (name, "AddFarmSettingNumber", default,
                {"label": label, "int": True, "min": 0, "help": help_text})
    return (name, "AddFarmSettingString", default, {"label": label, "help": help_text})


#: Retries and failure rules (:mod:`celeryfarm.retries`).
RETRY_SETTINGS = (
    _setting("retries", "Retries", 0,
             "Run a step that exits non-zero again, up to this many times"),
    _setting("retryDelaySeconds", "Retry Delay Seconds", 0,
             "Wait this long before a failed step runs again"),
    _setting("licencePattern", "Licence Pattern", "",
             "Regular expression: a failed step with an output line matching it found no "
             "licence; it backs off and runs again without using a retry"),
    _setting("fatalPattern", "Fatal Pattern", "",
             "Regular expression: a failed step with an output line matching it is never "
             "retried"),
    _setting("limits", "Limits", "",
             "Limits (licences) each step holds one unit of while it runs, comma-separated; "
             "a wrangler sets them with `celeryfarm limit set`"),
)

#: Each state's plain string, as Katana's ``Job`` takes it (an enum's ``.value`` is a
#: property: slow for 10,000 jobs).
_STATE_TEXT = {state: state.value for state in JobState}

#: The farm settings artists set on Render nodes: (name, AddFarmSetting* function, default,
#: hints). Katana's request carries no render type, and how renderboot's command line names
#: the render method is not public (neither Foundry's guides nor public plug-ins spell out
#: renderboot's arguments), so the render type is a setting too, Disk unless set.
FARM_SETTINGS = (
    ("pool", "AddFarmSettingString", "",
     {"label": "Pool", "help": "The farm pool (queue) to render on; empty: the farm's default"}),
    ("priority", "AddFarmSettingNumber", DEFAULT_PRIORITY,
     {"label": "Priority", "int": True, "min": 0, "max": 100,
      "help": "0..100, higher renders first"}),
    ("maxStepSeconds", "AddFarmSettingNumber", 0,
     {"label": "Max Step Seconds", "int": True, "min": 0,
      "help": "Kill and fail a step that runs longer; 0: the farm's limit only"}),
    ("stallSeconds", "AddFarmSettingNumber", 0,
     {"label": "Stall Seconds", "int": True, "min": 0,
      "help": "Kill and fail a step that prints nothing for this long; 0: never"}),
    ("maxMemoryMB", "AddFarmSettingNumber", 0,
     {"label": "Max Memory MB", "int": True, "min": 0,
      "help": "Kill and fail a step whose processes use more memory; 0: no cap"}),
    *RETRY_SETTINGS,
    ("renderType", "AddFarmSettingString", "Disk",
     {"label": "Render Type", "widget": "popup", "options": list(RENDER_TYPES),
      "help": "What the farm records and shows: Disk, Preview or Live"}),
)


def register_farm_settings(**_callback_arguments: Any) -> None:
    """Add the farm's settings to Katana's farm nodes (once, however often called)."""
    added = {setting.getName() for setting in FarmAPI.GetAddedFarmSettings()}
    for name, add, default, hints in FARM_SETTINGS:
        if name not in added:
            getattr(FarmAPI, add)(name, default, hints)


def install_farm_settings() -> None:
    """Register the farm's settings as the drop-in loads and, inside Katana, again when
    it has started (``Callbacks.Type.onStartup``, where Katana's documentation and other
    farm integrations register theirs): a drop-in loaded before FarmAPI takes settings
    still gets them, and one loaded after gets them at once."""
    register_farm_settings()
    if Callbacks is not None:
        Callbacks.addCallback(Callbacks.Type.onStartup, register_farm_settings)


class CeleryFarmPlugin(FarmAPI.BaseFarmPlugin):
    """Sends Katana renders to a celeryfarm; configured by ``CELERYFARM_*`` variables and,
    per render, by the farm settings on the Render node (``FARM_SETTINGS``)."""

    def __init__(self, farm: Farm | None = None) -> None:
        super().__init__()
        self._farm = farm
        #: Makes the farm core once: Katana's threads may make their first calls at once,
        #: and each Farm is a session of its own (``getJobs({'session': ...})``).
        self._farm_lock = threading.Lock()
        #: The ``FarmAPI.Job`` of each job the last getJobs listed, and the ``Listed`` it
        #: was made from: a job listed by the same object is unchanged, and its ``Job`` is
        #: not made again (Katana polls getJobs). Two dicts, not a tuple a job: 10,000 fewer
        #: objects for Python's collector to walk.
        self._jobs: dict[str, FarmAPI.Job] = {}
        self._made_from: dict[str, Listed] = {}
        #: The last listing, whether the log was reachable, and the Jobs made of it: while
        #: nothing changed, Farm.listed returns the same list and these are given again.
        self._last: tuple[list[Listed] | None, bool, list[FarmAPI.Job]] = (None, False, [])

    @property
    def farm(self) -> Farm:
        """The farm core, made from the environment on first use: a bad ``CELERYFARM_*``
        value then raises inside a plug-in method, which reports it as a
        ``FarmPluginException``, and never while Katana loads or builds the plug-in.
        Threads making their first call at once get the same one."""
        if self._farm is None:
            with self._farm_lock:
                if self._farm is None:
                    self._farm = Farm()
        return self._farm

    @property
    def session(self) -> str:
        """Identifies this Katana session's jobs (``getJobs({'session': ...})``)."""
        return self.farm.session

    # -- job submission, in the order Katana calls it ----------------------------------------
    def createTemporaryDirectory(self, renderContextName: str) -> str:
        """The render context's folder as the render nodes see it (Katana hands it back as
        the request's ``tempDir`` and rewrites the commands with it)."""
        with self._errors():
            self.farm.prepare_context(renderContextName)
            return self.farm.job_environment(renderContextName)["KATANA_TMPDIR"]

    # The Katana 4 docs' prose calls it createTempDirectory; Katana calls the method above.
    createTempDirectory = createTemporaryDirectory

    def copyRenderFiles(self, filenames: list[str], renderContextName: str) -> dict:
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
            return self.farm.job_environment(renderContextName)

    def submitJob(self, jobRequest: Any) -> str:
        """Katana's request as it is: the Render node's name is the job's name, the commands
        are command-line strings (split with shlex, never given to a shell), ``tempDir`` must
        be the folder ``createTemporaryDirectory`` made (the render's working folder), and
        the farm settings come from the node."""
        with self._errors():
            missing = [name for name in JOB_REQUEST_ATTRIBUTES if not hasattr(jobRequest, name)]
            if missing:
                raise FarmError(
                    f"the job request has no {', '.join(missing)}: expected Katana's "
                    f"FarmPluginManager.JobRequest({', '.join(JOB_REQUEST_ATTRIBUTES)})")
            context, commands = jobRequest.renderContextName, jobRequest.commands
            self._check_temp_dir(jobRequest.tempDir, context)
            if isinstance(commands, (str, bytes)) or not isinstance(commands, (list, tuple)):
                raise FarmError(f"commands must be a list of command-line strings, "
                                f"got {commands!r}")
            for command in commands:
                if not isinstance(command, str):
                    raise FarmError(f"each command must be a command-line string, "
                                    f"got {command!r}")
            settings = self._farm_settings(jobRequest.nodeName)
            return self.farm.submit_commands(
                commands,
                context=context,
                name=jobRequest.nodeName,
                environment=jobRequest.environment,
                frames=jobRequest.frames,
                render_type=settings.pop("renderType"),
                settings=settings,
            ).job_id

    # -- information retrieval ---------------------------------------------------------------
    def getJobState(self, jobId: str) -> str:
        with self._errors():
            return self.farm.state(jobId).value

    def getRenderLogFilename(self, jobId: str) -> str | None:
        with self._errors():
            path = self.farm.log_file(jobId)
        return None if path is None else str(path)

    def getJobs(self, filters: list) -> list:
        """Jobs matching ``filters``: None or ``[]`` (this user's jobs), a dict, or a list of
        dicts that are ANDed. Keys: user, session, host, state, name (substring),
        renderType."""
        with self._errors():
            if not filters:
                filters = [{"user": self.farm.user}]
            elif isinstance(filters, Mapping):
                filters = [filters]
            elif not isinstance(filters, (list, tuple)):
                raise FarmError(f"getJobs filters must be a list of dicts, got {filters!r}")
            with collector_paused():
                listed = self.farm.listed(list(filters))
                reachable = self.farm.root.local.is_dir()
                if self._last[0] is listed and self._last[1] == reachable:
                    return list(self._last[2])
                jobs = self._make_jobs(listed, reachable)
            self._last = (listed, reachable, jobs)
            return list(jobs)

    # -- job control -------------------------------------------------------------------------
    def startJob(self, jobId: str) -> None:
        with self._errors():
            self.farm.start(jobId)

    def stopJob(self, jobId: str) -> None:
        with self._errors():
            self.farm.stop(jobId)

    # -- helpers -----------------------------------------------------------------------------
    def _check_temp_dir(self, temp_dir: Any, context: Any) -> None:
        # The folder's own path, not resolved: the submission's first log line (Farm.submit)
        # is written through SharedRoot.join, which refuses a folder swapped for a symlink.
        if not os.path.isdir(self.farm.root.local_path(self.farm.root.context_dir(context))):
            raise FarmError(f"render context {context!r} has no folder: Katana calls "
                            f"createTemporaryDirectory before submitJob")
        if not self.farm.root.is_context_folder(temp_dir, context):
            expected = self.farm.job_environment(context)["KATANA_TMPDIR"]
            raise FarmError(f"tempDir {temp_dir!r} is not the folder createTemporaryDirectory "
                            f"made for render context {context!r} ({expected})")

    def _farm_settings(self, node_name: Any) -> dict[str, Any]:
        """This farm's settings on the Render node ``node_name``; other farms' settings on
        the same node are left alone. Katana renders remotely from any 3D node, and only
        farm nodes have the ``farmSettings`` parameter, so a node without it gets the
        defaults; so does one whose settings cannot be read (Katana's
        ``ExtractFarmSettingsFromNode`` may raise), with a warning: a setting the farm
        cannot read must not lose the render."""
        if not isinstance(node_name, str) or not node_name:
            raise FarmError(f"nodeName must be the Render node's name, got {node_name!r}")
        values: Mapping[str, Any] = {}
        try:
            node = NodegraphAPI.GetNode(node_name)
            if node is not None and node.getParameter(FARM_SETTINGS_GROUP) is not None:
                values = dict(FarmAPI.ExtractFarmSettingsFromNode(node))
        except Exception as error:
            logger.warning("celeryfarm: cannot read the farm settings of node %r (%s: %s); "
                           "submitting with the defaults", node_name,
                           type(error).__name__, error)
        return {name: values.get(name, default) for name, _add, default, _hints in FARM_SETTINGS}

    def _make_jobs(self, listed: list[Listed], log_reachable: bool) -> list[FarmAPI.Job]:
        """Katana's view of each record. ``startTime`` is the submission time in ms (Katana
        Queue's "Submitted" column), so a waiting job has one too. ``endTime`` is the end in
        ms of a Completed job, else 0: Katana Queue's "Completed" column is empty for failed
        and cancelled jobs (the farm's own record keeps every job's end), and Katana 5's
        stubs declare it ``int``, not ``int | None``, so 0 (the epoch, falsy) is the one int
        no real end can be. The log is this host's path, or "" when this host cannot reach
        the shared mount (the stubs declare ``renderLogFilename: str``; "" is falsy too). A
        job's ``Job`` of the last call is used again while the same ``Listed`` lists it (a
        change is a new one), in one loop with local names: a cold listing makes 10,000."""
        same_log = log_reachable == self._last[1]
        known, known_from = (self._jobs, self._made_from) if same_log else ({}, {})
        self._jobs, self._made_from = made, made_from = {}, {}
        log_path, job_class, completed = self.farm.log_path, FarmAPI.Job, JobState.COMPLETED
        jobs = []
        for item in listed:
            job_id = item.job_id
            if known_from.get(job_id) is item:
                job = known[job_id]
            else:
                state = item.state
                job = job_class(job_id, item.name, item.submitted_ms,
                                (item.end_ms or 0) if state == completed else 0,
                                _STATE_TEXT[state],
                                (log_path(item) or "") if log_reachable else "")
            made[job_id], made_from[job_id] = job, item
            jobs.append(job)
        return jobs

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
        except redis.exceptions.NoPermissionError as error:
            raise FarmAPI.FarmPluginException(f"not allowed to this farm user: {error}") \
                from None
        except (redis.RedisError, OperationalError) as error:
            url = redact(self.farm.settings.records_url)
            raise FarmAPI.FarmPluginException(f"cannot reach the farm's Redis at {url}: "
                                              f"{error}") from None
