"""A stand-in for Katana's ``FarmAPI`` package, for use outside Katana.

Inside Katana, ``from Katana import FarmAPI`` gives the real types; everywhere else (tests,
the command line, the demo) this module gives the same names, so one plug-in class runs in
both places. It defines exactly what Katana 5's own classes define, with the same names,
nesting and parameters: the stubs generated inside Katana 5.0v5 (PyPI ``types-katana``
5.0.5.0, ``PyUtilModule-stubs/FarmAPI/__init__.pyi`` and ``BaseFarmPlugin.pyi``, whose classes
the package re-exports), checked by ``tests/test_farmapi_conformance.py``. As in Katana,
``FarmPluginManager`` is a module (:mod:`celeryfarm.farmpluginmanager`) and ``NodegraphAPI``
is importable from here. No celeryfarm logic lives here.

Farm settings, as Katana stores them: ``AddFarmSetting*`` registers a setting, and Katana
adds it as a parameter under a ``farmSettings`` group of every Render, ImageWrite and
RenderScript node, where the artist sets it (Katana 2.0 User Guide, "Farm Node Parameters":
"These settings appear as parameters under a farmSettings parameter on nodes of type Render,
ImageWrite or RenderScript"; studio plug-ins read them as
``node.getParameter('farmSettings.farmFileName').getValue(0)``, Foundry's FarmXML.py example).
``ExtractFarmSettingsFromNode(node)`` returns the added settings' values on that node, keyed by
the name given to ``AddFarmSetting*`` (Royal Render's Katana submitter reads
``customFarmSettings['rr_comment']`` for ``AddFarmSettingString('rr_comment')``); number
parameters hold floats. Katana 5's stubs declare ``GetAddedFarmSettings() ->
list[FarmSetting]`` (the 2.0 guide's "dictionary" is older).
"""

from __future__ import annotations

from typing import Any

from . import farmpluginmanager as FarmPluginManager
from . import nodegraphapi as NodegraphAPI

#: Node types Katana gives the farm settings to.
_FARM_NODE_TYPES = ("Render", "ImageWrite", "RenderScript")
_GROUP = "farmSettings"


class FarmPluginException(Exception):
    """What a farm plug-in raises when something is wrong."""


class JobNotFoundException(FarmPluginException):
    """The farm knows no job with the given id."""

    def __init__(self, jobId: str, contextMessage: str) -> None:
        self.jobId = jobId
        self.contextMessage = contextMessage
        detail = f": {contextMessage}" if contextMessage else ""
        super().__init__(f"no job with id {jobId!r}{detail}")


class Job:
    """A farm job as Katana shows it: times are integers in milliseconds."""

    class State:
        kWaiting = "Waiting"
        kRunning = "Running"
        kCompleted = "Completed"
        kCancelled = "Cancelled"
        kFailed = "Failed"
        kAllStates = (kWaiting, kRunning, kCompleted, kCancelled, kFailed)

    def __init__(self, jobId: str, name: str, startTime: int, endTime: int, state: str,
                 renderLogFilename: str) -> None:
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


class BaseFarmPlugin:
    """Base class of farm plug-ins; every method must be implemented by the subclass."""

    class InstallationMetadata:
        """The Katana installation on the render nodes."""

        def __init__(self, katanaRoot: str, renderPluginDsoPaths: Any,
                     renderbootCommand: Any = None) -> None:
            self.katanaRoot = katanaRoot
            self.renderPluginDsoPaths = renderPluginDsoPaths
            self.renderbootCommand = renderbootCommand

    def copyRenderFiles(self, filenames: list[str], renderContextName: str) -> Any:
        raise NotImplementedError

    def createTemporaryDirectory(self, renderContextName: str) -> str:
        raise NotImplementedError

    def getEnvironmentForJob(self, renderContextName: str) -> Any:
        raise NotImplementedError

    def getJobState(self, jobId: str) -> str:
        raise NotImplementedError

    def getJobs(self, filters: list) -> list:
        raise NotImplementedError

    def getRemoteInstallationMetadata(self) -> BaseFarmPlugin.InstallationMetadata:
        raise NotImplementedError

    def getRenderLogFilename(self, jobId: str) -> str | None:
        raise NotImplementedError

    def startJob(self, jobId: str) -> None:
        raise NotImplementedError

    def stopJob(self, jobId: str) -> None:
        raise NotImplementedError

    def submitJob(self, jobRequest: FarmPluginManager.JobRequest) -> str:
        raise NotImplementedError


