"""Sentinels that ask for a password (real redis-server sentinels): a client without it is
refused; the farm's clients' password lets them find the primary and nothing else; the
sentinels fail over among themselves with their own user; the compose preflight's ACL file
is one a real sentinel loads; every Sentinel client of the farm is given the password."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from celeryfarm import acl
from celeryfarm.celery import celery_config
from celeryfarm.config import Settings
from celeryfarm.errors import FarmError
from celeryfarm.localfarm import check_redis
from celeryfarm.redisserver import ReplicatedRedis, SentinelServer, free_port
from celeryfarm.tls import Tls

from .helpers import wait_until

PASSWORD = "servers-" + uuid.uuid4().hex
CLIENTS = "clients-" + uuid.uuid4().hex
MASTER = "celeryfarm"
#: What the farm's clients' password must not allow: reconfiguring the sentinels (and with
#: them every client: a rogue primary would collect the nodes' passwords).
DENIED = [
    ("SENTINEL", "SET", MASTER, "down-after-milliseconds", "100"),
    ("SENTINEL", "SET", MASTER, "auth-pass", "stolen"),
    ("SENTINEL", "FAILOVER", MASTER),
    ("SENTINEL", "REMOVE", MASTER),
    ("SENTINEL", "RESET", "*"),
    ("SENTINEL", "MONITOR", "rogue", "127.0.0.1", "6379", "1"),
    ("SENTINEL", "CONFIG", "SET", "resolve-hostnames", "yes"),
    ("SENTINEL", "FLUSHCONFIG"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "default", "+@all"),
    ("SHUTDOWN", "NOSAVE"),
    ("CLIENT", "KILL", "TYPE", "normal"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedRedis]:
    replicated = ReplicatedRedis(tmp_path_factory.mktemp("sentinel-auth"), replicas=1,
                                 password=PASSWORD, down_after_ms=1000,
                                 sentinel_password=CLIENTS)
    with replicated:
        yield replicated


def sentinel_client(sentinel: SentinelServer, username: str | None = None,
                    password: str | None = None) -> redis.Redis:
    return redis.Redis(port=sentinel.port, username=username, password=password,
                       socket_timeout=5, decode_responses=True)


def test_a_client_without_the_password_is_refused_by_every_sentinel(
        servers: ReplicatedRedis):
    for sentinel in servers.sentinels:
        for password in (None, "wrong-" + uuid.uuid4().hex):
            with pytest.raises(redis.AuthenticationError):
                sentinel_client(sentinel, password=password).sentinel_get_master_addr_by_name(
                    MASTER)
    # redis-py's Sentinel (kombu's, Celery's) finds no primary; the farm's check says why.
    anonymous = Sentinel([("127.0.0.1", s.port) for s in servers.sentinels],
                         sentinel_kwargs={"socket_timeout": 5})
    with pytest.raises(MasterNotFoundError):
        anonymous.discover_master(MASTER)
    with pytest.raises(FarmError, match="no sentinel answers"):
        check_redis(servers.url, master=MASTER)
    check_redis(servers.url, master=MASTER, sentinel_password=CLIENTS)


def test_the_clients_password_finds_the_primary_and_reconfigures_nothing(
        servers: ReplicatedRedis):
    sentinel = servers.sentinels[0]
    client = sentinel_client(sentinel, password=CLIENTS)
    primary = servers.primary()
    assert client.sentinel_get_master_addr_by_name(MASTER) == ("127.0.0.1", primary.port)
    assert client.sentinel_master(MASTER)["port"] == primary.port
    assert len(client.sentinel_slaves(MASTER)) == 1
    assert len(client.execute_command("SENTINEL", "REPLICAS", MASTER)) == 1
    assert len(client.sentinel_sentinels(MASTER)) == 2
    assert client.ping()
    for command in DENIED:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    # Nothing changed: the same primary, watched as before, by the same sentinels.
    assert client.sentinel_master(MASTER)["down-after-milliseconds"] == 1000
    assert client.sentinel_get_master_addr_by_name(MASTER) == ("127.0.0.1", primary.port)
    assert sentinel.process is not None and sentinel.process.poll() is None


def test_the_sentinels_own_user_only_talks_to_sentinels_and_admin_may_reconfigure(
        servers: ReplicatedRedis):
    sentinel = servers.sentinels[1]
    peer = sentinel_client(sentinel, acl.SENTINEL, PASSWORD)
    assert peer.ping()
    for command in DENIED[:6]:
        with pytest.raises(redis.exceptions.NoPermissionError):
            peer.execute_command(*command)
    admin = sentinel_client(sentinel, acl.ADMIN, PASSWORD)
    assert admin.execute_command("SENTINEL", "SET", MASTER, "down-after-milliseconds",
                                 "1000") == "OK"
    # The admin sees every user and hash, never a password in the clear.
    listed = " ".join(admin.execute_command("ACL", "LIST"))
    assert CLIENTS not in listed and PASSWORD not in listed
    # The sentinels' configuration files (owner-only) hold no client password either.
    for each in servers.sentinels:
        conf = each.data_dir / "sentinel.conf"
        assert CLIENTS not in conf.read_text()
        assert conf.stat().st_mode & 0o077 == 0


def test_the_sentinels_answer_redis_pys_sentinel_with_the_password(servers: ReplicatedRedis):
    """What kombu and Celery use: redis-py's Sentinel, given the password, finds the
    primary and the replicas and follows them (the farm's own client too)."""
    sentinels = Sentinel([("127.0.0.1", s.port) for s in servers.sentinels],
                         sentinel_kwargs={"password": CLIENTS, "socket_timeout": 5})
    assert sentinels.discover_master(MASTER) == ("127.0.0.1", servers.primary().port)
    assert sentinels.discover_slaves(MASTER) == [("127.0.0.1", servers.servers[1].port)]
    primary = sentinels.master_for(MASTER, password=PASSWORD, socket_timeout=5)
    assert primary.set("celeryfarm:sentinel-auth", "ok")


def test_the_sentinels_fail_over_with_their_own_user(servers: ReplicatedRedis):
    """The sentinels agree the primary is down and elect a leader through each other (as
    ``sentinel``): the primary SIGKILLed, a replica is promoted, and no sentinel refused
    another anything (their ACL logs are empty)."""
    for sentinel in servers.sentinels:  # the refusals of the tests above
        sentinel_client(sentinel, acl.ADMIN, PASSWORD).execute_command("ACL", "LOG", "RESET")
    old = servers.primary()
    assert old.process is not None
    old.process.kill()
    old.process.wait()
    wait_until(lambda: servers.primary() is not old, 60, "the sentinels to promote a replica")
    for sentinel in servers.sentinels:
        admin = sentinel_client(sentinel, acl.ADMIN, PASSWORD)
        assert admin.execute_command("ACL", "LOG") == []


# -- the compose preflight ------------------------------------------------------------------
def sentinel_preflight(path: Path, environ: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CELERYFARM_")},
           **environ}
    return subprocess.run([sys.executable, "-m", "celeryfarm.acl", "--sentinels", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_preflight_writes_the_sentinels_users_a_sentinel_loads(tmp_path: Path):
    passwords = {acl.SENTINEL_CLIENT: CLIENTS, acl.SENTINEL: PASSWORD,
                 acl.ADMIN: "admin-" + uuid.uuid4().hex}
    environ = {acl.SENTINEL_PASSWORD_VARIABLES[user]: password
               for user, password in passwords.items()}
    path = tmp_path / "sentinels.acl"
    refused = sentinel_preflight(path, {**environ, "CELERYFARM_SENTINEL_PASSWORD": ""})
    assert refused.returncode != 0 and "CELERYFARM_SENTINEL_PASSWORD not set" in refused.stderr
    assert not path.exists()
    assert sentinel_preflight(path, environ).returncode == 0
    assert not any(password in path.read_text() for password in passwords.values())
    # As docker-compose.sentinel.yml runs it: its users from the preflight's file.
    port = free_port()  # no server: the sentinel only has to know of it
    sentinel = SentinelServer(tmp_path / "sentinel", port, MASTER, client_password=CLIENTS,
                              acl_lines=[f"aclfile {path}"]).start()
    try:
        with pytest.raises(redis.AuthenticationError):
            sentinel_client(sentinel).ping()
        client = sentinel_client(sentinel, password=CLIENTS)
        assert client.sentinel_master(MASTER)["port"] == port
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("SENTINEL", "REMOVE", MASTER)
        assert sentinel_client(sentinel, acl.SENTINEL, PASSWORD).ping()
        admin = sentinel_client(sentinel, acl.ADMIN, passwords[acl.ADMIN])
        assert admin.execute_command("SENTINEL", "REMOVE", MASTER) == "OK"
    finally:
        sentinel.stop()


# -- settings ---------------------------------------------------------------------------------
def test_every_sentinel_client_is_given_the_password(tmp_path: Path):
    """kombu's transport and Celery's result backend get it in their ``sentinel_kwargs``,
    merged with the TLS options; it may come from a file; the environment of the farm's
    processes carries it; a plain Redis URL needs none."""
    url = "sentinel://:pw@10.0.0.1:26379/0;sentinel://10.0.0.2:26379/0"
    secret = tmp_path / "sentinel-password"
    secret.write_text(CLIENTS + "\n")
    settings = Settings.from_env({"CELERYFARM_BROKER_URL": url,
                                  "CELERYFARM_SENTINEL_PASSWORD_FILE": str(secret)})
    assert settings.sentinel_password == CLIENTS
    assert settings.client_environment()["CELERYFARM_SENTINEL_PASSWORD"] == CLIENTS
    config = celery_config(settings)
    broker = config["broker_transport_options"]["sentinel_kwargs"]
    assert broker == {"socket_timeout": 10, "socket_connect_timeout": 5, "password": CLIENTS}
    assert config["result_backend_transport_options"]["sentinel_kwargs"] == {
        "password": CLIENTS}
    tls = Tls(ca_file=str(secret))
    with_tls = celery_config(Settings(broker_url=url, tls=tls, sentinel_password=CLIENTS))
    for options in ("broker_transport_options", "result_backend_transport_options"):
        merged = with_tls[options]["sentinel_kwargs"]
        assert merged["password"] == CLIENTS and merged["ssl"] is True
        assert merged["ssl_ca_certs"] == str(secret)
    plain = Settings(broker_url="redis://:pw@10.0.0.1:6379/0", sentinel_password=CLIENTS)
    assert "sentinel_kwargs" not in celery_config(plain)["broker_transport_options"]
