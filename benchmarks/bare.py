"""The baseline: a bare Celery app with no farm bookkeeping, for ``celery -A benchmarks.bare``.

It shares with the farm's app only the settings that matter for a fair comparison: the same
Redis server (another database, so the two apps' workers and events never see each other),
JSON messages, late acknowledgement, prefetch 1 and the same visibility timeout. The workers
run the same prefork pool with the same concurrency. Everything the farm adds on top (job
records, priorities, task events, STARTED states, extended results, render logs, process-tree
handling) is left out: that is what the benchmarks measure.

The broker URL comes from ``BENCH_BARE_URL`` (the benchmark sets it for the workers it starts).
"""

from __future__ import annotations

import os
import subprocess

from celery import Celery

from celeryfarm.celery import celery_config
from celeryfarm.config import Settings

#: Settings copied from the farm's app: they change how messages flow, not what is recorded.
SHARED_SETTINGS = (
    "task_serializer", "result_serializer", "accept_content", "result_accept_content",
    "task_acks_late", "worker_prefetch_multiplier", "broker_connection_retry_on_startup",
)
#: The queue the bare workers serve.
QUEUE = "bare"


def create_app(url: str) -> Celery:
    farm = celery_config(Settings(broker_url=url))
    app = Celery("bare")
    app.conf.update({name: farm[name] for name in SHARED_SETTINGS})
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_transport_options={
            "visibility_timeout": farm["broker_transport_options"]["visibility_timeout"]
        },
        task_default_queue=QUEUE,
    )
    return app


app = create_app(os.environ.get("BENCH_BARE_URL", "redis://127.0.0.1:6379/1"))


@app.task(name="bare.run")
def run(argv: list[str]) -> int:
    """What a minimal Celery render task does: run the command, return its status."""
    return subprocess.run(argv, check=False).returncode
