"""celeryfarm: a render farm for Foundry's Katana on Celery and Redis.

``celeryfarm worker`` starts a render node. Katana uses :class:`CeleryFarmPlugin`; other
Python code (pipeline tools, the command line) uses :class:`Farm`. The names in ``__all__``
are the public API; each is imported when first used, so importing the package (as the
command line and ``celery -A celeryfarm`` do) stays cheap and reads no configuration.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .celery import create_app
    from .config import Settings
    from .errors import ConfigError, FarmError, JobNotFound, RedisServerError, StepFailed
    from .farm import Farm
    from .jobs import JobRecord, JobSpec
    from .plugin import CeleryFarmPlugin
    from .records.states import JobState

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_HOMES = {
    "CeleryFarmPlugin": "plugin",
    "ConfigError": "errors",
    "Farm": "farm",
    "FarmError": "errors",
    "JobNotFound": "errors",
    "JobRecord": "jobs",
    "JobSpec": "jobs",
    "JobState": "records.states",
    "RedisServerError": "errors",
    "Settings": "config",
    "StepFailed": "errors",
    "create_app": "celery",
}
__all__ = [
    "CeleryFarmPlugin", "ConfigError", "Farm", "FarmError", "JobNotFound", "JobRecord",
    "JobSpec", "JobState", "RedisServerError", "Settings", "StepFailed", "__version__",
    "create_app",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
