"""What acknowledged writes cost on a replicated Redis, and how long a failover stops the farm.

A primary, two replicas and three sentinels (``ReplicatedRedis``, as ``celeryfarm up
--replicas 2`` runs them, ``down-after-milliseconds`` 1000). Measured with ``WAIT``
(``CELERYFARM_WAIT_REPLICAS=1``, the default) and without (``0``): a client and a render
node of two slots for each, on a pool of their own; and a lone Redis with no replica
(``up`` without ``--replicas``), the same way. Samples alternate between the three:

* submitJob p50 and p99: ``Farm.submit_commands`` of a one-step job to a pool no node
  serves (its render context made beforehand, as Katana's createTemporaryDirectory does);
* a 20-step job of ``true``, submission to Completed (the record's end), median of runs.

Then the failover bound: the primary SIGKILLed while two-step jobs of 0.1 s renders run;
the time from the kill to the next job completing on the new primary.

    python -m benchmarks.failover [--quick]

Prints a table and replaces the failover section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.records.states import JobState
from celeryfarm.redisserver import ReplicatedRedis
from celeryfarm.testing.cluster import LocalCluster

from .common import median, percentile

NODE = "failover-bench"
IDLE_POOL = "failover-idle"
BEGIN, END = "<!-- failover results: begin -->", "<!-- failover results: end -->"
REPORT = Path(__file__).parent.parent / "BENCHMARKS.md"
#: Node timings as the tests use: lost steps found within seconds.
NODE_ENV = {"CELERYFARM_POLL_SECONDS": "0.1", "CELERYFARM_LEASE_SECONDS": "6",
            "CELERYFARM_REAP_SECONDS": "0.5", "CELERYFARM_STOP_GRACE_SECONDS": "1"}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return value


def completed_at(farm: Farm, job_id: str) -> int | None:
    """The job's end (ms since the epoch) once Completed; raises if it ended otherwise."""
    state, end, reason = farm.store.redis.hmget(farm.store.keys.job(job_id), "state", "end",
                                                "reason")
    if state in (JobState.FAILED, JobState.CANCELLED):
        raise RuntimeError(f"job {job_id} ended {state}: {reason}")
    return int(end) if state == JobState.COMPLETED else None


def submit(farm: Farm, commands: list[list[str]], pool: str = "") -> str:
    context = farm.create_context()
    settings = {"pool": pool} if pool else None
    return farm.submit_commands(commands, context=context.name, settings=settings).job_id


#: What is compared: with ``WAIT``, without it (both on the replicated Redis), and a lone
#: Redis with no replica (``celeryfarm up`` without ``--replicas``).
VARIANTS = {"wait": {"CELERYFARM_WAIT_REPLICAS": "1"},
            "no wait": {"CELERYFARM_WAIT_REPLICAS": "0"}, "single": {}}


