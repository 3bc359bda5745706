"""``celeryfarm up``: a whole farm on this machine, supervised in the foreground.

:class:`LocalFarm` starts an embedded Redis (unless ``CELERYFARM_BROKER_URL`` names one),
N render-node workers and Flower as child processes, starts again any child that dies (with
a growing delay, as Katana Queue's local agents are restarted), and on :meth:`LocalFarm.stop`
ends them all and every process they left behind.

The data folder holds what must outlive one run, readable by its owner only: the embedded
Redis's append-only data, its ACL users' passwords and port (so nodes and Katana sessions
that joined keep working after a restart), Flower's password, the children's logs, and while
the farm runs, ``farm.json``, which tells the other commands (``env``, ``jobs``, ``demo``...)
how to reach it.

The embedded Redis has the farm's ACL roles (:mod:`celeryfarm.acl`) and no default user:
the nodes use ``node``, Flower ``flower``, and the commands and Katana sessions of this
machine the artist user of its owner (a wrangler, named after the login); ``celeryfarm user
add`` makes the other artists' users, which the ACL file keeps across restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable
from urllib.parse import urlsplit

import psutil
import redis

from . import acl, redisclient
from .celery import create_app
from .config import PREFIX, Settings, names_farm_redis, redact
from .errors import FarmError, LocalFarmError
from .passwords import require_strong
from .process import become_subreaper
from .redisserver import RedisServer, ReplicatedRedis, free_port
from .sentinel import SentinelUrl, uses_sentinel
from .tls import Tls
from .worker import node_command, node_name, wait_for_workers

#: The key of the machine owner's artist user in :func:`embedded_users`.
OWNER = "owner"
STATE_FILE = "farm.json"
KEEP_FILE = "embedded.json"
LOCK_FILE = "up.lock"
DEFAULT_FLOWER_PORT = 5555
#: Restart delays of a child that keeps dying: doubling from the first to the last.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
#: A child that ran this long before dying is restarted after the first delay again.
STABLE_SECONDS = 60.0
#: Seconds a worker gets to stop cold (its render trees get their own stop grace first).
COLD_STOP_SECONDS = 20.0


def write_private(path: Path, data: Mapping[str, object]) -> None:
    """Write ``data`` as JSON readable by the owner only, atomically: the file never exists
    with wider permissions, nor half-written."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=2)
    os.replace(partial, path)


