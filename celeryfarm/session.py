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

from .config import PREFIX, Settings, names_farm_redis
from .errors import FarmError, JobNotFound
from .jobs import JobRecord
from .records.keys import owner_free

if TYPE_CHECKING:
    from .farm import Farm
    from .localfarm import LocalFarm

#: What may name a job: its id (its owner, then 32 hex digits) or a unique start of it or
#: of its hex digits.
_JOB_ID = re.compile(r"[^\s]{1,300}")
_FULL_ID = re.compile(r".+\.[0-9a-f]{32}")


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
    def node_settings(self) -> Settings:
        """Settings for a render node: as :attr:`settings`, with the node user's
        credential for the running local farm."""
        from .localfarm import client_environment

        return Settings.from_env(client_environment(self.environ, node=True))

    @cached_property
    def farm(self) -> Farm:
        from .farm import Farm
        from .localfarm import check_redis

        settings = self.settings
        # One quick, clear error rather than long retries.
        check_redis(settings.broker_url, settings.tls, settings.sentinel_master,
                    settings.sentinel_password)
        if settings.records_url != settings.broker_url:
            check_redis(settings.records_url, settings.tls, settings.sentinel_master,
                        settings.sentinel_password)
        return Farm(settings)

    def point_at(self, env: dict[str, str]) -> None:
        """Use the farm these variables name from now on (the farm the demo started)."""
        self.environ.update(env)
        for name in ("client_environ", "settings", "node_settings", "farm", "admin_farm"):
            self.__dict__.pop(name, None)

    @cached_property
    def admin_farm(self) -> Farm:
        """The farm as its admin, where this machine has the admin's credential (the farm
        ``up`` runs here, or CELERYFARM_ADMIN_URL): for the farm-wide commands (drain,
        enable, limit set) that artists may not run. Else as :attr:`farm`."""
        from .farm import Farm

        try:
            url = self.admin_url()
        except FarmError:
            return self.farm
        return Farm(dataclasses.replace(self.settings, broker_url=url, result_backend="",
                                        store_url=""))

    def admin_url(self) -> str:
        """The Redis URL with the admin user's credential: CELERYFARM_ADMIN_URL, or that
        of the farm ``celeryfarm up`` runs here."""
        from .localfarm import embedded_admin_url

        url = self.local_settings.admin_url
        if not url and not names_farm_redis(self.environ):  # the farm `up` runs here
            url = embedded_admin_url(self.local_settings.data_dir)
        if not url:
            raise FarmError(f"no admin credential: set {PREFIX}ADMIN_URL (or "
                            f"{PREFIX}ADMIN_URL_FILE) to the farm's Redis URL with the admin "
                            f"user's password, or run this where `celeryfarm up` runs the farm")
        return url

    def resolve(self, text: str) -> str:
        """The full id of a job given by its id or a unique prefix of it (as git does)."""
        wanted = text.strip()
        if not _JOB_ID.fullmatch(wanted):
            raise JobNotFound(text)
        if _FULL_ID.fullmatch(wanted):
            return wanted
        matches = [job_id for job_id in self.farm.job_ids()
                   if job_id.startswith(wanted) or owner_free(job_id).startswith(wanted)]
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
