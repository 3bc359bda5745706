"""The farm's app with some of its Celery settings switched off, for ``benchmarks.breakdown``.

``celery -A benchmarks.farmvariant worker`` with ``BENCH_FARM_VARIANT`` set to a
comma-separated list of ``no-started`` (task_track_started), ``no-extended``
(result_extended) and ``no-events`` (task events and sent events). Not for production: it
only shows what each setting costs.
"""

from __future__ import annotations

import os

from celery import Celery

from celeryfarm.celery import app

OPTIONS = ("no-started", "no-extended", "no-events")


def switch_off(target: Celery, variant: str) -> None:
    """Apply ``variant`` to an app (the workers' and the submitting client's)."""
    unknown = set(filter(None, variant.split(","))) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown variant options {sorted(unknown)}; known: {OPTIONS}")
    if "no-started" in variant:
        target.conf.task_track_started = False
    if "no-extended" in variant:
        target.conf.result_extended = False
    if "no-events" in variant:
        target.conf.worker_send_task_events = False
        target.conf.task_send_sent_event = False


switch_off(app, os.environ.get("BENCH_FARM_VARIANT", ""))