def write_text_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only, atomically (see :func:`write_private`)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(partial, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclasses.dataclass(frozen=True)
class FarmState:
    """What a running ``celeryfarm up`` publishes in ``farm.json`` for the other commands."""

    pid: int
    broker_url: str
    shared_root: str
    nodes: list[str]
    flower_url: str = ""
    flower_user: str = ""
    embedded_redis: bool = True
    #: The broker URL with the ``node`` user's credentials, for nodes joining from this
    #: machine ("": the farm has no ACL users, nodes use ``broker_url``).
    node_broker_url: str = ""
    sentinel_master: str = Settings.sentinel_master
    #: The password the sentinels of ``up --replicas`` ask of the farm's clients.
    sentinel_password: str = ""

    @property
    def env(self) -> dict[str, str]:
        """The variables a Katana session or another process needs to use this farm."""
        return Settings(broker_url=self.broker_url, shared_root=Path(self.shared_root),
                        sentinel_master=self.sentinel_master,
                        sentinel_password=self.sentinel_password).client_environment()

    @property
    def node_env(self) -> dict[str, str]:
        """The variables a render node of this machine needs to join this farm."""
        return {**self.env, PREFIX + "BROKER_URL": self.node_broker_url or self.broker_url}


def _locked(path: Path) -> bool:
    """Whether some process holds the lock ``celeryfarm up`` keeps on ``path``."""
    try:
        with open(path, "a") as file:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def running_farm(data_dir: Path) -> FarmState | None:
    """The farm ``celeryfarm up`` runs from ``data_dir``, or None if none runs (a
    ``farm.json`` left by a killed ``up`` is ignored: its lock is gone)."""
    data = _read_json(data_dir / STATE_FILE)
    if not data or not _locked(data_dir / LOCK_FILE):
        return None
    try:
        return FarmState(**data)
    except TypeError:
        return None


def client_environment(environ: Mapping[str, str], node: bool = False) -> dict[str, str]:
    """``environ`` completed with the running local farm's variables (a ``node``'s, with
    the node user's credential), for commands run without ``CELERYFARM_BROKER_URL``: with
    it set, that farm is the one meant."""
    env = dict(environ)
    if names_farm_redis(env):
        return env
    state = running_farm(Settings.from_env(env).data_dir)
    if state is not None:
        for name, value in (state.node_env if node else state.env).items():
            env.setdefault(name, value)
    return env


def embedded_admin_url(data_dir: Path) -> str:
    """The admin user's URL of the embedded Redis of the farm ``up`` runs from
    ``data_dir`` ("" if none runs)."""
    state = running_farm(data_dir)
    if state is None or not state.embedded_redis:
        return ""
    kept = _read_json(data_dir / KEEP_FILE)
    password = kept.get("acl_passwords", {}).get(acl.ADMIN)
    if not password:
        return ""
    return acl.FarmUser(acl.ADMIN, password, ()).url(state.broker_url)


def _write_acl_files(paths: list[Path], users: Iterable[acl.FarmUser], last: Path) -> None:
    """Write the embedded Redis's ACL file(s): the roles as this version defines them, and
    the artists added since, as the ``last`` file (the last primary's) has them."""
    others = last.read_text().splitlines() if last.exists() else []
    text = acl.acl_file(users, others)
    for path in paths:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_text_private(path, text)


def owner_name(login: str) -> str:
    """The artist user of the machine's owner, named after the login where it can be."""
    name = re.sub(r"[^a-z0-9_-]", "-", login.lower())[:32].strip("-") or "owner"
    if not re.match(r"[a-z0-9]", name) or name in acl.RESERVED:
        name = f"owner-{name}"[:32]
    return acl.check_name(name)


def embedded_users(settings: Settings, kept: dict) -> dict[str, acl.FarmUser]:
    """The embedded Redis's users by role (``owner``: the machine owner's artist user),
    their passwords made once and kept in ``kept``."""
    passwords = kept.setdefault("acl_passwords", {})
    owner = kept.setdefault("owner", owner_name(settings.user))
    for role in (*acl.ROLES, owner):
        passwords.setdefault(role, acl.new_password())
    users = {user.name: user for user in acl.role_users(settings, passwords)}
    users[OWNER] = acl.artist_user(owner, settings, wrangler=True, password=passwords[owner])
    return users


def wants_embedded_redis(settings: Settings, environ: Mapping[str, str]) -> bool:
    """Whether ``up`` runs its own Redis: yes unless ``CELERYFARM_BROKER_URL`` (or its
    ``_FILE``) names another one than the embedded Redis of this data folder (a shell that
    ran ``celeryfarm env`` names that one, and must be able to start it again)."""
    if not names_farm_redis(environ):
        return True
    url = settings.broker_url
    kept = _read_json(settings.data_dir / KEEP_FILE)
    if uses_sentinel(url):  # the sentinels of `up --replicas`?
        sentinels = (kept.get("redis_ports") or [])[-ReplicatedRedis.SENTINELS:]
        return bool(sentinels) and set(SentinelUrl.parse(url).sentinels) == {
            ("127.0.0.1", port) for port in sentinels}
    parts = urlsplit(url)
    return bool(kept.get("redis_port")) and (
        (parts.hostname, parts.port) == ("127.0.0.1", kept["redis_port"]))


def check_redis(url: str, tls: Tls | None = None, master: str = "",
                sentinel_password: str = "", timeout: float = 3.0) -> None:
    """Raise :class:`FarmError` in one line unless the Redis at ``url`` answers (over TLS
    with its certificate verified, for ``rediss://``; the primary ``master``, for
    ``sentinel://``, asked of sentinels that may want ``sentinel_password``)."""
    timeouts = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    trouble = uses_sentinel(url) and redisclient.sentinel_trouble(
        url, tls, master, sentinel_password, **timeouts)
    if trouble:
        raise FarmError(f"cannot reach the farm's Redis at {redact(url)}: {trouble}")
    client = redisclient.client(url, tls, master, sentinel_password, **timeouts)
    try:
        client.ping()
    except redis.RedisError as error:
        raise FarmError(f"cannot reach the farm's Redis at {redact(url)}: {error}") from None
    finally:
        client.close()


class Child:
    """One supervised process; :meth:`poll` starts it again, later each time, if it died."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen],
                 stop: Callable[[subprocess.Popen], None]) -> None:
        self.name = name
        self._start = start
        self._stop = stop
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.delay = BACKOFF_FIRST
        self.due: float | None = None  # when a dead child is started again

    def start(self) -> subprocess.Popen:
        self.process = self._start()
        self.started_at = time.monotonic()
        self.due = None
        return self.process

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def poll(self, echo: Callable[[str], None]) -> None:
        """Notice a death and schedule a restart, or do a restart that is due."""
        now = time.monotonic()
        if self.due is None and self.exited():
            assert self.process is not None
            if now - self.started_at >= STABLE_SECONDS:
                self.delay = BACKOFF_FIRST
            self.due = now + self.delay
            echo(f"{self.name} exited with status {self.process.returncode}: "
                 f"starting it again in {self.delay:g} s")
            self.delay = min(self.delay * 2, BACKOFF_MAX)
        elif self.due is not None and now >= self.due:
            try:
                self.start()
            except Exception as error:  # e.g. redis-server failing again: retry later
                echo(f"{self.name} could not be started again: {error}")
                self.due = now + self.delay
                self.delay = min(self.delay * 2, BACKOFF_MAX)
                return
            echo(f"{self.name} started again (pid {self.process.pid})")

    def stop(self) -> None:
        self.due = None
        if self.process is not None and self.process.poll() is None:
            self._stop(self.process)


def _terminate(process: subprocess.Popen, signals: list[tuple[int, float]]) -> None:
    """Send each signal in turn, waiting its time for the process to exit."""
    for sig, seconds in signals:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(seconds)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait()


def _stop_worker(process: subprocess.Popen) -> None:
    """Cold shutdown, then SIGKILL. Renders run for hours, so waiting for them (a warm
    shutdown) could take as long: their steps are terminated (which kills their render
    trees) and their messages, acknowledged only at the end, go back to the queue, so
    they run again when the farm is next up."""
    _terminate(process, [(signal.SIGQUIT, COLD_STOP_SECONDS)])


def _stop_service(process: subprocess.Popen) -> None:
    _terminate(process, [(signal.SIGTERM, 10.0)])


class LocalFarm:
    """Redis, render nodes and Flower on this machine, as children of this process."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 2,
        concurrency: int = 1,
        queues: str = "",
        flower: bool = True,
        embedded_redis: bool = True,
        echo: Callable[[str], None] = print,
        replicas: int = 0,
    ) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self.workers = workers
        self.concurrency = concurrency
        self.queues = queues or settings.default_queue
        self.with_flower = flower
        self.embedded = embedded_redis
        self.echo = echo
        self.log_dir = self.data_dir / "logs"
        self.children: list[Child] = []
        #: With ``replicas``, the embedded Redis is a primary, that many replicas and three
        #: sentinels, and clients get the sentinels' URL.
        self.replicas = replicas
        self.redis: RedisServer | ReplicatedRedis | None = None
        self._kept: dict = {}
        self.broker_url = settings.broker_url
        #: The broker URL with each role's credentials (the embedded Redis's ACL users).
        self.role_urls: dict[str, str] = {}
        self.flower_port = 0
        self.flower_password = settings.flower_password
        self.state: FarmState | None = None
        self._lock: IO[str] | None = None

    # -- starting ----------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> FarmState:
        """Start everything and wait until every node answers; returns what it published.

        On any failure, whatever was started is stopped again before the error propagates.
        """
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> FarmState:
        if self.with_flower and self.flower_password:  # one given, not one made here
            require_strong(f"{PREFIX}FLOWER_PASSWORD", self.flower_password)
        self._take_lock()
        become_subreaper()  # orphans of dead children come to us, so stop() can end them
        self.settings.shared_root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        kept = self._kept = _read_json(self.data_dir / KEEP_FILE)
        if self.embedded and self.replicas:
            self._start_replicated_redis(kept)
        elif self.embedded:
            self._start_redis(kept)
        else:
            check_redis(self.broker_url, self.settings.tls, self.settings.sentinel_master,
                        self.settings.sentinel_password)
        names = [f"node{index}" for index in range(1, self.workers + 1)]
        for name in names:
            self._add(Child(name, lambda name=name: self._start_worker(name), _stop_worker))
        if self.with_flower:
            self._start_flower(kept)
        self._keep(kept)
        app = create_app(self.settings_as(acl.ADMIN))  # artists may not ping nodes
        try:
            wait_for_workers(
                app, names, timeout=timeout, hint=f"see {self.log_dir}/node*.log",
                exited=lambda: [c.name for c in self.children if c.exited()],
            )
            if self.with_flower:
                self._wait_for_flower(timeout)
        except TimeoutError as error:
            raise LocalFarmError(str(error)) from None
        finally:
            app.close()
        self.state = FarmState(
            pid=os.getpid(),
            broker_url=self.broker_url,
            shared_root=str(self.settings.shared_root),
            nodes=[node_name(name) for name in names],
            flower_url=self.flower_url,
            flower_user=self.settings.flower_user if self.with_flower else "",
            embedded_redis=self.embedded,
            node_broker_url=self.role_urls.get(acl.NODE, ""),
            sentinel_master=self.settings.sentinel_master,
            sentinel_password=self.settings.sentinel_password,
        )
        write_private(self.data_dir / STATE_FILE, dataclasses.asdict(self.state))
        return self.state

    def _take_lock(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(self.data_dir / LOCK_FILE, "a")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise LocalFarmError(
                f"a farm is already running from {self.data_dir}; stop it first, or use "
                f"another --data-dir"
            ) from None
        self._lock = lock

    def _start_redis(self, kept: dict) -> None:
        kept.pop("redis_password", None)  # the default user's, before ACL users
        users = embedded_users(self.settings, kept)
        port = kept.get("redis_port") or 0
        if not port or not _port_free(port):
            port = free_port()
        kept["redis_port"] = port
        folder = self.data_dir / "redis"
        acl_file = folder / "users.acl"
        _write_acl_files([acl_file], users.values(), acl_file)
        self.redis = RedisServer(folder, port=port, password=users[acl.ADMIN].password,
                                 user=acl.ADMIN, acl_file=acl_file,
                                 maxmemory=self.settings.redis_maxmemory)
        self._add(Child("redis-server", lambda: self.redis.start().process,
                        lambda _process: self.redis.stop()))
        self.role_urls = {role: user.url(self.redis.url) for role, user in users.items()}
        self.broker_url = self.role_urls[OWNER]

    def _start_replicated_redis(self, kept: dict) -> None:
        """A primary, replicas and sentinels, each a child started again if it dies (a
        primary that comes back is made a replica by the sentinels). The last primary, as
        the sentinels said when the farm stopped, starts as the primary again.

        Every server has the farm's ACL users (replicas and sentinels their own, which may
        only replicate and fail over); artists added since are kept from the primary's.
        The sentinels ask a password of their clients (kept, and given to every client
        with the farm's settings), which only lets them find the primary."""
        kept.pop("redis_password", None)  # the default user's, before ACL users
        users = embedded_users(self.settings, kept)
        passwords = kept["acl_passwords"]
        for role in acl.REPLICATION_ROLES:
            passwords.setdefault(role, acl.new_password())
        sentinel_password = kept.setdefault("sentinel_password", acl.new_password())
        self.settings = dataclasses.replace(self.settings, sentinel_password=sentinel_password)
        ports = kept.get("redis_ports") or []
        if len(ports) != self.replicas + 1 + ReplicatedRedis.SENTINELS or not all(
                map(_port_free, ports)):
            ports = []  # new ports; the last primary's data still decides who is primary
        primary = kept.get("redis_primary", 0)
        primary = primary if primary <= self.replicas else 0
        self.redis = ReplicatedRedis(
            self.data_dir, self.replicas, users[acl.ADMIN].password,
            master=self.settings.sentinel_master, maxmemory=self.settings.redis_maxmemory,
            ports=ports, primary=primary, acl_users=True, user=acl.ADMIN,
            replication=(acl.REPLICA, passwords[acl.REPLICA]),
            sentinel=(acl.SENTINEL, passwords[acl.SENTINEL]),
            sentinel_password=sentinel_password)
        kept["redis_ports"] = self.redis.ports
        _write_acl_files([server.acl_file for server in self.redis.servers],
                         [*users.values(), *acl.replication_users(passwords)],
                         self.redis.servers[primary].acl_file)
        for server in self.redis.processes:
            self._add(Child(server.data_dir.name, lambda s=server: s.start().process,
                            lambda _process, s=server: s.stop()))
        self.redis.wait_ready()
        self.role_urls = {role: user.url(self.redis.url) for role, user in users.items()}
        self.broker_url = self.role_urls[OWNER]

    def _remember_primary(self) -> None:
        """Note which server is the primary now, for the next start."""
        if isinstance(self.redis, ReplicatedRedis):
            with contextlib.suppress(redis.RedisError, StopIteration):
                self._kept["redis_primary"] = self.redis.servers.index(self.redis.primary())
                self._keep(self._kept)

    def _start_flower(self, kept: dict) -> None:
        if not self.flower_password:
            self.flower_password = kept.setdefault("flower_password", secrets.token_urlsafe(12))
        port = self.settings.flower_port or kept.get("flower_port") or DEFAULT_FLOWER_PORT
        if not self.settings.flower_port and not _port_free(port):
            port = free_port()
        kept["flower_port"] = self.flower_port = port
        self._add(Child("flower", self._spawn_flower, _stop_service))

    def _keep(self, kept: dict) -> None:
        write_private(self.data_dir / KEEP_FILE, kept)

    def _add(self, child: Child) -> None:
        self.children.append(child)
        child.start()

    def settings_as(self, role: str) -> Settings:
        """The settings with ``role``'s credential (the client's on a Redis of another's)."""
        return dataclasses.replace(self.settings,
                                   broker_url=self.role_urls.get(role, self.broker_url))

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}" if self.with_flower else ""

    def _environment(self, role: str) -> dict[str, str]:
        """The children's environment: this one, pointed at this farm with ``role``'s
        credential."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
        env = {**env, **self.settings_as(role).client_environment()}
        if self.settings.allow_root:
            env[PREFIX + "ALLOW_ROOT"] = "1"
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start a child in its own session (a Ctrl-C in the terminal reaches only us, and
        we stop the children in order), its output appended to its log."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.data_dir, start_new_session=True,
            )

    def _start_worker(self, name: str) -> subprocess.Popen:
        return self._spawn(name, node_command(name, self.concurrency, self.queues),
                           self._environment(acl.NODE))

    def _spawn_flower(self) -> subprocess.Popen:
        env = self._environment(acl.FLOWER)
        # From the environment, not argv: the process list would show the password.
        env["FLOWER_BASIC_AUTH"] = f"{self.settings.flower_user}:{self.flower_password}"
        env["FLOWER_TASKS_COLUMNS"] = "name,uuid,state,kwargs,received,started,runtime,worker"
        argv = [sys.executable, "-m", "celeryfarm.flower",
                "--address=127.0.0.1", f"--port={self.flower_port}"]
        return self._spawn("flower", argv, env)

    def _wait_for_flower(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        flower = next(c for c in self.children if c.name == "flower")
        while True:
            if _answers(f"{self.flower_url}/healthcheck"):
                return
            if flower.exited() or time.monotonic() > deadline:
                raise LocalFarmError(f"Flower did not start; see {self.log_dir}/flower.log")
            time.sleep(0.2)

    # -- running -----------------------------------------------------------------------------
    def supervise(self) -> None:
        """Start again the children that died, when their delay is over; reap orphans."""
        for child in self.children:
            child.poll(self.echo)
        _reap_orphans({c.process.pid for c in self.children if c.process is not None})

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Supervise until ``stop`` is set."""
        while not stop.wait(interval):
            self.supervise()

    # -- stopping ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop Flower, then the workers (all at once), then Redis; then end every process
        still left under us, and wait for all of them."""
        with contextlib.suppress(FileNotFoundError):
            if self.state is not None:
                (self.data_dir / STATE_FILE).unlink()
        flower = next((c for c in self.children if c.name == "flower"), None)
        redis_children = [c for c in self.children if c.name.startswith("redis")]
        if flower is not None:
            flower.stop()
        _in_parallel([c.stop for c in self.children
                      if c is not flower and c not in redis_children])
        self._remember_primary()
        for child in redis_children:  # last: stopping workers still talk to it
            child.stop()
        _end_descendants()
        self.children.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _signals(handler: Callable | int) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def supervised(farm: LocalFarm) -> Iterator[FarmState]:
    """Start ``farm``, supervise it from a thread while the body runs, then stop it.

    SIGTERM and SIGHUP interrupt the main thread as Ctrl-C does (``KeyboardInterrupt``), so
    the farm is stopped whichever way its process is told to end, also during start-up;
    while it stops, those signals are ignored, so a second Ctrl-C cannot leave children
    behind. Must be used from the main thread.
    """
    stop = threading.Event()
    supervisor = threading.Thread(target=farm.run, args=(stop,), daemon=True)
    try:
        with _signals(_interrupt):
            state = farm.start()
            supervisor.start()
            yield state
    finally:
        with _signals(signal.SIG_IGN):
            if farm.children:
                farm.echo("stopping the farm ...")
            stop.set()
            if supervisor.is_alive():
                supervisor.join()
            farm.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _in_parallel(calls: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _reap_orphans(known: set[int]) -> None:
    """Collect exit statuses of orphans reparented to us (we are a subreaper), leaving our
    own children to their ``Popen`` objects."""
    for proc in psutil.Process().children():
        if proc.pid in known:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, ChildProcessError):
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)


def _end_descendants(grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process still under us, and wait until they are gone.

    Not ``psutil.wait_procs``: it polls a process that is not our child until it vanishes,
    and a grandchild orphaned during the wait becomes our zombie, which only we can reap.
    """
    left = psutil.Process().children(recursive=True)
    for sig, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        deadline = time.monotonic() + seconds
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            _reap_orphans(set())
            left = [proc for proc in left if _running(proc)]
        if not left:
            return


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
