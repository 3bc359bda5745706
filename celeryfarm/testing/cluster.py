"""A farm on this machine for tests and benchmarks: a private Redis (or a replicated one with
sentinels) and real render nodes.

Nodes are real ``celeryfarm worker`` processes (prefork pool), started with the same
``CELERYFARM_*`` environment a render node would have.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import redis
from celery import Celery

from .. import acl
from ..config import Settings
from ..redisserver import RedisServer, ReplicatedRedis, ServerTls
from ..tls import Tls
from ..worker import celery_command, node_command, wait_for_workers


class LocalCluster:
    """A Redis and some render-node workers sharing one shared root under ``base``."""

    def __init__(self, base: Path, extra_env: Mapping[str, str] | None = None,
                 password: str = "", acl_users: bool = False, tls: ServerTls | None = None,
                 replicas: int = 0) -> None:
        """With ``acl_users``, Redis has the farm's ACL roles (:mod:`celeryfarm.acl`) and
        the nodes use the ``node`` user; :meth:`url_as` and :meth:`add_artist` give the
        others' credentials. With ``replicas``, a primary, its replicas and three sentinels
        that fail over within seconds of the primary's death (with ``password``, not ACL
        users; with ``tls``, all of them on TLS only)."""
        if replicas and acl_users:
            raise ValueError("a LocalCluster with replicas has a password only")
        self.base = Path(base)
        self.shared_root = self.base / "shared"
        self.passwords = {role: acl.new_password() for role in acl.ROLES} if acl_users else {}
        self.redis: RedisServer | ReplicatedRedis
        if replicas:
            replicated = ReplicatedRedis(self.base / "redis", replicas, password,
                                         down_after_ms=1000)
            self.redis = replicated.use_tls(tls) if tls else replicated
        else:
            self.redis = RedisServer(
                self.base / "redis", password=self.passwords.get(acl.ADMIN, password),
                acl_file=self.base / "redis" / "users.acl" if acl_users else None,
                user=acl.ADMIN if acl_users else "", tls=tls)
        self.extra_env = dict(extra_env or {})
        self.workers: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The ``CELERYFARM_*`` variables every client and worker of this farm uses."""
        url = self.url_as(acl.NODE) if self.passwords else self.redis.url
        tls = self.redis.tls.client if self.redis.tls else Tls()
        settings = Settings(broker_url=url, shared_root=self.shared_root, tls=tls)
        # Tests and CI run as root; the nodes are told they may (--allow-root).
        allow_root = {"CELERYFARM_ALLOW_ROOT": "1"} if os.geteuid() == 0 else {}
        return {**settings.client_environment(), **allow_root, **self.extra_env}

    def start(self) -> LocalCluster:
        self.shared_root.mkdir(parents=True, exist_ok=True)
        if isinstance(self.redis, RedisServer) and self.redis.acl_file is not None:
            self.redis.acl_file.parent.mkdir(parents=True, exist_ok=True)
            users = acl.role_users(self.settings, self.passwords)
            self.redis.acl_file.write_text(acl.acl_file(users))
        self.redis.start()
        return self

    @property
    def settings(self) -> Settings:
        return Settings.from_env({**self.extra_env, "CELERYFARM_BROKER_URL": self.redis.url})

    def url_as(self, role: str) -> str:
        """The Redis URL with the credentials of one of the farm's roles."""
        user = acl.FarmUser(role, self.passwords[role], ())
        return user.url(self.redis.url)

    def add_artist(self, name: str, wrangler: bool = False) -> str:
        """Make an artist's Redis user; its Redis URL."""
        user = acl.artist_user(name, self.settings, wrangler)
        admin = redis.Redis.from_url(self.redis.url)
        try:
            acl.set_user(admin, user)
        finally:
            admin.close()
        return user.url(self.redis.url)

    def start_worker(
        self, name: str, concurrency: int = 2, queues: str = "renders",
        env: Mapping[str, str] | None = None, app: str = "", events: bool = False,
    ) -> subprocess.Popen:
        """Start a render node, or with ``app`` a bare ``celery -A app worker`` (the
        benchmarks' baselines); :meth:`wait_for_workers` tells when it is ready."""
        argv = (celery_command(app, name, concurrency, queues, events) if app
                else node_command(name, concurrency, queues))
        log = open(self.base / f"worker-{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(
            argv, env={**os.environ, **self.env, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.base,
        )
        log.close()
        self.workers[name] = process
        return process

    def wait_for_workers(self, app: Celery, names: list[str], timeout: float = 60.0) -> None:
        """Wait until every named worker answers a ping, or raise ``TimeoutError``."""
        wait_for_workers(
            app, names,
            exited=lambda: [n for n in names if self.workers[n].poll() is not None],
            timeout=timeout, hint=f"see {self.base}/worker-*.log",
        )

    def stop_worker(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        process = self.workers.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        self.redis.stop()
