"""celeryfarm as a pipeline TD installs it (``pip install --target``, not from a checkout):
Katana's drop-in travels in the package, loads from there, and ``celeryfarm env`` points
``KATANA_RESOURCES`` at it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from celeryfarm.plugin import KATANA_RESOURCES

from .cli_fixtures import base_env

REPO = Path(__file__).resolve().parents[1]
DROPIN = Path("Plugins") / "CeleryFarmPlugin.py"


def install(tmp_path: Path) -> Path:
    """Install this source tree (copied: the build leaves files beside its source) into a
    folder of its own, with pip, as the README says; return that folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "celeryfarm", source / "celeryfarm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = tmp_path / "katana-python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), str(source)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return target


def test_the_checkouts_dropin_is_the_packages_one():
    """One copy of the drop-in, inside the package (the tests load it from there)."""
    assert KATANA_RESOURCES == REPO / "celeryfarm" / "katana"
    assert (KATANA_RESOURCES / DROPIN).is_file()
    assert not (REPO / DROPIN).exists()


def test_the_installed_package_holds_the_dropin_and_env_points_katana_at_it(tmp_path: Path):
    target = install(tmp_path)
    resources = target / "celeryfarm" / "katana"
    assert (resources / DROPIN).is_file()
    assert not (target / DROPIN).exists()

    # The installed copy first on the path (PYTHONPATH, as in Katana's launch environment);
    # run from a folder with no celeryfarm in it.
    env = base_env(PYTHONPATH=str(target), KATANA_RESOURCES="/studio/katana",
                   CELERYFARM_BROKER_URL="redis://127.0.0.1:6399/0")
    load = ("import runpy, sys\n"
            "registry = runpy.run_path(sys.argv[1])['PluginRegistry']\n"
            "(kind, version, name, plugin), = registry\n"
            "print(kind, name)\n"
            "print(sys.modules[plugin.__module__].__file__)\n")
    done = subprocess.run([sys.executable, "-c", load, str(resources / DROPIN)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    registered, module = done.stdout.splitlines()
    assert registered == "FarmPlugin Celery Farm"
    assert module == str(target / "celeryfarm" / "plugin.py")  # the installed copy's

    done = subprocess.run([sys.executable, "-m", "celeryfarm", "env"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    exports = dict(re.findall(r"^export (\w+)=(.*)$", done.stdout, re.M))
    assert shlex.split(exports["KATANA_RESOURCES"]) == [f"{resources}{os.pathsep}/studio/katana"]
