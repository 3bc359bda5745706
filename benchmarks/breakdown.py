"""Where a farm job's CPU goes: the farm with some Celery extras switched on.

    python -m benchmarks.breakdown [--jobs 300] [--runs 3]

For each variant it starts two farm nodes (``benchmarks.farmvariant``), runs one-step jobs
of ``true`` through the plug-in, and reports the CPU time per job of the nodes (renders
included), of Redis and of the submitting client, against bare Celery tasks on the bare
nodes. CPU time is much less disturbed by other load on the machine than elapsed time,
so the differences between variants are what each setting costs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from .common import load, median
from .farmvariant import switch_on
from .run import FULL, REPO, Bench, cpu_seconds, say

VARIANTS = ("", "events", "started", "extended", "events,started,extended")


def per_job(b: Bench, nodes: list[int], run: Callable[[], None], jobs: int) -> list[float]:
    """CPU ms per job of the nodes, Redis and this process while ``run`` runs."""
    redis = [b.cluster.redis.process.pid]
    before = cpu_seconds(nodes), cpu_seconds(redis), time.process_time()
    run()
    after = cpu_seconds(nodes), cpu_seconds(redis), time.process_time()
    return [(end - start) * 1000 / jobs for start, end in zip(before, after)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="celeryfarm-breakdown-"))
    b = Bench(base, FULL)
    say(f"load {load()}")
    try:
        b.start()
        b.bare_workers()
        bare_nodes = b.node_pids(["bare1", "bare2"])

        def farm_jobs() -> None:
            ids = [b.submit([["true"]], name="breakdown") for _ in range(args.jobs)]
            b.wait_farm(ids, interval=0.2)

        def bare_jobs() -> None:
            ids = [b.bare_signature(["true"]).apply_async().id for _ in range(args.jobs)]
            b.wait_bare(ids, interval=0.2)

        say("CPU ms per one-step job: nodes (with `true`) + Redis + client = total")
        for variant in VARIANTS:
            names = [f"variant{index}" for index in (1, 2)]
            env = {"BENCH_FARM_VARIANT": variant, "PYTHONPATH": str(REPO)}
            for name in names:
                b.cluster.start_worker(name, concurrency=1, app="benchmarks.farmvariant",
                                       events="events" in variant, env=env)
            b.cluster.wait_for_workers(b.farm.app, names)
            b.farm.app.conf.task_send_sent_event = False
            switch_on(b.farm.app, variant)  # the client's side of the events setting
            nodes = b.node_pids(names)
            farm_jobs(), bare_jobs()  # warm-up
            farm, bare = [], []
            for _ in range(args.runs):
                farm.append(per_job(b, nodes, farm_jobs, args.jobs))
                bare.append(per_job(b, bare_nodes, bare_jobs, args.jobs))
            f = [median(column) for column in zip(*farm)]
            g = [median(column) for column in zip(*bare)]
            say(f"  farm {variant or 'as configured':34} {f[0]:5.2f} + {f[1]:4.2f} + "
                f"{f[2]:4.2f} = {sum(f):5.2f}   bare {g[0]:5.2f} + {g[1]:4.2f} + {g[2]:4.2f}"
                f" = {sum(g):5.2f}")
            for name in names:
                b.cluster.stop_worker(name)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        b.stop()
        shutil.rmtree(base, ignore_errors=True)
    say(f"load {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