class FarmSetting:
    """One setting registered with ``AddFarmSetting*``: a parameter of farm nodes."""

    NUMBER = "number"
    NUMBERARRAY = "numberArray"
    STRING = "string"
    STRINGARRAY = "stringArray"
    VALID_TYPES = (NUMBER, NUMBERARRAY, STRING, STRINGARRAY)

    def __init__(self, name: str = "", farmType: str = "", defaultValue: Any = None,
                 size: int = 0, hints: Any = None) -> None:
        if farmType not in FarmSetting.VALID_TYPES:
            raise ValueError(f"invalid farm setting type {farmType!r}")
        self._name, self._type, self._size, self._hints = name, farmType, size, hints
        self._value = defaultValue

    def getName(self) -> str:
        return self._name

    def getType(self) -> str:
        return self._type

    def getSize(self) -> int:
        return self._size

    def getHints(self) -> dict | None:
        return self._hints

    def getValue(self) -> str | int | float | list | None:
        return self._value


_ADDED: dict[str, FarmSetting] = {}


def AddFarmSettingString(name: str = "", defaultValue: str = "", hints: Any = None) -> None:
    _add(FarmSetting(name, FarmSetting.STRING, defaultValue, 0, hints))


def AddFarmSettingNumber(name: str = "", defaultValue: int = 0, hints: Any = None) -> None:
    _add(FarmSetting(name, FarmSetting.NUMBER, defaultValue, 0, hints))


def AddFarmSettingStringArray(name: str = "", size: int = 0, hints: Any = None) -> None:
    _add(FarmSetting(name, FarmSetting.STRINGARRAY, [""] * size, size, hints))


def AddFarmSettingNumberArray(name: str = "", size: int = 0, hints: Any = None) -> None:
    _add(FarmSetting(name, FarmSetting.NUMBERARRAY, [0.0] * size, size, hints))


def GetAddedFarmSettings() -> list[FarmSetting]:
    return list(_ADDED.values())


def ExtractFarmSettingsFromNode(node: NodegraphAPI.Node) -> dict:
    """The added settings' values on ``node``, by setting name; a setting the node has no
    parameter for (a node that is not a Render node) has its default value."""
    values: dict[str, Any] = {}
    for name, setting in _ADDED.items():
        parameter = node.getParameter(f"{_GROUP}.{name}")
        if parameter is None:
            values[name] = setting.getValue()
        elif setting.getType() in (FarmSetting.STRINGARRAY, FarmSetting.NUMBERARRAY):
            values[name] = [item.getValue(0) for item in parameter.getChildren()]
        else:
            values[name] = parameter.getValue(0)
    return values


def _add(setting: FarmSetting) -> None:
    if not setting.getName():
        raise ValueError("a farm setting needs a name")
    _ADDED[setting.getName()] = setting


def _add_farm_parameters(node: NodegraphAPI.Node) -> None:
    """Give a new farm node a parameter per added setting, as Katana does."""
    if node.getType() not in _FARM_NODE_TYPES:
        return
    group = node.getParameters().createChildGroup(_GROUP)
    for name, setting in _ADDED.items():
        *path, leaf = name.split(".")  # a dotted name makes nested groups
        parent = group
        for part in path:
            parent = parent.getChild(part) or parent.createChildGroup(part)
        kind, value = setting.getType(), setting.getValue()
        if kind == FarmSetting.STRING:
            parent.createChildString(leaf, value)
        elif kind == FarmSetting.NUMBER:
            parent.createChildNumber(leaf, value)
        elif kind == FarmSetting.STRINGARRAY:
            parent.createChildStringArray(leaf, setting.getSize())
        else:
            parent.createChildNumberArray(leaf, setting.getSize())


NodegraphAPI._NODE_CREATED.append(_add_farm_parameters)
