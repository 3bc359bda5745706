"""Flower as celeryfarm runs it: ``python -m celeryfarm.flower [flower options]``.

The same as ``celery -A celeryfarm flower``, except that Flower's ``/metrics`` asks for the
same login as every other page: Flower serves it to anyone, and its labels name the farm's
workers and tasks. ``/healthcheck`` (one word, "OK") stays open for container health checks.
"""

from __future__ import annotations

import sys


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


def main(argv: list[str]) -> None:
    from celery.bin.celery import main as celery

    protect_metrics()
    name_the_broker()
    sys.argv = ["celery", "-A", "celeryfarm", "flower", *argv]
    celery()


if __name__ == "__main__":
    main(sys.argv[1:])
