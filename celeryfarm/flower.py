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


def main(argv: list[str]) -> None:
    from celery.bin.celery import main as celery

    protect_metrics()
    sys.argv = ["celery", "-A", "celeryfarm", "flower", *argv]
    celery()


if __name__ == "__main__":
    main(sys.argv[1:])
