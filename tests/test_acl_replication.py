"""``python -m celeryfarm.acl --replication PATH``, the preflight of
docker-compose.sentinel.yml: the farm's roles and the replicas' and sentinels' users, with
the passwords of its environment as hashes, which a real Redis then loads."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from celeryfarm import acl
from celeryfarm.redisserver import RedisServer

ROLES = (*acl.ROLES, *acl.REPLICATION_ROLES)


def preflight(path: Path, passwords: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CELERYFARM_")},
           **{acl.password_variable(role): password for role, password in passwords.items()}}
    return subprocess.run([sys.executable, "-m", "celeryfarm.acl", "--replication", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_sentinel_preflight_writes_the_replication_users(tmp_path: Path):
    passwords = {role: uuid.uuid4().hex for role in ROLES}
    path = tmp_path / "roles.acl"
    assert preflight(path, passwords).returncode == 0
    assert not any(password in path.read_text() for password in passwords.values())
    server = RedisServer(tmp_path / "redis", password=passwords[acl.ADMIN], user=acl.ADMIN,
                         acl_file=path).start()
    try:
        # Each logs in with its password (replica and sentinel may not even ask who they are).
        for role in ROLES:
            client = redis.Redis(port=server.port, username=role, password=passwords[role])
            assert client.ping()
        replica = redis.Redis(port=server.port, username=acl.REPLICA,
                              password=passwords[acl.REPLICA])
        with pytest.raises(redis.exceptions.NoPermissionError):
            replica.get("celeryfarm:anything")
        sentinel = redis.Redis(port=server.port, username=acl.SENTINEL,
                               password=passwords[acl.SENTINEL])
        assert sentinel.info("replication")["role"] == "master"
        with pytest.raises(redis.exceptions.NoPermissionError):
            sentinel.set("celeryfarm:anything", "x")
    finally:
        server.stop()


def test_the_sentinel_preflight_refuses_a_missing_replication_password(tmp_path: Path):
    passwords = {role: uuid.uuid4().hex for role in ROLES if role != acl.SENTINEL}
    refused = preflight(tmp_path / "roles.acl", passwords)
    assert refused.returncode != 0
    assert "CELERYFARM_REDIS_SENTINEL_PASSWORD not set" in refused.stderr
    assert not (tmp_path / "roles.acl").exists()
