"""A private ``redis-server`` child process: loopback only, optional password or ACL users
(an ACL file, see :mod:`celeryfarm.acl`), append-only, optionally TLS only; or a primary with
replicas and three sentinels (:class:`ReplicatedRedis`).

``celeryfarm up`` runs the farm's Redis this way, and the tests and benchmarks run theirs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from .errors import RedisServerError
from .tls import Tls

#: Seconds since a replica's last acknowledgement after which a primary with
#: ``min_replicas`` stops counting it (replicas acknowledge every second).
MIN_REPLICAS_MAX_LAG = 5
INSTALL_HINT = "install it with: sudo apt-get install redis-server (Debian/Ubuntu)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """A Redis that listens on TLS only and requires client certificates signed by the
    farm's CA, as ``docker-compose.tls.yml`` runs it, from the folder
    ``worker_image/make-certs.sh`` wrote: ``redis/`` for the server, ``client/`` for its
    clients (its own readiness check among them)."""

    certs: Path

    @property
    def client(self) -> Tls:
        folder = self.certs / "client"
        return Tls(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"))

    def config(self, port: int) -> list[str]:
        """Redis's configuration lines: TLS on ``port``, no plain-text port; a replica and a
        sentinel reach the other servers over TLS too, with the same certificate."""
        folder = self.certs / "redis"
        return ["port 0", f"tls-port {port}", f"tls-cert-file {folder / 'redis.crt'}",
                f"tls-key-file {folder / 'redis.key'}", f"tls-ca-cert-file {folder / 'ca.crt'}",
                "tls-auth-clients yes", "tls-replication yes"]


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        password: str = "",
        appendonly: bool = True,
        executable: str = "redis-server",
        maxmemory: str = "1gb",
        acl_file: Path | None = None,
        user: str = "",
        tls: ServerTls | None = None,
        replicaof: int | None = None,
        masterauth: tuple[str, str] | None = None,
        min_replicas: int = 0,
    ) -> None:
        """With ``acl_file``, Redis's users come from that file (and ``ACL SAVE`` writes
        there), and ``user`` and ``password`` are those this object connects as."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.executable = executable
        self.maxmemory = maxmemory
        self.acl_file = acl_file
        self.user = user
        self.tls = tls
        #: The port of the primary this server starts as a replica of.
        self.replicaof = replicaof
        #: The (user, password) it replicates as: by default its own ``user`` and
        #: ``password``; with ACL users, one that may only replicate.
        self.masterauth = masterauth or (user, password)
        #: As a primary, it refuses writes while fewer replicas than this are connected and
        #: caught up (Redis's ``min-replicas-to-write``; 0: never).
        self.min_replicas = min_replicas
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = shutil.which(self.executable)
        if binary is None:
            raise RedisServerError(f"{self.executable} not found on PATH; {INSTALL_HINT}")
        # The configuration comes on stdin, which keeps the password out of the process list.
        return [binary, "-"]

    def config(self) -> str:
        listen = self.tls.config(self.port) if self.tls else [f"port {self.port}"]
        lines = [
            "bind 127.0.0.1",
            *listen,
            f"dir {self.data_dir}",
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            # Full is an error for writers, never a silently evicted job record or step.
            f"maxmemory {self.maxmemory}",
            "maxmemory-policy noeviction",
            "loglevel warning",
            f"logfile {self.data_dir / 'redis.log'}",
        ]
        if self.acl_file is not None:
            lines.append(f"aclfile {self.acl_file}")
        elif self.password:
            lines.append(f"requirepass {self.password}")
        # masterauth on every server: any may become a replica after a failover.
        master_user, master_password = self.masterauth
        if master_user:
            lines.append(f"masteruser {master_user}")
        if master_password:
            lines.append(f"masterauth {master_password}")
        if self.replicaof:
            lines.append(f"replicaof 127.0.0.1 {self.replicaof}")
        if self.min_replicas:
            # A primary cut off from its replicas (a partition: the sentinels may have
            # promoted one of them) takes no write it would lose; its clients then ask the
            # sentinels again (celeryfarm.records.replication).
            lines += [f"min-replicas-to-write {self.min_replicas}",
                      f"min-replicas-max-lag {MIN_REPLICAS_MAX_LAG}"]
        # A replica syncs at once, not after the default 5 s wait for more of them.
        lines.append("repl-diskless-sync-delay 0")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        assert self.process.stdin is not None
        if self.process.args[-1] == "-":
            self.process.stdin.write(self.config().encode())
        self.process.stdin.close()
        client_tls = self.tls.client if self.tls else Tls()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5,
                                      **client_tls.redis_options(self.url))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with status {self.process.returncode}: "
                    f"{self.process.stderr.read().decode(errors='replace').strip()} "
                    f"(see {self.data_dir / 'redis.log'})"
                )
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(
                        f"redis-server did not answer on port {self.port} within {timeout} s"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM lets it flush the append-only file), then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` watching the primary ``master`` at ``primary_port``.

    Sentinels rewrite their configuration file as they learn, so it is a file (owner-only:
    it holds the primary's password), not stdin, written at the first start only: a
    sentinel started again remembers what it learnt (which server is the primary now).
    ``down_after_ms`` is how long the primary must be silent before the sentinels agree it
    is down and promote a replica. ``user`` and ``password`` are what it authenticates to
    the servers as."""

    def __init__(self, data_dir: Path, primary_port: int, master: str, password: str = "",
                 down_after_ms: int = 5000, port: int | None = None, user: str = "") -> None:
        super().__init__(data_dir, port, password=password, appendonly=False, user=user)
        self.primary_port, self.master, self.down_after_ms = primary_port, master, down_after_ms
        self._configured = False

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary, _stdin = super().command()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.data_dir / "sentinel.conf"
        if not self._configured:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(self.config())
            self._configured = True
        return [binary, str(path), "--sentinel"]

    def config(self) -> str:
        name = self.master
        listen = self.tls.config(self.port) if self.tls else [f"port {self.port}"]
        lines = [
            "bind 127.0.0.1", *listen, f"dir {self.data_dir}", "daemonize no",
            "loglevel warning", f"logfile {self.data_dir / 'sentinel.log'}",
            f"sentinel monitor {name} 127.0.0.1 {self.primary_port} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {3 * self.down_after_ms}",
        ]
        if self.user:
            lines.append(f"sentinel auth-user {name} {self.user}")
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        return "\n".join(lines) + "\n"


class ReplicatedRedis:
    """A primary, ``replicas`` replicas and three sentinels, all on 127.0.0.1: a Redis that
    survives the death of its primary. Its :attr:`url` is the sentinels' ``sentinel://``
    URL; clients find the primary, named ``master``, through them.

    Server 0 keeps its data in ``data_dir/redis`` (where a lone :class:`RedisServer` of
    ``celeryfarm up`` keeps it), the others beside it. ``ports`` (servers, then sentinels)
    and ``primary`` (the index of the server that starts as the primary) let a restart
    keep the addresses clients know and the data of the last primary.

    With ``acl_users``, each server reads its users from ``users.acl`` in its folder
    (written by the caller before :meth:`start`: Redis does not replicate users) and this
    object connects as ``user``; ``replication`` is the (user, password) replicas
    authenticate to the primary with, ``sentinel`` the sentinels' (see
    :data:`celeryfarm.acl.REPLICATION_ROLES`). Without, they all use ``password``.

    Every server, as a primary, refuses writes while fewer than ``min_replicas`` replicas
    are connected and caught up: a primary cut off from all its replicas takes nothing it
    would lose (with one replica, its death pauses the farm's writes until it is back)."""

    #: Three sentinels with a quorum of two: one may die, and one alone never fails over.
    SENTINELS = 3
    tls = None

    def __init__(self, data_dir: Path, replicas: int = 2, password: str = "",
                 master: str = "celeryfarm", maxmemory: str = "1gb",
                 down_after_ms: int = 5000, ports: Sequence[int] = (),
                 primary: int = 0, acl_users: bool = False, user: str = "",
                 replication: tuple[str, str] | None = None,
                 sentinel: tuple[str, str] | None = None, min_replicas: int = 1) -> None:
        self.data_dir = Path(data_dir)
        self.master, self.password, self.user = master, password, user
        count = replicas + 1
        ports = list(ports) or [free_port() for _ in range(count + self.SENTINELS)]
        if len(ports) != count + self.SENTINELS or not 0 <= primary < count:
            raise ValueError(f"{count} servers and {self.SENTINELS} sentinels need as many "
                             f"ports, got {ports} with primary {primary}")
        folders = [self.data_dir / "redis",
                   *(self.data_dir / f"redis-replica-{n}" for n in range(1, count))]
        self.servers = [
            RedisServer(folders[n], ports[n], password, maxmemory=maxmemory,
                        replicaof=None if n == primary else ports[primary],
                        acl_file=folders[n] / "users.acl" if acl_users else None, user=user,
                        masterauth=replication, min_replicas=min(min_replicas, replicas))
            for n in range(count)]
        sentinel_user, sentinel_password = sentinel or ("", password)
        self.sentinels = [
            SentinelServer(self.data_dir / f"redis-sentinel-{n + 1}", ports[primary], master,
                           sentinel_password, down_after_ms, port=ports[count + n],
                           user=sentinel_user)
            for n in range(self.SENTINELS)]

    @property
    def ports(self) -> list[int]:
        return [server.port for server in [*self.servers, *self.sentinels]]

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}/0" for s in self.sentinels)

    def use_tls(self, tls: ServerTls) -> ReplicatedRedis:
        """Make every server and sentinel listen on TLS only (before :meth:`start`): they
        reach each other over TLS, and their clients over ``sentinel://`` with
        ``tls.client``'s files."""
        self.tls = tls
        for server in [*self.servers, *self.sentinels]:
            server.tls = tls
        return self

    @property
    def processes(self) -> list[RedisServer]:
        """Every server, the starting primary first, then the sentinels: the order to
        start them in."""
        first = [s for s in self.servers if s.replicaof is None]
        return [*first, *(s for s in self.servers if s not in first), *self.sentinels]

    def start(self, timeout: float = 30.0) -> ReplicatedRedis:
        """Start every server, then the sentinels, and :meth:`wait_ready`."""
        try:
            for server in self.processes:
                server.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every replica has synced and each sentinel knows the primary and
        every replica."""
        deadline = time.monotonic() + timeout
        replicas = [s for s in self.servers if s.replicaof is not None]
        while not (all(self._synced(s) for s in replicas)
                   and all(self._sees_everything(s) for s in self.sentinels)):
            if time.monotonic() > deadline:
                raise RedisServerError(f"the replicas did not sync, or the sentinels did not "
                                       f"see {len(self.servers)} servers, within {timeout} s")
            time.sleep(0.1)

    @staticmethod
    def _synced(replica: RedisServer) -> bool:
        try:
            info = _client(replica).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def _sees_everything(self, sentinel: SentinelServer) -> bool:
        client = _client(sentinel)
        try:
            replicas = client.sentinel_slaves(self.master)
            return len([r for r in replicas if "s_down" not in r["flags"]]) == \
                len(self.servers) - 1
        except redis.RedisError:
            return False
        finally:
            client.close()

    def primary(self) -> RedisServer:
        """The server the sentinels now call the primary."""
        client = _client(self.sentinels[0])
        try:
            _host, port = client.sentinel_get_master_addr_by_name(self.master)
        finally:
            client.close()
        return next(server for server in self.servers if server.port == int(port))

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def __enter__(self) -> ReplicatedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _client(server: RedisServer) -> redis.Redis:
    tls = server.tls.client if server.tls else Tls()
    return redis.Redis.from_url(server.url, socket_timeout=2, decode_responses=True,
                                **tls.redis_options(server.url))
