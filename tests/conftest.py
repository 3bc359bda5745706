"""Fixtures: a real redis-server and real prefork Celery workers, shared by the session.

Every test gets its own ``CELERYFARM_USER`` so ``getJobs(None)`` sees only its own jobs.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator

import pytest

from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.plugin import KATANA_RESOURCES, CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

#: Short timings so stops and lost nodes resolve quickly in tests.
WORKER_ENV = {
    "CELERYFARM_STOP_GRACE_SECONDS": "1",
    "CELERYFARM_POLL_SECONDS": "0.1",
    "CELERYFARM_LEASE_SECONDS": "6",
    "CELERYFARM_REAP_SECONDS": "0.5",
}
NODES = ("node1", "node2")


@contextlib.contextmanager
def running(farm: LocalCluster, nodes: Iterable[str], concurrency: int = 1
            ) -> Iterator[LocalCluster]:
    """``farm`` started with these render nodes, all answering; stopped on the way out."""
    farm.start()
    try:
        for name in nodes:
            farm.start_worker(name, concurrency=concurrency)
        farm.wait_for_workers(Farm(Settings.from_env(farm.env)).app, list(nodes))
        yield farm
    finally:
        farm.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A farm of two single-slot render nodes, so two jobs run on two different nodes."""
    with running(LocalCluster(tmp_path_factory.mktemp("farm"), extra_env=WORKER_ENV),
                 NODES) as farm:
        yield farm


def join(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Put ``cluster``'s environment in this process, with a user of this test's own."""
    env = {**cluster.env, "CELERYFARM_USER": f"artist-{uuid.uuid4().hex[:8]}"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def farm_env(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The farm's environment in this process, with a user of this test's own."""
    return join(cluster, monkeypatch)


@pytest.fixture
def plugin(farm_env: dict[str, str]) -> CeleryFarmPlugin:
    """The plug-in as Katana builds it: no arguments, configured by the environment."""
    return CeleryFarmPlugin()


@pytest.fixture(scope="session")
def katana_dropin() -> dict:
    """The package's ``katana/Plugins/CeleryFarmPlugin.py`` loaded as Katana loads it from
    ``KATANA_RESOURCES`` (which registers the farm settings with the FarmAPI stand-in); its
    globals."""
    import runpy

    return runpy.run_path(str(KATANA_RESOURCES / "Plugins" / "CeleryFarmPlugin.py"))
