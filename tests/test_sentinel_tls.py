"""TLS through Redis Sentinel: a primary, two replicas and three sentinels, every one a real
redis-server listening on TLS only and asking its clients for a certificate signed by the
farm's CA (worker_image/make-certs.sh); a real render node, the plug-in, the command line
and Flower on the sentinels' ``sentinel://`` URL with the ``CELERYFARM_TLS_*`` files; the
primary killed mid-farm; clients that cannot verify the sentinels refused."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu.exceptions
import pytest
import redis

from celeryfarm.celery import celery_config
from celeryfarm.config import Settings
from celeryfarm.errors import ConfigError, FarmError
from celeryfarm.farm import Farm
from celeryfarm.farmapi import Job
from celeryfarm.localfarm import check_redis
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.redisserver import ReplicatedRedis, ServerTls, free_port
from celeryfarm.testing.cluster import LocalCluster
from celeryfarm.tls import Tls

from .cli_fixtures import base_env, cli
from .conftest import WORKER_ENV, join, running
from .helpers import http_status, read_log, renderboot, submit, wait_for_state, wait_until
from .test_tls import _get, make_certs

NODE = "tls-sentinel-node"
URL = "sentinel://:pw@farm-a:26379/0;sentinel://farm-b:26379/0"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("tls-sentinel"), extra_env=WORKER_ENV,
                           password="tls-sentinel-" + uuid.uuid4().hex, replicas=2,
                           tls=ServerTls(certs))
    with running(cluster, [NODE]):
        yield cluster


@pytest.fixture
def env(farm: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return join(farm, monkeypatch)


def servers(farm: LocalCluster) -> ReplicatedRedis:
    assert isinstance(farm.redis, ReplicatedRedis)
    return farm.redis


def test_every_server_and_sentinel_speaks_tls_only(farm: LocalCluster):
    replicated = servers(farm)
    assert replicated.url.startswith("sentinel://") and farm.env["CELERYFARM_TLS_CA_FILE"]
    for server in [*replicated.servers, *replicated.sentinels]:
        plain = redis.Redis(port=server.port, socket_timeout=5, socket_connect_timeout=5,
                            retry=None)
        with pytest.raises(redis.ConnectionError):
            plain.ping()


def test_jobs_render_through_the_sentinels_over_tls_and_after_a_failover(
        farm: LocalCluster, env: dict[str, str]):
    """A job renders on a node that reached the primary through the sentinels, all over TLS;
    the primary is killed, a replica promoted, and a job submitted afterwards, by the
    plug-in and by the command line, renders too."""
    plugin = CeleryFarmPlugin()
    before, _ = submit(plugin.farm, [renderboot("--seconds", 0.2)] * 2, name="tls-before")
    assert wait_for_state(plugin, before) == Job.State.kCompleted, read_log(plugin, before)
    assert f"node {NODE}@" in read_log(plugin, before).decode()

    replicated = servers(farm)
    old = replicated.primary()
    old.process.kill()
    old.process.wait()
    wait_until(lambda: replicated.primary() is not old, 60, "a replica to be promoted")

    after, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)], name="tls-after")
    assert wait_for_state(plugin, after, timeout=120) == Job.State.kCompleted, \
        read_log(plugin, after)
    assert plugin.getJobState(before) == Job.State.kCompleted
    cli_env = base_env(**{k: v for k, v in env.items() if k.startswith("CELERYFARM_")})
    result = cli(cli_env, "submit", "--name", "tls-cli", "--",
                 *renderboot("--seconds", "0.1"))
    assert result.returncode == 0, result.stderr
    assert wait_for_state(plugin, result.stdout.split()[-1], timeout=120) == \
        Job.State.kCompleted
    doctor = cli(cli_env, "doctor")
    assert "answers" in doctor.stdout, doctor.stdout + doctor.stderr


def test_flower_reads_the_queues_through_the_sentinels_over_tls(
        farm: LocalCluster, env: dict[str, str]):
    port, auth = free_port(), ("admin", uuid.uuid4().hex)
    flower = subprocess.Popen(
        [sys.executable, "-m", "celeryfarm.flower", "--address=127.0.0.1", f"--port={port}"],
        env={**os.environ, "FLOWER_BASIC_AUTH": ":".join(auth)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=farm.base)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{base}/healthcheck") == 200, 60, "Flower to start")
        wait_until(lambda: NODE in _get(f"{base}/api/workers?refresh=1", auth), 60,
                   "Flower to see the node over TLS")
        assert http_status(f"{base}/broker", auth) == 200
        assert '"name": "renders"' in _get(f"{base}/api/queues/length", auth)
    finally:
        flower.terminate()
        flower.wait(30)


def test_a_client_without_the_farm_ca_is_refused_by_the_sentinels(farm: LocalCluster):
    """No connection to a sentinel it cannot verify, and no fallback to an unverified one,
    for the records' client and for kombu."""
    client = servers(farm).tls.client
    no_ca = Tls(cert_file=client.cert_file, key_file=client.key_file)
    url = servers(farm).url
    with pytest.raises(FarmError, match="certificate verify failed"):
        check_redis(url, no_ca, servers(farm).master)
    app = Farm(Settings(broker_url=url, tls=no_ca)).app
    with pytest.raises(kombu.exceptions.OperationalError):
        app.connection().ensure_connection(max_retries=1)


def test_a_client_trusting_another_ca_is_refused_by_the_sentinels(
        farm: LocalCluster, tmp_path: Path):
    other = make_certs(tmp_path / "other") / "client"
    with pytest.raises(FarmError):
        check_redis(servers(farm).url, Tls(str(other / "ca.crt"), str(other / "client.crt"),
                                           str(other / "client.key")), servers(farm).master)


# -- settings --------------------------------------------------------------------------------
def test_sentinel_with_tls_files_verifies_sentinels_and_servers(certs: Path):
    """TLS through Sentinel: on with the TLS files (a sentinel:// URL has no TLS form), for
    the sentinels and the servers, kombu, Celery's backend and the records alike, each
    certificate and host name verified."""
    tls = Tls(str(certs / "client/ca.crt"), str(certs / "client/client.crt"),
              str(certs / "client/client.key"))
    settings = Settings(broker_url=URL, tls=tls)
    assert tls.encrypts(URL) and not Tls().encrypts(URL)
    config = celery_config(settings)
    for options in (config["broker_use_ssl"], config["redis_backend_use_ssl"]):
        assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert options["ssl_check_hostname"] is True
        assert options["ssl_ca_certs"] == tls.ca_file
    for transport in ("broker_transport_options", "result_backend_transport_options"):
        sentinels = config[transport]["sentinel_kwargs"]
        assert sentinels["ssl"] is True and sentinels["ssl_check_hostname"] is True
        assert (sentinels["ssl_cert_reqs"], sentinels["ssl_certfile"]) == \
            ("required", tls.cert_file)
    # The broker's sentinels keep the timeouts that let a node leave a frozen primary.
    assert config["broker_transport_options"]["sentinel_kwargs"]["socket_timeout"] == 10
    plain = celery_config(Settings(broker_url=URL))
    assert "broker_use_ssl" not in plain
    assert "sentinel_kwargs" not in plain["broker_transport_options"]


def test_tls_through_sentinel_is_still_all_or_nothing():
    with pytest.raises(ConfigError, match="STORE_URL is redis:// but CELERYFARM_BROKER_URL "
                                          "is sentinel:// with TLS"):
        Settings(broker_url=URL, store_url="redis://:pw@redis:6379/0",
                 tls=Tls(ca_file="/etc/ca.crt"))
