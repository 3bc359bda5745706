"""What acknowledged writes cost on a replicated Redis, and how long a failover stops the farm.

A primary, two replicas and three sentinels (``ReplicatedRedis``, as ``celeryfarm up
--replicas 2`` runs them, ``down-after-milliseconds`` 1000) and one render node of two
slots. Measured twice, with ``WAIT`` (``CELERYFARM_WAIT_REPLICAS=1``, the default) and
without (``0``), for the client and the node alike:

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


def measure(cluster: LocalCluster, wait_replicas: int, submits: int, runs: int
            ) -> dict[str, float]:
    """submitJob p50/p99 and the 20-step job's median (ms), with this ``WAIT`` setting."""
    env = {"CELERYFARM_WAIT_REPLICAS": str(wait_replicas)}
    cluster.start_worker(NODE, concurrency=2, env=env)
    farm = Farm(Settings.from_env({**cluster.env, **env, "CELERYFARM_USER": "bench"}))
    try:
        cluster.wait_for_workers(farm.app, [NODE])
        contexts = [farm.create_context() for _ in range(submits + 20)]
        times = []
        for index, context in enumerate(contexts):
            started = time.perf_counter()
            farm.submit_commands([["renderboot", "--frames", "1-100"]], context=context.name,
                                 settings={"pool": IDLE_POOL})
            if index >= 20:  # the first ones warm connections and scripts
                times.append((time.perf_counter() - started) * 1000)
        chains = []
        for index in range(runs + 1):
            started = time.time() * 1000
            job_id = submit(farm, [["true"]] * 20)
            end = wait_for(lambda job_id=job_id: completed_at(farm, job_id), 120,
                           "the 20-step job")
            if index:  # the first one warms the node's pool processes
                chains.append(end - started)
    finally:
        cluster.stop_worker(NODE)
    return {"submit50": median(times), "submit99": percentile(times, 99),
            "chain": median(chains)}


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


def table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    lines = ["| figure | with WAIT | without | cost |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    submits, runs, jobs = (100, 3, 40) if args.quick else (300, 7, 80)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="celeryfarm-failover-") as base:
        cluster = LocalCluster(Path(base), extra_env=NODE_ENV,
                               password="bench-" + uuid.uuid4().hex, replicas=2)
        cluster.start()
        try:
            without = measure(cluster, 0, submits, runs)
            with_wait = measure(cluster, 1, submits, runs)
            carried_on, done = failover_bound(cluster, jobs)
        finally:
            cluster.stop()
    rows = [(f"submitJob p50 (n={submits})", *_cells(with_wait["submit50"], without["submit50"])),
            ("submitJob p99", *_cells(with_wait["submit99"], without["submit99"])),
            (f"20-step job of `true`, submit to Completed (median of {runs})",
             *_cells(with_wait["chain"], without["chain"]))]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join([
        BEGIN,
        f"Measured with `python -m benchmarks.failover{' --quick' if args.quick else ''}` "
        f"({time.monotonic() - started:.0f} s, load {load}): "
        f"a primary, 2 replicas, 3 sentinels, one node of 2 slots, on this machine.",
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


def _cells(with_wait: float, without: float) -> tuple[str, str, str]:
    return (f"{with_wait:.2f} ms", f"{without:.2f} ms",
            f"{with_wait - without:+.2f} ms ({with_wait / without:.2f}x)")


if __name__ == "__main__":
    raise SystemExit(main())
