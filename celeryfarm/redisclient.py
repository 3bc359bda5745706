"""A Redis client for any farm URL: ``redis://``, ``rediss://`` or Redis Sentinel.

Clients made here through the sentinels ask them for the primary whenever they connect, so
the records, the reapers and the command line follow a failover as kombu and Celery do
(whose ``sentinel://`` transport, :mod:`celeryfarm.broker`, makes the same connections). With TLS
(:meth:`celeryfarm.tls.Tls.encrypts`), both the sentinels and the servers they name are
reached over TLS, each certificate and host name verified.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.connection import SSLConnection
from redis.sentinel import Sentinel, SentinelManagedConnection

from . import __version__
from .sentinel import SentinelUrl, uses_sentinel
from .tls import Tls

#: How Redis starts its refusal of a write when too few replicas are connected.
NO_REPLICAS = "NOREPLICAS"

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis-py before 8 reads its version once, at import
    IDENTITY: dict[str, Any] = {}
else:
    #: How the farm's clients name themselves to Redis 7.2+ (``CLIENT LIST``'s ``lib-name``).
    #: Given, not left to redis-py 8, which reads its version from the package metadata
    #: for every client it makes: 3 ms, a tenth of a new Katana session's first getJobs.
    IDENTITY = {"driver_info": DriverInfo().add_upstream_driver("celeryfarm", __version__)}


class FollowingConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is each time it
    connects. redis-py's own reconnects a retried command to the address it had: a
    primary that froze (a hung host) then gets every retry, until they run out."""

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        if not self._sock and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health, retry_socket_connect)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """A primary that refuses writes for want of replicas (``min-replicas-to-write``:
        cut off from them, or just promoted and not yet joined by them) is, for the farm,
        a primary out of reach: the connection is dropped, to ask the sentinels again, and
        the command retried as after any lost connection (redis-py's retries, kombu's
        reconnection). Left as a reply error, it would stop a worker for good (Celery
        takes an error from its broker's ``BRPOP`` as unrecoverable), and the command was
        not run, so running it again is safe."""
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as error:
            if not str(error).startswith(NO_REPLICAS) or not self.connection_pool.is_master:
                raise
            self.disconnect()
            raise redis.ConnectionError(f"the primary refuses writes: {error}") from None


class FollowingSSLConnection(FollowingConnection, SSLConnection):
    """:class:`FollowingConnection` over TLS; its host name, the address the sentinels
    gave, is the one the server's certificate must name."""


def sentinel_kwargs(url: str, tls: Tls, password: str = "",
                    **options: Any) -> dict[str, Any]:
    """redis-py's options for the connections to the sentinels of ``url`` (its
    ``sentinel_kwargs``, kombu's and Celery's too): ``options`` (timeouts), over TLS if the
    farm's Redis is, authenticated with the sentinels' ``password`` if they ask one."""
    auth = {"password": password} if password else {}
    return {**options, **tls.sentinel_options(url), **auth}


def client(url: str, tls: Tls | None = None, master: str = "", sentinel_password: str = "",
           **options: Any) -> redis.Redis:
    """A client for the farm's Redis at ``url`` (``options`` are redis-py's: timeouts,
    retries, ``decode_responses``...); through the sentinels to the primary ``master``
    for a Sentinel URL, authenticated to them with ``sentinel_password``."""
    tls = tls or Tls()
    options = {**IDENTITY, **options}
    if not uses_sentinel(url):
        return redis.Redis.from_url(url, **tls.redis_options(url), **options)
    target, sentinels = _sentinels(url, tls, sentinel_password, options)
    secure = tls.encrypts(url)
    return sentinels.master_for(
        master, username=target.username, password=target.password, db=target.db,
        connection_class=FollowingSSLConnection if secure else FollowingConnection,
        **tls.redis_options(url), **options)


def every_server(url: str, tls: Tls | None = None, master: str = "",
                 sentinel_password: str = "", **options: Any) -> list[redis.Redis]:
    """Clients of every server behind ``url``: the primary and, through the sentinels, each
    replica (for what Redis does not replicate, such as ACL users)."""
    primary = client(url, tls, master, sentinel_password, **options)
    if not uses_sentinel(url):
        return [primary]
    tls = tls or Tls()
    target, sentinels = _sentinels(url, tls, sentinel_password, options)
    replicas = [redis.Redis(host, port, db=target.db, username=target.username,
                            password=target.password, **tls.sentinel_options(url), **options)
                for host, port in sentinels.discover_slaves(master)]
    return [primary, *replicas]


def sentinel_trouble(url: str, tls: Tls | None = None, master: str = "",
                     sentinel_password: str = "", **options: Any) -> str:
    """Why the sentinels of ``url`` cannot name the primary ``master``, in one line, or ""
    if one does. Each is asked once, with no retry: redis-py's own search retries each
    sentinel with back-off for half a minute, then lists every sentinel's client rather
    than what went wrong (a certificate it cannot verify...)."""
    _target, sentinels = _sentinels(url, tls or Tls(), sentinel_password,
                                    {**options, "retry": None})
    errors = []
    for sentinel in sentinels.sentinels:
        try:
            if sentinel.sentinel_get_master_addr_by_name(master):
                return ""
        except redis.RedisError as error:
            errors.append(str(error))
        finally:
            sentinel.close()
    if len(errors) == len(sentinels.sentinels):
        return f"no sentinel answers: {errors[0]}"
    return f"no sentinel knows a primary named {master!r}"


def _sentinels(url: str, tls: Tls, password: str,
               options: dict[str, Any]) -> tuple[SentinelUrl, Sentinel]:
    """The parts of a Sentinel URL, and its sentinels (with ``options``' timeouts, over
    TLS if the farm's Redis is, with their ``password``)."""
    target = SentinelUrl.parse(url)
    timeouts = {name: options[name] for name in ("socket_timeout", "socket_connect_timeout",
                                                 "retry") if name in options}
    return target, Sentinel(list(target.sentinels),
                            sentinel_kwargs=sentinel_kwargs(url, tls, password, **timeouts))