def measure(clusters: dict[str, LocalCluster], submits: int, runs: int
            ) -> dict[str, dict[str, float]]:
    """submitJob p50/p99 and the 20-step job's median (ms) of each variant: a node and a
    client of each, on a pool of their own, samples alternating so the machine's other
    load hits them alike."""
    farms: dict[str, Farm] = {}
    for label, env in VARIANTS.items():
        cluster, node = clusters[label], f"{NODE}-{label.replace(' ', '-')}"
        cluster.start_worker(node, concurrency=2, queues=_pool(label), env=env)
        farms[label] = Farm(Settings.from_env({**cluster.env, **env,
                                               "CELERYFARM_USER": "bench"}))
        cluster.wait_for_workers(farms[label].app, [node])
    times: dict[str, list[float]] = {label: [] for label in farms}
    chains: dict[str, list[float]] = {label: [] for label in farms}
    try:
        for block in range(-1, submits // 10):
            for label, farm in farms.items():
                for _ in range(10):
                    context = farm.create_context()
                    started = time.perf_counter()
                    farm.submit_commands([["renderboot", "--frames", "1-100"]],
                                         context=context.name, settings={"pool": IDLE_POOL})
                    if block >= 0:  # block -1 warms connections and scripts
                        times[label].append((time.perf_counter() - started) * 1000)
        for index in range(-1, runs):
            for label, farm in farms.items():
                started = time.time() * 1000
                job_id = submit(farm, [["true"]] * 20, pool=_pool(label))
                end = wait_for(lambda farm=farm, job_id=job_id: completed_at(farm, job_id),
                               120, "the 20-step job")
                if index >= 0:  # run -1 warms the nodes' pool processes
                    chains[label].append(end - started)
    finally:
        for label, cluster in clusters.items():
            cluster.stop_worker(f"{NODE}-{label.replace(' ', '-')}")
    return {label: {"submit50": median(times[label]), "submit99": percentile(times[label], 99),
                    "chain": median(chains[label])} for label in farms}


def _pool(label: str) -> str:
    return f"bench-{label.replace(' ', '-')}"


def failover_bound(cluster: LocalCluster, jobs: int) -> tuple[float, int]:
    """Seconds from the primary's SIGKILL to the next job completing, with renders
    running; and how many jobs had completed at the kill."""
    cluster.start_worker(NODE, concurrency=2)
    farm = Farm(Settings.from_env({**cluster.env, "CELERYFARM_USER": "bench"}))
    cluster.wait_for_workers(farm.app, [NODE])
    ids = [submit(farm, [["sleep", "0.1"]] * 2) for _ in range(jobs)]

    def done() -> set[str]:
        return {job_id for job_id in ids if completed_at(farm, job_id)}

    before = wait_for(lambda: len(found := done()) >= jobs // 4 and found, 120,
                      "a quarter of the jobs")
    servers = cluster.redis
    assert isinstance(servers, ReplicatedRedis)
    primary = servers.primary()
    killed = time.time()
    primary.process.kill()
    primary.process.wait()
    wait_for(lambda: done() - before, 120, "a job to complete after the kill")
    carried_on = time.time() - killed
    wait_for(lambda: len(done()) == jobs, 240, "every job")
    return carried_on, len(before)


def table(rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| figure | replicas, WAIT | replicas, no WAIT | WAIT's cost | one Redis, no "
             "replica |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    submits, runs, jobs = (100, 5, 40) if args.quick else (300, 15, 80)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="celeryfarm-failover-") as base:
        cluster = LocalCluster(Path(base) / "replicated", extra_env=NODE_ENV,
                               password="bench-" + uuid.uuid4().hex, replicas=2)
        single = LocalCluster(Path(base) / "single", extra_env=NODE_ENV)
        try:
            cluster.start()
            single.start()
            measured = measure({"wait": cluster, "no wait": cluster, "single": single},
                               submits, runs)
            carried_on, done = failover_bound(cluster, jobs)
        finally:
            single.stop()
            cluster.stop()
    figures = {"submit50": f"submitJob p50 (n={submits})", "submit99": "submitJob p99",
               "chain": f"20-step job of `true`, submit to Completed (median of {runs})"}
    rows = [(name, *_cells(*(measured[label][key] for label in VARIANTS)))
            for key, name in figures.items()]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join([
        BEGIN,
        f"Measured with `python -m benchmarks.failover{' --quick' if args.quick else ''}` "
        f"({time.monotonic() - started:.0f} s, load {load}): "
        f"a primary, 2 replicas, 3 sentinels, and a lone Redis; a node of 2 slots "
        f"for each variant, on this machine.",
        "",
        table(rows),
        "",
        f"- Failover: the primary SIGKILLed with {done} of {jobs} two-step jobs (0.1 s "
        f"renders) completed; the next job completed **{carried_on:.2f} s** after the kill "
        f"(down-after-milliseconds 1000: `up` uses 5000, so add about 4 s there).",
        END,
    ])
    print(text)
    report = REPORT.read_text()
    if BEGIN in report and END in report:
        head, _, rest = report.partition(BEGIN)
        report = head + text + rest.partition(END)[2]
    else:
        report = report.rstrip("\n") + "\n\n" + text + "\n"
    REPORT.write_text(report)
    return 0


def _cells(with_wait: float, without: float, single: float) -> tuple[str, ...]:
    return (f"{with_wait:.2f} ms", f"{without:.2f} ms",
            f"{with_wait - without:+.2f} ms ({with_wait / without:.2f}x)", f"{single:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
