"""What the ``celeryfarm`` commands (and the demo they run) share: a :class:`Session`.

It holds the command's environment and makes, when first needed, the settings and the farm;
:func:`make_local_farm` makes the farm ``up`` and the demo run here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from functools import cached_property
from typing import TYPE_CHECKING, Callable

from .config import PREFIX, Settings
from .errors import FarmError, JobNotFound
from .jobs import JobRecord

if TYPE_CHECKING:
    from .farm import Farm
    from .localfarm import LocalFarm

_HEX = re.compile(r"[0-9a-f]{1,32}")


class Session:
    """What the commands share: the environment, the settings and the farm, each made when
    first needed."""

    def __init__(self, data_dir: str | None) -> None:
        self.environ = dict(os.environ)
        if data_dir:
            self.environ[PREFIX + "DATA_DIR"] = data_dir

    @cached_property
    def local_settings(self) -> Settings:
        """Settings from this environment alone (for ``up``, which makes the farm)."""
        return Settings.from_env(self.environ)

    @cached_property
    def client_environ(self) -> dict[str, str]:
        from .localfarm import client_environment

        return client_environment(self.environ)

    @cached_property
    def settings(self) -> Settings:
        """Settings for using a farm: the running local one unless the environment names
        one."""
        return Settings.from_env(self.client_environ)

    @cached_property
    def farm(self) -> Farm:
        from .farm import Farm
        from .localfarm import check_redis

        settings = self.settings
        # One quick, clear error rather than long retries.
        check_redis(settings.broker_url, settings.tls, settings.sentinel_master)
        if settings.records_url != settings.broker_url:
            check_redis(settings.records_url, settings.tls, settings.sentinel_master)
        return Farm(settings)

    def point_at(self, env: dict[str, str]) -> None:
        """Use the farm these variables name from now on (the farm the demo started)."""
        self.environ.update(env)
        for name in ("client_environ", "settings", "farm"):
            self.__dict__.pop(name, None)

    def resolve(self, text: str) -> str:
        """The full id of a job given by its id or a unique prefix of it (as git does)."""
        wanted = text.strip().lower()
        if not _HEX.fullmatch(wanted):
            raise JobNotFound(text)
        if len(wanted) == 32:
            return wanted
        matches = [job_id for job_id in self.farm.job_ids() if job_id.startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise JobNotFound(text)
        raise FarmError(f"job id {text!r} is ambiguous: {len(matches)} jobs start with it "
                        f"({', '.join(m[:12] for m in matches[:3])}...)")

    def record(self, text: str) -> JobRecord:
        return self.farm.get(self.resolve(text))


def make_local_farm(session: Session, *, workers: int, concurrency: int = 1, queues: str = "",
                    flower: bool = True, flower_port: int | None = None,
                    echo: Callable[[str], None] = print, replicas: int = 0) -> LocalFarm:
    """The LocalFarm that ``up`` (and the demo) run, from the session's environment."""
    from .localfarm import LocalFarm, wants_embedded_redis
    from .renderenv import root_problem

    settings = session.local_settings
    if root_problem(settings):
        raise FarmError(root_problem(settings))
    if flower_port:
        settings = dataclasses.replace(settings, flower_port=flower_port)
    return LocalFarm(
        settings, workers=workers, concurrency=concurrency, queues=queues, flower=flower,
        embedded_redis=wants_embedded_redis(settings, session.environ), echo=echo,
        replicas=replicas,
    )
