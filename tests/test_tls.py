"""TLS between the farm's hosts and Redis: certificates from worker_image/make-certs.sh, a
real redis-server listening on TLS only (and asking clients for their certificate), a real
render node, Flower and the command line all on ``rediss://``, and every client that cannot
verify Redis (no CA, another CA, a name its certificate does not carry) or speaks plain
Redis refused."""

from __future__ import annotations

import os
import ssl
import stat
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
from celeryfarm.redisserver import ServerTls, free_port
from celeryfarm.testing.cluster import LocalCluster
from celeryfarm.tls import Tls

from .cli_fixtures import base_env, cli
from .conftest import WORKER_ENV, join, running
from .helpers import http_status, read_log, renderboot, submit, wait_for_state, wait_until

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "worker_image" / "make-certs.sh"
NODE = "tls-node"
PASSWORD = "tls-test-" + uuid.uuid4().hex


def make_certs(folder: Path, *args: str) -> Path:
    subprocess.run([str(MAKE_CERTS), "--dir", str(folder), *args], check=True,
                   capture_output=True, timeout=60)
    return folder


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def tls_farm(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[LocalCluster]:
    """A farm whose Redis listens on TLS only and requires client certificates, with one
    render node connected over ``rediss://``."""
    farm = LocalCluster(tmp_path_factory.mktemp("tls-farm"), extra_env=WORKER_ENV,
                        password=PASSWORD, tls=ServerTls(certs))
    with running(farm, [NODE]):
        yield farm


@pytest.fixture
def tls_env(tls_farm: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return join(tls_farm, monkeypatch)


def admin(farm: LocalCluster) -> redis.Redis:
    return redis.Redis.from_url(farm.redis.url, decode_responses=True,
                                **farm.redis.tls.client.redis_options(farm.redis.url))


def refusal(url: str, tls: Tls) -> str:
    """What a client with ``tls`` is told when it pings ``url`` (it must be refused)."""
    with pytest.raises(FarmError) as refused:
        check_redis(url, tls)
    return str(refused.value)


# -- the certificates ------------------------------------------------------------------------
def test_make_certs_keeps_keys_private_and_the_ca_key_apart(certs: Path):
    for key in ("ca/ca.key", "redis/redis.key", "client/client.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE((certs / "ca").stat().st_mode) == 0o700
    # What is mounted into containers (redis/, client/) holds no CA key.
    assert sorted(p.name for p in (certs / "redis").iterdir()) == \
        ["ca.crt", "redis.crt", "redis.key"]
    assert sorted(p.name for p in (certs / "client").iterdir()) == \
        ["ca.crt", "client.crt", "client.key"]
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "redis/redis.crt"), "-noout",
                           "-ext", "subjectAltName"], capture_output=True, text=True,
                          check=True).stdout
    for name in ("DNS:redis", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in text, text


def test_make_certs_again_keeps_the_ca_and_issues_new_certificates(tmp_path: Path):
    folder = make_certs(tmp_path / "certs")
    ca, server = (folder / "ca/ca.crt").read_bytes(), (folder / "redis/redis.crt").read_bytes()
    make_certs(folder, "--host", "farm.example.com", "--host", "10.20.30.40")
    assert (folder / "ca/ca.crt").read_bytes() == ca
    assert (folder / "redis/redis.crt").read_bytes() != server
    text = subprocess.run(["openssl", "x509", "-in", str(folder / "redis/redis.crt"), "-noout",
                           "-ext", "subjectAltName"], capture_output=True, text=True,
                          check=True).stdout
    assert "DNS:farm.example.com" in text and "IP Address:10.20.30.40" in text


# -- a farm on rediss:// ---------------------------------------------------------------------
def test_a_job_renders_on_a_node_connected_over_tls(tls_farm: LocalCluster, tls_env):
    assert tls_farm.redis.url.startswith("rediss://")
    assert admin(tls_farm).config_get("port")["port"] == "0"  # no plain-text port at all
    plugin = CeleryFarmPlugin()
    job_id, _ = submit(plugin.farm, [renderboot("--seconds", 0.2)] * 2, name="tls-job")
    assert wait_for_state(plugin, job_id) == Job.State.kCompleted, read_log(plugin, job_id)
    log = read_log(plugin, job_id).decode()
    assert "step 2/2 | exit status 0" in log and f"node {NODE}@" in log


def test_the_command_line_works_over_tls(tls_farm: LocalCluster, tls_env: dict[str, str]):
    env = base_env(**{k: v for k, v in tls_env.items() if k.startswith("CELERYFARM_")})
    result = cli(env, "submit", "--name", "tls-cli", "--", *renderboot("--seconds", "0.1"))
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[-1]
    plugin = CeleryFarmPlugin()
    assert wait_for_state(plugin, job_id) == Job.State.kCompleted
    status = cli(env, "status", "--json", job_id)
    assert status.returncode == 0 and '"Completed"' in status.stdout, status.stderr
    doctor = cli(env, "doctor")
    assert "rediss://" in doctor.stdout and "answers" in doctor.stdout, doctor.stdout


def test_flower_watches_the_farm_over_tls(tls_farm: LocalCluster, tls_env: dict[str, str]):
    port, auth = free_port(), ("admin", uuid.uuid4().hex)
    env = {**os.environ, "FLOWER_BASIC_AUTH": ":".join(auth)}
    flower = subprocess.Popen(
        [sys.executable, "-m", "celeryfarm.flower", "--address=127.0.0.1", f"--port={port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tls_farm.base)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{base}/healthcheck") == 200, 60, "Flower to start")
        # Its Celery connection (kombu) reaches the node, and its broker page (its own
        # redis-py client, from broker_use_ssl) reads the queues.
        wait_until(lambda: http_status(f"{base}/api/workers?refresh=1", auth) == 200
                   and NODE in _get(f"{base}/api/workers?refresh=1", auth), 60,
                   "Flower to see the node over TLS")
        assert http_status(f"{base}/broker", auth) == 200
        assert "renders" in _get(f"{base}/api/queues/length", auth)
    finally:
        flower.terminate()
        flower.wait(30)


def _get(url: str, auth: tuple[str, str]) -> str:
    import base64
    import urllib.request

    token = base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


# -- clients that must be refused ------------------------------------------------------------
def test_a_client_without_the_farm_ca_is_refused(tls_farm: LocalCluster):
    """The system's CAs do not know the farm's CA: no connection, and no fallback to an
    unverified one (what a bare rediss:// URL gives kombu)."""
    client = tls_farm.redis.tls.client
    no_ca = Tls(cert_file=client.cert_file, key_file=client.key_file)
    assert "certificate verify failed" in refusal(tls_farm.redis.url, no_ca)
    # kombu, given a rediss:// URL with no CA, would fall back to CERT_NONE; the farm's app
    # (node, plug-in, Flower) never does.
    app = Farm(Settings(broker_url=tls_farm.redis.url, tls=no_ca)).app
    with pytest.raises(kombu.exceptions.OperationalError, match="certificate verify failed"):
        app.connection().ensure_connection(max_retries=1)


def test_a_client_trusting_another_ca_is_refused(tls_farm: LocalCluster, tmp_path: Path):
    other = make_certs(tmp_path / "other") / "client"
    assert "certificate verify failed" in refusal(
        tls_farm.redis.url, Tls(str(other / "ca.crt"), str(other / "client.crt"),
                                str(other / "client.key")))


def test_a_name_the_certificate_does_not_carry_is_refused(tls_farm: LocalCluster):
    """Redis also listens on 127.0.0.2, which its certificate does not name: a client with
    the right CA that reaches it there refuses it."""
    server = admin(tls_farm)
    server.config_set("bind", "127.0.0.1 127.0.0.2")
    try:
        url = tls_farm.redis.url.replace("127.0.0.1", "127.0.0.2")
        assert "match" in refusal(url, tls_farm.redis.tls.client)
    finally:
        server.config_set("bind", "127.0.0.1")


def test_a_client_without_a_certificate_of_its_own_is_refused(tls_farm: LocalCluster):
    """Redis requires client certificates (tls-auth-clients yes): the CA alone is not
    enough."""
    ca_only = Tls(ca_file=tls_farm.redis.tls.client.ca_file)
    refusal(tls_farm.redis.url, ca_only)


def test_a_plain_redis_client_is_refused_by_the_tls_port(tls_farm: LocalCluster):
    plain = tls_farm.redis.url.replace("rediss://", "redis://")
    client = redis.Redis.from_url(plain, socket_timeout=5, socket_connect_timeout=5)
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_node_without_the_ca_does_not_start(tls_farm: LocalCluster, tmp_path: Path):
    """``celeryfarm worker`` checks Redis before it joins: a one-line error, exit status."""
    env = base_env(**{**{k: v for k, v in tls_farm.env.items() if k.startswith("CELERYFARM_")},
                      "CELERYFARM_TLS_CA_FILE": str(make_certs(tmp_path / "x") / "ca/ca.crt")})
    result = cli(env, "worker", "--name", "untrusting", timeout=120)
    assert result.returncode != 0
    assert "certificate verify failed" in result.stderr
    assert "Traceback" not in result.stderr


# -- settings --------------------------------------------------------------------------------
URL = "rediss://:pw@redis:6379/0"


@pytest.mark.parametrize("reqs", ["none", "CERT_NONE", "optional", "CERT_OPTIONAL"])
def test_urls_that_turn_verification_off_are_refused(reqs: str):
    with pytest.raises(ConfigError, match=f"ssl_cert_reqs={reqs} would not verify"):
        Settings.from_env({"CELERYFARM_BROKER_URL": f"{URL}?ssl_cert_reqs={reqs}"})
    with pytest.raises(ConfigError, match="RESULT_BACKEND: ssl_cert_reqs"):
        Settings(broker_url=URL, result_backend=f"{URL}?ssl_cert_reqs={reqs}")


def test_tls_files_in_a_url_are_refused_for_the_settings():
    with pytest.raises(ConfigError, match="ssl_ca_certs in the URL is not used; give TLS "
                                          "files in CELERYFARM_TLS_CA_FILE"):
        Settings(broker_url=f"{URL}?ssl_ca_certs=/etc/ca.crt")
    assert Settings(broker_url=f"{URL}?ssl_cert_reqs=required").broker_url


def test_tls_is_all_or_nothing():
    with pytest.raises(ConfigError, match="STORE_URL is redis:// but CELERYFARM_BROKER_URL "
                                          "is rediss://"):
        Settings(broker_url=URL, store_url="redis://:pw@redis:6379/0")
    with pytest.raises(ConfigError, match="TLS_\\* files are set but CELERYFARM_BROKER_URL "
                                          "is redis://"):
        Settings(broker_url="redis://:pw@redis:6379/0", tls=Tls(ca_file="/etc/ca.crt"))


def test_tls_files_must_be_readable_and_come_in_pairs(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"TLS_CA_FILE: cannot read .*missing\.crt"):
        Settings.from_env({"CELERYFARM_BROKER_URL": URL,
                           "CELERYFARM_TLS_CA_FILE": str(tmp_path / "missing.crt")})
    (tmp_path / "c.crt").write_text("x")
    with pytest.raises(ConfigError, match="TLS_CERT_FILE and CELERYFARM_TLS_KEY_FILE go "
                                          "together"):
        Settings.from_env({"CELERYFARM_BROKER_URL": URL,
                           "CELERYFARM_TLS_CERT_FILE": str(tmp_path / "c.crt")})


def test_every_client_verifies_the_certificate_and_the_name(certs: Path):
    env = {"CELERYFARM_BROKER_URL": URL,
           "CELERYFARM_TLS_CA_FILE": str(certs / "client/ca.crt"),
           "CELERYFARM_TLS_CERT_FILE": str(certs / "client/client.crt"),
           "CELERYFARM_TLS_KEY_FILE": str(certs / "client/client.key")}
    settings = Settings.from_env(env)
    config = celery_config(settings)
    for options in (config["broker_use_ssl"], config["redis_backend_use_ssl"]):
        assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert options["ssl_check_hostname"] is True
        assert options["ssl_ca_certs"] == env["CELERYFARM_TLS_CA_FILE"]
    records = settings.tls.redis_options(settings.records_url)
    assert (records["ssl_cert_reqs"], records["ssl_check_hostname"]) == ("required", True)
    # A joined process (``celeryfarm env``, a node) gets the same files.
    assert {k: v for k, v in settings.client_environment().items() if "TLS" in k} == \
        {k: v for k, v in env.items() if "TLS" in k}
    assert "broker_use_ssl" not in celery_config(Settings())
