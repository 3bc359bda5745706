"""The FarmAPI stand-in and the plug-in against Katana 5's own signatures.

PyPI's ``types-katana`` 5.0.5.0 holds stubs generated inside a real Katana 5.0v5. These
tests parse them with ``ast`` and fail (never skip: CI installs the test extra) if:
- the plug-in does not override every ``BaseFarmPlugin`` method with Katana's parameter
  names, so that Katana's calls reach it;
- a stand-in module (``farmapi``, ``farmpluginmanager``, ``nodegraphapi``) defines a class,
  function, method, parameter or class constant that Katana's module does not, or defines it
  differently (nesting, base classes, parameter names, order, kinds, which have defaults).
Names starting with ``_`` are the stand-ins' own plumbing and are not compared, except
``__init__``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from celeryfarm import farmapi, farmpluginmanager, nodegraphapi
from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.jobs import Listed
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.records.states import ACTIVE, JobState

STUBS_VERSION = "5.0.5.0"
FARMAPI = "PyUtilModule-stubs/FarmAPI"
PACKAGE = Path(farmapi.__file__).parent

#: Each stand-in module and the stub files of the Katana module it stands for (``FarmAPI``
#: re-exports ``BaseFarmPlugin``'s classes; ``NodegraphAPI`` its C module's ``Node`` and
#: ``Parameter``).
STAND_INS = {
    "farmapi.py": (f"{FARMAPI}/__init__.pyi", f"{FARMAPI}/BaseFarmPlugin.pyi"),
    "farmpluginmanager.py": (f"{FARMAPI}/FarmPluginManager.pyi",),
    "nodegraphapi.py": ("NodegraphAPI-stubs/__init__.pyi",
                        "NodegraphAPI_cmodule-stubs/__init__.pyi"),
}


def stub_file(relative: str) -> Path:
    """A file of the installed ``types-katana``; a failure (not a skip) when it is missing."""
    try:
        distribution = importlib.metadata.distribution("types-katana")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"types-katana {STUBS_VERSION} is not installed: pip install -e '.[test]'")
    if distribution.version != STUBS_VERSION:
        pytest.fail(f"types-katana {distribution.version} is installed; the contract is "
                    f"{STUBS_VERSION}")
    path = Path(distribution.locate_file(relative))
    if not path.is_file():
        pytest.fail(f"types-katana has no {relative} (looked at {path})")
    return path


# -- a module's surface, from its source ----------------------------------------------------
Signature = tuple[tuple[str, str, bool], ...]  # (kind, name, has a default) per parameter


@dataclass
class Surface:
    """The classes, functions and constants a module or class body defines."""

    functions: dict[str, list[Signature]] = field(default_factory=dict)
    classes: dict[str, tuple[tuple[str, ...], Surface]] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)  # names bound by ``import ... as``


def signature(function: ast.FunctionDef) -> Signature:
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    params = [("positional", arg.arg, default) for arg, default in zip(positional, defaults)]
    if args.vararg:
        params.append(("*args", args.vararg.arg, False))
    params += [("keyword", arg.arg, default is not None)
               for arg, default in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append(("**kwargs", args.kwarg.arg, False))
    return tuple(params)


def surface(body: list[ast.stmt], into: Surface | None = None) -> Surface:
    found = into or Surface()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.functions.setdefault(node.name, []).append(signature(node))
        elif isinstance(node, ast.ClassDef):
            bases = tuple(ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases)
            found.classes[node.name] = (bases, surface(node.body))
        elif isinstance(node, ast.Assign):
            found.constants.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.constants.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.modules.update(alias.asname or alias.name for alias in node.names)
    return found


def public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def differences(katana: Surface, ours: Surface, where: str = "") -> list[str]:
    """What ``ours`` defines that ``katana`` does not define the same way."""
    found = []
    for name, signatures in ours.functions.items():
        if not public(name):
            continue
        if name not in katana.functions:
            found.append(f"{where}{name}() is not in Katana")
        elif signatures[0] not in katana.functions[name]:
            found.append(f"{where}{name}{signatures[0]} differs from Katana's "
                         f"{katana.functions[name][0]}")
    for name, (bases, body) in ours.classes.items():
        if not public(name):
            continue
        if name not in katana.classes:
            found.append(f"class {where}{name} is not in Katana")
            continue
        katana_bases, katana_body = katana.classes[name]
        if bases != katana_bases:
            found.append(f"class {where}{name}{bases} has Katana's bases {katana_bases}")
        found += differences(katana_body, body, f"{where}{name}.")
    for name in sorted(filter(public, ours.constants - katana.constants)):
        found.append(f"{where}{name} is not in Katana")
    for name in sorted(filter(public, ours.modules)):
        if name not in katana.modules and name not in katana.classes:
            found.append(f"{where}{name} (imported) is not in Katana")
    return found


def katana_surface(stand_in: str) -> Surface:
    katana = Surface()
    for relative in STAND_INS[stand_in]:
        surface(ast.parse(stub_file(relative).read_text()).body, into=katana)
    return katana


def our_surface(stand_in: str) -> Surface:
    tree = ast.parse((PACKAGE / stand_in).read_text())
    # only what the module binds for its users: not ``from typing import Any`` and the like
    body = [node for node in tree.body
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or
            (isinstance(node, ast.ImportFrom) and node.module is None and node.level == 1)]
    return surface(body)


# -- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("stand_in", sorted(STAND_INS))
def test_the_stand_in_defines_only_what_katana_defines_and_the_same_way(stand_in: str):
    assert differences(katana_surface(stand_in), our_surface(stand_in)) == []


def test_the_stand_in_defines_what_the_plug_in_meets():
    """Katana's names the project needs are all there (so the check above is not vacuous)."""
    ours = our_surface("farmapi.py")
    assert {"BaseFarmPlugin", "FarmPluginException", "Job", "JobNotFoundException",
            "FarmSetting"} <= set(ours.classes)
    assert {"AddFarmSettingString", "AddFarmSettingNumber", "AddFarmSettingStringArray",
            "AddFarmSettingNumberArray", "ExtractFarmSettingsFromNode",
            "GetAddedFarmSettings"} <= set(ours.functions)
    assert set(ours.classes["BaseFarmPlugin"][1].classes) == {"InstallationMetadata"}
    assert set(ours.classes["Job"][1].classes) == {"State"}
    assert {"JobRequest", "FarmPluginManagerException"} <= set(
        our_surface("farmpluginmanager.py").classes)
    assert {"GetNode", "CreateNode"} <= set(our_surface("nodegraphapi.py").functions)


