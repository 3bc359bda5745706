"""A Redis client for any farm URL: ``redis://``, ``rediss://`` or Redis Sentinel.

A Sentinel URL lists the sentinels, as kombu's ``sentinel://`` transport and Celery's
Sentinel result backend read it: ``sentinel://:PASSWORD@host1:26379/0;sentinel://host2:26379``
(the password and database, given once, are the primary's), and the farm setting
``CELERYFARM_SENTINEL_MASTER`` names the primary the sentinels watch. Clients made here ask
the sentinels for the primary when they connect and again when it stops answering or has
become a replica, so the records, the reapers and the command line follow a failover as
kombu and Celery do.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from kombu.transport import redis as kombu_redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from .tls import Tls

SCHEME = "sentinel"
#: Between the sentinels of one URL (kombu's and Celery's separator).
SEPARATOR = ";"


def uses_sentinel(url: str) -> bool:
    return url.partition("://")[0].lower() == SCHEME


@dataclasses.dataclass(frozen=True)
class SentinelUrl:
    """The parts of a Sentinel URL."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        sentinels, username, password, db = [], None, None, 0
        for part in filter(None, (p.strip() for p in url.split(SEPARATOR))):
            parsed = urlsplit(part)
            if parsed.scheme.lower() != SCHEME or not parsed.hostname:
                raise ValueError(f"not a sentinel://host:port address: {part!r}")
            sentinels.append((parsed.hostname, parsed.port or 26379))
            username = username or (unquote(parsed.username) if parsed.username else None)
            password = password or (unquote(parsed.password) if parsed.password else None)
            if parsed.path.strip("/"):
                db = int(parsed.path.strip("/"))
        return cls(tuple(sentinels), username, password, db)


class FollowingConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is each time it
    connects. redis-py's own reconnects a retried command to the address it had: a
    primary that froze (a hung host) then gets every retry, until they run out."""

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        if not self._sock and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health, retry_socket_connect)


class Channel(kombu_redis.SentinelChannel):
    connection_class = FollowingConnection


class Transport(kombu_redis.SentinelTransport):
    """kombu's ``sentinel://`` transport with :class:`FollowingConnection`: a node whose
    primary froze finds the new one (``broker_transport`` names it)."""

    Channel = Channel


#: What ``broker_transport`` is for ``sentinel://`` broker URLs.
TRANSPORT = f"{__name__}:Transport"


def client(url: str, tls: Tls | None = None, master: str = "", **options: Any) -> redis.Redis:
    """A client for the farm's Redis at ``url`` (``options`` are redis-py's: timeouts,
    retries, ``decode_responses``...); through the sentinels to the primary ``master``
    for a Sentinel URL."""
    if not uses_sentinel(url):
        return redis.Redis.from_url(url, **(tls or Tls()).redis_options(url), **options)
    target = SentinelUrl.parse(url)
    timeouts = {name: options[name] for name in ("socket_timeout", "socket_connect_timeout")
                if name in options}
    sentinels = Sentinel(list(target.sentinels), sentinel_kwargs=timeouts)
    return sentinels.master_for(master, username=target.username, password=target.password,
                                db=target.db, connection_class=FollowingConnection, **options)
