"""Peak memory of a client process listing the history, run in a fresh interpreter.

    python -m benchmarks.memory plugin   # CeleryFarmPlugin().getJobs(None), CELERYFARM_* env
    python -m benchmarks.memory bare ID_FILE  # bare Celery: the states of the task ids listed

Prints one JSON object: resident memory after imports and set-up (``idle_mib``), the peak
(``peak_mib``: VmHWM; getrusage's ru_maxrss would count the parent's image from before exec)
and how many jobs were read.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import psutil


def _mib(value: float) -> float:
    return round(value / 1024 / 1024, 1)


def main(argv: list[str]) -> int:
    kind = argv[0]
    if kind == "plugin":
        from celeryfarm.plugin import CeleryFarmPlugin

        plugin = CeleryFarmPlugin()
        plugin.farm.store.redis.ping()
        idle = psutil.Process().memory_info().rss
        listed = plugin.getJobs(None)
    elif kind == "bare":
        from celery import states

        from .bare import app

        task_ids = Path(argv[1]).read_text().split()
        backend = app.backend
        backend.client.ping()
        idle = psutil.Process().memory_info().rss
        values = backend.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        listed = [backend.decode_result(v)["status"] if v else states.PENDING for v in values]
    else:
        raise SystemExit(f"unknown kind {kind!r}: plugin or bare")
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    print(json.dumps({"idle_mib": _mib(idle), "peak_mib": _mib(peak), "jobs": len(listed)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
