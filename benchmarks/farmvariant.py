"""The farm's app with some Celery extras switched on, for ``benchmarks.breakdown``.

``celery -A benchmarks.farmvariant worker`` with ``BENCH_FARM_VARIANT`` set to a
comma-separated list of ``events`` (task events and sent events, as when Flower watches),
``started`` (task_track_started) and ``extended`` (result_extended): what the farm gave up
for speed (BENCHMARKS.md). Not for production: it only shows what each setting costs.
"""

from __future__ import annotations

import os

from celery import Celery

from celeryfarm.celery import app

OPTIONS = ("events", "started", "extended")


def switch_on(target: Celery, variant: str) -> None:
    """Apply ``variant`` to an app (the workers' and the submitting client's)."""
    chosen = set(filter(None, variant.split(",")))
    if chosen - set(OPTIONS):
        raise ValueError(f"unknown variant options {sorted(chosen - set(OPTIONS))}; "
                         f"known: {OPTIONS}")
    if "started" in chosen:
        target.conf.task_track_started = True
    if "extended" in chosen:
        target.conf.result_extended = True
    if "events" in chosen:
        target.conf.worker_send_task_events = True
        target.conf.task_send_sent_event = True


switch_on(app, os.environ.get("BENCH_FARM_VARIANT", ""))