def test_names_resolve_as_they_do_in_katana():
    """``FarmAPI.FarmPluginManager`` is a module, as in Katana; the rest are classes."""
    assert inspect.ismodule(farmapi.FarmPluginManager)
    assert farmapi.FarmPluginManager is farmpluginmanager
    assert inspect.isclass(farmapi.FarmPluginManager.JobRequest)
    assert farmapi.NodegraphAPI is nodegraphapi
    assert inspect.isclass(farmapi.BaseFarmPlugin.InstallationMetadata)
    assert farmapi.Job.State.kAllStates == ("Waiting", "Running", "Completed", "Cancelled",
                                            "Failed")
    assert issubclass(farmapi.JobNotFoundException, farmapi.FarmPluginException)
    for module in STAND_INS:
        assert "JobRequest" not in our_surface(module).classes or module == \
            "farmpluginmanager.py"


def test_the_plug_in_overrides_every_base_method_with_katanas_parameter_names():
    katana = surface(ast.parse(stub_file(f"{FARMAPI}/BaseFarmPlugin.pyi").read_text()).body)
    methods = katana.classes["BaseFarmPlugin"][1].functions
    assert len(methods) == 10  # the stubs themselves, as this contract knows them
    for name, (katana_signature, *_) in methods.items():
        assert name in vars(CeleryFarmPlugin), f"CeleryFarmPlugin does not override {name}"
        ours = list(inspect.signature(vars(CeleryFarmPlugin)[name]).parameters)
        assert ours == [param for _kind, param, _default in katana_signature], name


def test_the_check_catches_what_it_is_for():
    """The comparison fails for the mistakes this project once made."""
    katana = katana_surface("farmpluginmanager.py")
    invented = surface(ast.parse(
        "class JobRequest:\n"
        "    def __init__(self, name, renderContextName, commands, environment=None,\n"
        "                 frameRange=None, renderType='Disk', settings=None): ...\n"
    ).body)
    assert differences(katana, invented)
    base = katana_surface("farmapi.py")
    old_name = surface(ast.parse(
        "class BaseFarmPlugin:\n"
        "    def createTempDirectory(self, renderContextName): ...\n"
        "class JobNotFoundException(Exception):\n"
        "    def __init__(self, jobId, contextMessage=''): ...\n"
        "NOT_KATANAS = 1\n"
    ).body)
    found = "\n".join(differences(base, old_name))
    assert "BaseFarmPlugin.createTempDirectory() is not in Katana" in found
    assert "JobNotFoundException" in found and "__init__" in found
    assert "NOT_KATANAS is not in Katana" in found


def test_the_plug_ins_jobs_have_the_types_katanas_job_declares(tmp_path: Path):
    """Every ``Job`` the plug-in makes fits the stubs' ``Job.__init__`` annotations
    (``endTime: int``, ``renderLogFilename: str``: never None) in every state, whether or
    not this host reaches the shared mount; and ``endTime`` is a Completed job's end only:
    Katana Queue's "Completed" column is empty for failed and cancelled jobs."""
    tree = ast.parse(stub_file(f"{FARMAPI}/BaseFarmPlugin.pyi").read_text())
    (job_class,) = [node for node in tree.body
                    if isinstance(node, ast.ClassDef) and node.name == "Job"]
    (init,) = [node for node in job_class.body
               if isinstance(node, ast.FunctionDef) and node.name == "__init__"]
    declared = {arg.arg: ast.unparse(arg.annotation) for arg in init.args.args[1:]}
    assert declared["endTime"] == "int" and declared["renderLogFilename"] == "str"
    types = {"int": int, "str": str}

    root = tmp_path / "share"
    plugin = CeleryFarmPlugin(Farm(Settings(shared_root=root)))
    listed = [Listed(f"job-{state.value}", "Render", "artist", "host", "session", "Disk",
                     state, 1, 1_000, None if state in ACTIVE else 2_000,
                     f"ctx-{state.value}/render.log", "[]")
              for state in JobState]
    for reachable in (False, True):
        jobs = {job.state: job for job in plugin._make_jobs(listed, reachable)}
        assert set(jobs) == set(farmapi.Job.State.kAllStates)
        for state, job in jobs.items():
            for name, annotation in declared.items():
                assert isinstance(getattr(job, name), types[annotation]), (state, name)
            assert job.endTime == (2_000 if state == farmapi.Job.State.kCompleted else 0)
            assert job.renderLogFilename == (f"{root}/ctx-{state}/render.log" if reachable
                                             else "")
