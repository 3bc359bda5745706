"""Flower as celeryfarm runs it: ``python -m celeryfarm.flower [flower options]``.

The same as ``celery -A celeryfarm flower``, except that:

* Flower's ``/metrics`` asks for the same login as every other page: Flower serves it to
  anyone, and its labels name the farm's workers and tasks. ``/healthcheck`` (one word,
  "OK") stays open for container health checks.
* its broker page and ``/api/queues/length`` read the queue lengths through the sentinels
  for a ``sentinel://`` broker (:class:`SentinelQueues`): Flower names its broker by the
  connection's URI, which for the farm's Sentinel transport is
  ``celeryfarm.broker:SentinelTransport://...``, a scheme it does not know, and its own
  Sentinel reader asks only the first sentinel;
* for any other broker, Flower is given the URI of kombu's Redis transport, which the
  farm's own (:mod:`celeryfarm.broker`) extends.
"""

from __future__ import annotations

import sys
from typing import Any

from .config import Settings
from .sentinel import SEPARATOR, SentinelUrl, uses_sentinel


def protect_metrics() -> None:
    """Put Flower's ``/metrics`` behind its login, as its other pages are."""
    from flower.views.monitor import Metrics
    from tornado.web import authenticated

    if not getattr(Metrics.get, "celeryfarm_protected", False):
        Metrics.get = authenticated(Metrics.get)
        Metrics.get.celeryfarm_protected = True


def name_the_broker() -> None:
    """Flower picks its broker page's client (queue lengths) by the scheme of the app
    connection's URI, which names the farm's own transport class (celeryfarm.capture): give
    it the URI of the kombu transport that class extends."""
    from flower.app import Flower
    from kombu.transport.redis import SentinelTransport

    def uri(include_password: bool) -> property:
        def get(self: Flower) -> str:
            with self.capp.connection() as conn:
                kind = "sentinel" if isinstance(conn.transport, SentinelTransport) else "redis"
                return conn.clone(transport=kind).as_uri(include_password=include_password)
        return property(get)

    Flower.broker_uri = uri(include_password=False)
    Flower.broker_uri_with_password = uri(include_password=True)


def sentinel_queues(settings: Settings, broker_options: dict[str, Any]) -> Any:
    """Flower's Redis queue reader for the farm's ``sentinel://`` broker: every sentinel
    of the URL (with the sentinels' password), the primary they name, over TLS (verified)
    when the farm's Redis is."""
    from flower.utils.broker import RedisBase
    from redis.asyncio.sentinel import Sentinel

    from .redisclient import sentinel_kwargs

    class SentinelQueues(RedisBase):
        def __init__(self) -> None:
            url = settings.broker_url
            super().__init__(url.split(SEPARATOR)[0], broker_options=broker_options)
            target = SentinelUrl.parse(url)
            timeouts = {"socket_timeout": self.socket_timeout,
                        "socket_connect_timeout": self.socket_connect_timeout}
            sentinels = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs(
                url, settings.tls, settings.sentinel_password, **timeouts))
            self.redis = sentinels.master_for(
                settings.sentinel_master, username=target.username,
                password=target.password, db=target.db, **timeouts,
                **settings.tls.sentinel_options(url))

    return SentinelQueues()


def read_queues_through_sentinels() -> None:
    """Give Flower's broker views :func:`sentinel_queues` for a ``sentinel://`` broker."""
    from flower.views import BaseHandler

    flower_broker = BaseHandler.get_broker
    if getattr(flower_broker, "celeryfarm_sentinel", False):
        return

    def get_broker(handler: BaseHandler) -> Any:
        settings = getattr(handler.capp, "settings", None)
        if settings is None or not uses_sentinel(settings.broker_url):
            return flower_broker(handler)
        return sentinel_queues(settings, handler.capp.conf.broker_transport_options)

    get_broker.celeryfarm_sentinel = True
    BaseHandler.get_broker = get_broker


def main(argv: list[str]) -> None:
    from celery.bin.celery import main as celery

    protect_metrics()
    name_the_broker()
    read_queues_through_sentinels()
    sys.argv = ["celery", "-A", "celeryfarm", "flower", *argv]
    celery()


if __name__ == "__main__":
    main(sys.argv[1:])
