"""A private ``redis-server`` child process: loopback only, optional password, append-only,
optionally TLS only.

``celeryfarm up`` runs the farm's Redis this way, and the tests and benchmarks run theirs.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from .errors import RedisServerError
from .tls import Tls

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
        """Redis's configuration lines: TLS on ``port``, no plain-text port."""
        folder = self.certs / "redis"
        return ["port 0", f"tls-port {port}", f"tls-cert-file {folder / 'redis.crt'}",
                f"tls-key-file {folder / 'redis.key'}", f"tls-ca-cert-file {folder / 'ca.crt'}",
                "tls-auth-clients yes"]


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
        tls: ServerTls | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.executable = executable
        self.maxmemory = maxmemory
        self.tls = tls
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
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
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        assert self.process.stdin is not None
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
