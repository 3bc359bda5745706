"""Flower's broker page and ``/api/queues/length`` on a farm behind Redis Sentinel (real
redis-servers: a primary, two replicas, three sentinels; no render node, so submitted steps
wait in the queue): the lengths are read through the sentinels, from the primary they name,
and still after the primary dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.redisserver import ReplicatedRedis, free_port
from celeryfarm.testing.cluster import LocalCluster

from .conftest import WORKER_ENV, join
from .helpers import http_status, renderboot, submit, wait_until
from .test_tls import _get

AUTH = ("admin", uuid.uuid4().hex)
JOBS = 3


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("sentinel-flower"), extra_env=WORKER_ENV,
                           password="flower-" + uuid.uuid4().hex, replicas=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def flower(farm: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """Flower as celeryfarm runs it, on the sentinels' URL; its address."""
    port = free_port()
    env = {**os.environ, **farm.env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}
    with open(tmp_path / "flower.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celeryfarm.flower", "--address=127.0.0.1",
             f"--port={port}"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(f"{url}/healthcheck") == 200 or process.poll() is not None,
                   60, "Flower to answer")
        assert process.poll() is None, (tmp_path / "flower.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(30)


def waiting(flower: str) -> int | None:
    """The steps waiting in the farm's queue, as Flower's API says (None: not listed, or
    no primary to ask: while the sentinels fail over, they name none and Flower answers
    500)."""
    try:
        answer = _get(f"{flower}/api/queues/length", AUTH)
    except urllib.error.HTTPError as error:
        if error.code != 500:
            raise
        return None
    queues = json.loads(answer)["active_queues"]
    return next((queue["messages"] for queue in queues if queue["name"] == "renders"), None)


def test_flower_reads_queue_lengths_through_the_sentinels_and_after_a_failover(
        farm: LocalCluster, flower: str, monkeypatch: pytest.MonkeyPatch):
    join(farm, monkeypatch)
    plugin = CeleryFarmPlugin()
    for n in range(JOBS):
        submit(plugin.farm, [renderboot("--seconds", 0.1)], name=f"queued-{n}")
    assert wait_until(lambda: waiting(flower) == JOBS, 30, f"Flower to count {JOBS} steps")
    page = _get(f"{flower}/broker", AUTH)
    assert "renders" in page and "Unable to get queues" not in page

    replicated = farm.redis
    assert isinstance(replicated, ReplicatedRedis)
    old = replicated.primary()
    queued = plugin.farm.app.conf.broker_transport_options["global_keyprefix"] + "renders:5"
    replicas = [redis.Redis.from_url(server.url) for server in replicated.servers
                if server is not old]
    wait_until(lambda: all(client.llen(queued) == JOBS for client in replicas), 30,
               "both replicas to have the queued steps")
    old.process.kill()
    old.process.wait()
    wait_until(lambda: replicated.primary() is not old, 60, "a replica to be promoted")
    assert wait_until(lambda: waiting(flower) == JOBS, 60,
                      "Flower to count the steps on the new primary")
