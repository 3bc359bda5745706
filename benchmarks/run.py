"""Measure what the farm adds on top of bare Celery, and report it against the targets.

    python -m benchmarks.run            # everything (a few minutes); updates BENCHMARKS.md
    python -m benchmarks.run --quick    # smaller samples, about a minute; prints only
    python -m benchmarks.run --only 2 4 # some figures

It starts its own Redis (a private ``redis-server``), two farm render nodes
(``celeryfarm worker``) and two bare-Celery nodes (``celery -A benchmarks.bare
worker``) with the same pool and concurrency, and stops all of them (and every render it
started) when it ends, is interrupted or fails. Each figure is one function below; each
measures the farm through the Katana plug-in (:class:`CeleryFarmPlugin`) and its baseline in
the same run, alternating between the two so that load from elsewhere hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import psutil
from celery import chain, states

from celeryfarm import nodegraphapi
from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.farmapi import FarmPluginManager
from celeryfarm.jobs import JobRecord, JobSpec
from celeryfarm.plugin import CeleryFarmPlugin, register_farm_settings
from celeryfarm.records import FINISHED, JobState
from celeryfarm.records.keys import new_job_id
from celeryfarm.testing.cluster import LocalCluster

from . import bare, history, watched
from .common import (
    Row,
    command_line,
    load,
    machine,
    median,
    now_text,
    percentile,
    report,
    text_table,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
JobRequest = FarmPluginManager.JobRequest
#: A queue no worker serves: submissions measured in figure 1 wait there, then are purged.
IDLE_QUEUE = "bench-idle"
FARM_NODES = ("farm1", "farm2")
BARE_NODES = ("bare1", "bare2")
#: Render slots per node: two nodes of one slot each, as two render machines would be.
CONCURRENCY = 1
HISTORY = 10_000
RENDERBOOT = [sys.executable, "-m", "celeryfarm.testing.renderboot"]
#: A render that prints a timestamp every interval (figure 6).
PRINTER = (
    "import sys, time\n"
    "count, interval = int(sys.argv[1]), float(sys.argv[2])\n"
    "for _ in range(count):\n"
    "    print(f'tick {time.time():.6f}', flush=True)\n"
    "    time.sleep(interval)\n"
)


def wait_all(ids: Sequence[str], last_done: Callable[[str], bool],
             read: Callable[[list[str]], list], timeout: float, interval: float,
             what: str) -> list:
    """Wait until ``read`` (a batch read: a value per id, None while it is not done) has a
    value for every id; return those values. Ids end about in order: the last one is
    waited for alone first, so polling a thousand of them does not take CPU from the nodes
    meanwhile."""
    remaining = list(ids)
    found: list = []
    deadline = time.monotonic() + timeout
    while len(remaining) > 1 and time.monotonic() < deadline and not last_done(remaining[-1]):
        time.sleep(interval)
    while remaining:
        values = read(remaining)
        found += [value for value in values if value is not None]
        remaining = [item for item, value in zip(remaining, values) if value is None]
        if remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(remaining)} {what} not finished in {timeout} s")
            time.sleep(interval)
    return found


@dataclasses.dataclass(frozen=True)
class Sizes:
    submits: int  # figure 1, per side
    chains: int  # figure 2, runs per side
    throughput_jobs: int  # figure 3
    throughput_runs: int
    stops: int  # figure 4
    bare_stops: int
    log_jobs: int  # figure 6
    log_lines: int
    listings: int  # figure 5
    state_reads: int
    memory_runs: int  # plug-in memory
    node_losses: int  # figure 7
    memory_jobs: int  # figure 9
    big_history: int  # figure 10


FULL = Sizes(1000, 15, 1000, 3, 20, 2, 3, 40, 15, 1000, 3, 3, 1000, 100_000)
QUICK = Sizes(200, 5, 200, 1, 5, 1, 1, 20, 5, 200, 1, 1, 200, 20_000)


class Bench:
    """The cluster, the clients, and what the figures share."""

    def __init__(self, base: Path, sizes: Sizes) -> None:
        self.base = base
        self.sizes = sizes
        self.cluster = LocalCluster(base / "farm")
        self.history_ids: list[str] = []
        self.bare_history_ids: list[str] = []
        self.baseline_pids: list[psutil.Process] = []  # renders the bare revoke left behind
        self.rss = RssSampler()
        self.notes: list[str] = []
        self._started: set[str] = set()

    # -- set-up and tear-down ----------------------------------------------------------------
    def start(self) -> None:
        self.cluster.start()
        self.env = {**os.environ, **self.cluster.env}
        self.settings = Settings.from_env(self.env)
        self.farm = Farm(self.settings)
        self.plugin = CeleryFarmPlugin(self.farm)
        self.bare_url = self.cluster.redis.url.rsplit("/", 1)[0] + "/1"
        self.bare_app = bare.create_app(self.bare_url)
        self.redis = self.farm.store.redis
        self.bare_redis = self.bare_app.backend.client

    def farm_workers(self) -> None:
        if "farm" not in self._started:
            for name in FARM_NODES:
                self.cluster.start_worker(name, concurrency=CONCURRENCY)
            self.cluster.wait_for_workers(self.farm.app, list(FARM_NODES))
            self._started.add("farm")

    def bare_workers(self) -> None:
        if "bare" not in self._started:
            env = {"BENCH_BARE_URL": self.bare_url, "PYTHONPATH": str(REPO)}
            for name in BARE_NODES:
                self.cluster.start_worker(name, concurrency=CONCURRENCY, queues=bare.QUEUE,
                                          env=env, app="benchmarks.bare", events=False)
            self.cluster.wait_for_workers(self.bare_app, list(BARE_NODES))
            self._started.add("bare")

    def stop(self) -> None:
        """Stop everything this run started; safe to call more than once. Ctrl-C and
        SIGTERM are ignored meanwhile, so a second one cannot leave processes behind."""
        ignored = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
        try:
            kill_all(self.baseline_pids)
            self.rss.stop()
            workers = list(self.cluster.workers.values())
            descendants = []  # pool processes (and renders) of a worker that must be killed
            for process in workers:
                with contextlib.suppress(psutil.Error):
                    descendants += psutil.Process(process.pid).children(recursive=True)
                with contextlib.suppress(OSError):
                    process.terminate()  # all at once: warm shutdowns run side by side
            for name in list(self.cluster.workers):
                with contextlib.suppress(Exception):
                    self.cluster.stop_worker(name, timeout=20)
            kill_all(descendants)
            self.cluster.redis.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def node_pids(self, names: Sequence[str]) -> list[int]:
        return [self.cluster.workers[name].pid for name in names]

    # -- the history -------------------------------------------------------------------------
    def ensure_history(self) -> None:
        """10,000 finished and some waiting jobs in the farm's records, and as many finished
        task results for the bare baseline, written in pipelines."""
        if self.history_ids:
            return
        started = time.monotonic()
        host = socket.gethostname()
        first = int(time.time() * 1000) - HISTORY * 60_000  # a job a minute
        records = []
        for index in range(HISTORY):
            job_id = new_job_id(self.farm.user)  # as submitJob names them
            context = f"history-{index:05d}"
            state = (JobState.WAITING if index >= HISTORY - 50 else
                     JobState.FAILED if index % 40 == 0 else
                     JobState.CANCELLED if index % 50 == 1 else JobState.COMPLETED)
            spec = JobSpec.build(
                name=f"sq{index // 100:03d}_sh{index % 100:03d}_lighting",
                commands=[["renderboot", "--frames", "1-100", "--render-context", context,
                           "--scene", f"/shared/{context}/scene.katana"]],
                environment={"KATANA_TMPDIR": f"/shared/{context}"},
                frames=range(1, 101),
                context=context,
                user=self.farm.user,
                host=host,
                session=f"{host}-session-{index // 500}",
            )
            submitted = first + index * 60_000
            finished = state != JobState.WAITING
            records.append(JobRecord(
                job_id=job_id, spec=spec, log_path=f"{context}/render.log", state=state,
                task_ids=(f"{job_id}-1-0",), submitted_ms=submitted,
                start_ms=submitted + 1_000 if finished else None,
                end_ms=submitted + 50_000 if finished else None,
                step=0 if finished else None,
                node=f"farm1@{host}" if finished else "",
                reason="step 1 failed: exit status 1" if state == JobState.FAILED else
                       "stopped by bench" if state == JobState.CANCELLED else "",
            ))
        self.farm.store.create_many(records)
        self.history_ids = [record.job_id for record in records]

        backend = self.bare_app.backend
        self.bare_history_ids = [uuid.uuid4().hex for _ in range(HISTORY)]
        done = datetime.datetime.now(datetime.timezone.utc).isoformat()
        pipe = self.bare_redis.pipeline(transaction=False)
        for task_id in self.bare_history_ids:
            meta = {"status": states.SUCCESS, "result": 0, "traceback": None, "children": [],
                    "date_done": done, "task_id": task_id}
            pipe.set(backend.get_key_for_task(task_id), backend.encode(meta))
        pipe.execute()
        say(f"  history: {HISTORY} farm jobs and {HISTORY} bare results written "
            f"in {time.monotonic() - started:.1f} s")

    # -- running jobs ------------------------------------------------------------------------
    def submit(self, commands: list[list[str]], name: str = "bench") -> str:
        context = self.farm.create_context()
        return self.farm.submit_commands(commands, context=context.name, name=name).job_id

    def wait_farm(self, job_ids: Sequence[str], timeout: float = 300.0,
                  interval: float = 0.005) -> list[int]:
        """Wait until every job has finished; return their end times (ms since the epoch).
        Raises if one ended otherwise than Completed."""
        store = self.farm.store

        def last_done(job_id: str) -> bool:
            return self.redis.hget(store.keys.job(job_id), "state") in FINISHED

        def ends(job_ids: list[str]) -> list[int | None]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(store.keys.job(job_id), "state", "end", "reason")
            found: list[int | None] = []
            for job_id, (state, end, reason) in zip(job_ids, pipe.execute()):
                if state in FINISHED and state != JobState.COMPLETED:
                    raise RuntimeError(f"farm job {job_id} ended {state}: {reason}")
                found.append(int(end) if state in FINISHED else None)
            return found

        return wait_all(job_ids, last_done, ends, timeout, interval, "farm jobs")

    def wait_bare(self, task_ids: Sequence[str], timeout: float = 300.0,
                  interval: float = 0.005) -> list[float]:
        """Wait until every bare task has succeeded; return their done times (s)."""
        backend = self.bare_app.backend

        def last_done(task_id: str) -> bool:
            return self.bare_app.AsyncResult(task_id).state in states.READY_STATES

        def done_times(task_ids: list[str]) -> list[float | None]:
            values = backend.mget([backend.get_key_for_task(t) for t in task_ids])
            found: list[float | None] = []
            for task_id, value in zip(task_ids, values):
                meta = backend.decode_result(value) if value else None
                if not meta or meta["status"] not in states.READY_STATES:
                    found.append(None)
                    continue
                if meta["status"] != states.SUCCESS or meta["result"] != 0:
                    raise RuntimeError(f"bare task {task_id} ended {meta['status']}: "
                                       f"{meta['result']}")
                found.append(datetime.datetime.fromisoformat(meta["date_done"]).timestamp())
            return found

        return wait_all(task_ids, last_done, done_times, timeout, interval, "bare tasks")

    def bare_signature(self, argv: list[str], queue: str = bare.QUEUE):
        return self.bare_app.signature("bare.run", args=(argv,), immutable=True, queue=queue)

    def find_tree(self, nodes: Sequence[str], tag: str, count: int,
                  timeout: float = 60.0) -> list[psutil.Process]:
        """The render processes (command line carrying ``tag``) under the nodes' workers,
        once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            for pid in self.node_pids(nodes):
                with contextlib.suppress(psutil.Error):
                    for proc in psutil.Process(pid).children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            if tag in proc.cmdline():
                                found.append(proc)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"render tree {tag}: {len(found)} of {count} processes")
            time.sleep(0.02)


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time used so far by these processes and their children, the reaped ones (the
    renders) included."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(pid)]
            procs += procs[0].children()
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system + times.children_user
                    total += times.children_system
    return total


def running(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie has exited: it only waits to be reaped)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> tuple[float, list]:
    """Poll until every process has exited; return (time.perf_counter() when the last was
    seen gone, the ones still running at the timeout)."""
    alive = list(procs)
    deadline = time.perf_counter() + timeout
    while alive and time.perf_counter() < deadline:
        alive = [proc for proc in alive if running(proc)]
        if alive:
            time.sleep(0.001)
    return time.perf_counter(), alive


def kill_all(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs([p for p in procs if running(p)], timeout=5)


class RssSampler:
    """Peak resident memory of worker nodes: the worker's main process plus its pool
    processes, without the renders they run (those belong to the renderer, not the farm)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def node_rss(pid: int) -> int:
        main = psutil.Process(pid)
        total = main.memory_info().rss
        for child in main.children():
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    @contextlib.contextmanager
    def watching(self, groups: dict[str, list[int]], interval: float = 0.1) -> Iterator[None]:
        def sample() -> None:
            while not self._stop.wait(interval):
                for group, pids in groups.items():
                    for pid in pids:
                        with contextlib.suppress(psutil.Error):
                            rss = self.node_rss(pid) / 1024 / 1024
                            self.peaks[group] = max(self.peaks.get(group, 0.0), rss)

        self._stop.clear()
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def say(text: str) -> None:
    print(text, flush=True)


def ms(seconds: float) -> float:
    return seconds * 1000


# ===========================================================================================
# The figures: each returns its rows.
# ===========================================================================================
def fig1_submit(b: Bench) -> list[Row]:
    """submitJob latency with 10,000 jobs in the history, against a bare
    ``chain(...).apply_async()`` of the same step. Both go to a queue no worker serves (so
    nothing runs meanwhile); the queues and the jobs are removed afterwards."""
    b.ensure_history()
    n, block, warm = b.sizes.submits, 50, 20
    argv = ["renderboot", "--frames", "1-100", "--scene", "/shared/ctx/scene.katana"]
    contexts = [f"submit-{index:05d}" for index in range(n + warm)]
    register_farm_settings()  # the Render node sends its jobs to the idle pool
    node = nodegraphapi.CreateNode("Render")
    node.getParameter("farmSettings.pool").setValue(IDLE_QUEUE, 0)
    # Katana calls createTemporaryDirectory before submitJob
    temp_dirs = [b.plugin.createTemporaryDirectory(context) for context in contexts]
    requests = [JobRequest(node.getName(), context, list(range(1, 101)), [shlex.join(argv)],
                           b.plugin.getEnvironmentForJob(context), temp_dir)
                for context, temp_dir in zip(contexts, temp_dirs)]
    farm_times: list[float] = []
    bare_times: list[float] = []
    job_ids: list[str] = []

    def farm_block(batch: Sequence) -> None:
        for request in batch:
            started = time.perf_counter()
            job_ids.append(b.plugin.submitJob(request))
            farm_times.append(time.perf_counter() - started)

    def bare_block(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            chain(b.bare_signature(argv, queue=IDLE_QUEUE)).apply_async()
            bare_times.append(time.perf_counter() - started)

    farm_block(requests[:warm])
    bare_block(warm)
    del farm_times[:], bare_times[:]
    for start in range(warm, n + warm, block):
        farm_block(requests[start:start + block])
        bare_block(min(block, n + warm - start))

    # Leave the history as it was: drop the submitted jobs and the idle queues.
    store = b.farm.store
    pipe = b.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.delete(store.keys.job(job_id), store.keys.events(job_id))
        pipe.zrem(store.keys.index(), job_id)
        pipe.zrem(store.keys.index("user", b.settings.user), job_id)
        pipe.zrem(store.keys.index("session", b.plugin.session), job_id)
    pipe.execute()
    for client in (b.redis, b.bare_redis):
        keys = list(client.scan_iter(f"{IDLE_QUEUE}*"))
        if keys:
            client.delete(*keys)
    for context in contexts:
        shutil.rmtree(b.settings.shared_root / context, ignore_errors=True)

    farm50, bare50 = ms(median(farm_times)), ms(median(bare_times))
    farm99, bare99 = ms(percentile(farm_times, 99)), ms(percentile(bare_times, 99))
    base = "bare chain.apply_async"
    return [
        Row("1", f"submitJob p50 ({HISTORY:,} jobs in history, n={n})", "ms", farm50, bare50,
            base, "<= 1.3x", farm50 <= 1.3 * bare50),
        Row("1", "submitJob p99", "ms", farm99, bare99, base),
    ]


def fig2_steps(b: Bench) -> list[Row]:
    """A 20-step job of ``true`` from submission to Completed, against a bare Celery chain of
    20 tasks running ``true`` in a subprocess, and against 20 ``subprocess.run(['true'])``.
    End times come from the farm's record and from Celery's ``date_done``."""
    b.farm_workers()
    b.bare_workers()
    steps, runs = 20, b.sizes.chains
    commands = [["true"]] * steps
    farm, chained, local = [], [], []

    def one_farm() -> float:
        started = time.time()
        job_id = b.submit(commands, name="20 steps")
        (end,) = b.wait_farm([job_id])
        return end - ms(started)

    def one_bare() -> float:
        started = time.time()
        result = chain(*(b.bare_signature(argv) for argv in commands)).apply_async()
        (done,) = b.wait_bare([result.id])
        return ms(done - started)

    def one_local() -> float:
        started = time.perf_counter()
        for argv in commands:
            subprocess.run(argv, check=True)
        return ms(time.perf_counter() - started)

    one_farm(), one_bare(), one_local()  # warm-up: imports, connections, pool processes
    for index in range(runs):
        order = [(farm, one_farm), (chained, one_bare), (local, one_local)]
        for samples, measure in order if index % 2 else reversed(order):
            samples.append(measure())
    farm_ms, bare_ms, local_ms = median(farm), median(chained), median(local)
    return [
        Row("2", f"20-step job of `true`, submit to Completed (median of {runs})", "ms",
            farm_ms, bare_ms, "bare 20-task chain", "<= 1.3x bare chain",
            farm_ms <= 1.3 * bare_ms),
        Row("2", "  per step", "ms", farm_ms / steps, bare_ms / steps, "bare chain"),
        Row("2", "  against local subprocess.run", "ms", farm_ms, local_ms,
            "20x subprocess.run"),
    ]


def fig3_throughput(b: Bench) -> list[Row]:
    """1,000 one-step jobs of ``true`` on the two nodes, from the first submission to the last
    end, against 1,000 bare Celery tasks running ``true`` in a subprocess on the bare nodes.
    Also samples the nodes' memory meanwhile."""
    b.farm_workers()
    b.bare_workers()
    n, runs = b.sizes.throughput_jobs, b.sizes.throughput_runs
    farm_rates, bare_rates, farm_cpu, bare_cpu = [], [], [], []
    farm_pids = [*b.node_pids(FARM_NODES), b.cluster.redis.process.pid]
    bare_pids = [*b.node_pids(BARE_NODES), b.cluster.redis.process.pid]

    def farm_run() -> None:
        cpu, started = cpu_seconds(farm_pids), time.time()
        ids = [b.submit([["true"]], name=f"throughput {i}") for i in range(n)]
        ends = b.wait_farm(ids, interval=0.2)
        farm_rates.append(n / (max(ends) / 1000 - started))
        farm_cpu.append(ms(cpu_seconds(farm_pids) - cpu) / n)

    def bare_run() -> None:
        cpu, started = cpu_seconds(bare_pids), time.time()
        ids = [b.bare_signature(["true"]).apply_async().id for _ in range(n)]
        done = b.wait_bare(ids, interval=0.2)
        bare_rates.append(n / (max(done) - started))
        bare_cpu.append(ms(cpu_seconds(bare_pids) - cpu) / n)

    groups = {"farm": b.node_pids(FARM_NODES), "bare": b.node_pids(BARE_NODES)}
    with b.rss.watching(groups):
        for index in range(runs):
            for run in (farm_run, bare_run) if index % 2 == 0 else (bare_run, farm_run):
                run()
    farm_rate, bare_rate = median(farm_rates), median(bare_rates)
    farm_rss, bare_rss = b.rss.peaks.get("farm"), b.rss.peaks.get("bare")
    return [
        Row("3", f"throughput, {n} one-step jobs on 2 nodes (median of {runs})", "jobs/s",
            farm_rate, bare_rate, "bare tasks", ">= 0.8x", farm_rate >= 0.8 * bare_rate),
        Row("3", "  CPU per job: nodes (with `true`) + Redis", "ms", median(farm_cpu),
            median(bare_cpu), "bare"),
        Row("mem", "worker node peak RSS while rendering (main + pool)", "MiB", farm_rss,
            bare_rss, "bare node"),
    ]


def fig4_stop(b: Bench) -> list[Row]:
    """stopJob on a running job whose render is a tree of 10 processes (renderboot, 3 helpers,
    6 helpers of helpers), until the last of them has exited. The baseline revokes a bare task
    running the same tree with ``terminate=True`` and counts what is left."""
    b.farm_workers()
    b.bare_workers()
    tree = ["--live", "--seconds", "0.5", "--children", "3", "--grandchildren", "2"]
    size = 1 + 3 * (1 + 2)
    stops, calls = [], []
    for index in range(b.sizes.stops + 1):
        tag = f"stop-{index}-{uuid.uuid4().hex[:8]}"
        job_id = b.submit([[*RENDERBOOT, *tree, "--tag", tag]], name="stop me")
        procs = b.find_tree(FARM_NODES, tag, size)
        started = time.perf_counter()
        b.plugin.stopJob(job_id)
        returned = time.perf_counter()
        gone, alive = wait_gone(procs, timeout=30)
        if alive:
            kill_all(alive)
            raise RuntimeError(f"stopJob left {len(alive)} processes of {tag} running")
        if index:  # the first one is a warm-up
            stops.append(ms(gone - started))
            calls.append(ms(returned - started))
        while b.plugin.getJobState(job_id) != JobState.CANCELLED:
            time.sleep(0.01)

    survivors = []
    for index in range(b.sizes.bare_stops):
        tag = f"bare-stop-{index}-{uuid.uuid4().hex[:8]}"
        result = b.bare_signature([*RENDERBOOT, *tree, "--tag", tag]).apply_async()
        procs = b.find_tree(BARE_NODES, tag, size)
        b.baseline_pids.extend(procs)
        b.bare_app.control.revoke(result.id, terminate=True, signal="SIGTERM")
        _, alive = wait_gone(procs, timeout=3.0)
        survivors.append(len(alive))
        kill_all(procs)
    left = max(survivors) if survivors else 0
    bare_text = (f"never: {left} of {size} processes still ran 3 s after the revoke"
                 if left else "all gone")
    p50, p99 = median(stops), percentile(stops, 99)
    return [
        Row("4", f"stopJob until the 10-process render tree is gone, p99 (n={len(stops)})",
            "ms", p99, None, target="p99 < 500 ms", met=p99 < 500,
            baseline_text=bare_text, baseline_name="bare revoke(terminate=True)"),
        Row("4", "  p50", "ms", p50),
        Row("4", "  stopJob call itself, p50", "ms", median(calls)),
    ]


def fig5_listing(b: Bench) -> list[Row]:
    """getJobs(None) and getJobState with 10,000 jobs in the history (50 of them waiting):
    the first call of a fresh plug-in (a new Katana session: it starts from the user's
    listing snapshot), the same with no snapshot (the user's first session: every record
    read), and a second call with nothing changed. Baselines: reading the states of 10,000
    bare Celery results in one MGET, and one ``AsyncResult(id).state``."""
    b.ensure_history()
    listings, warm, reads, unsnapped = [], [], [], []
    bare_listings, bare_reads = [], []
    backend = b.bare_app.backend

    def bare_listing() -> int:
        values = backend.mget([backend.get_key_for_task(t) for t in b.bare_history_ids])
        return len([backend.decode_result(v)["status"] for v in values if v])

    for index in range(b.sizes.listings + 1):
        plugin = CeleryFarmPlugin(Farm(b.settings))
        plugin.farm.store.redis.ping()  # connected, as a plug-in in use is
        started = time.perf_counter()
        jobs = plugin.getJobs(None)
        middle = time.perf_counter()
        count = bare_listing()
        ended = time.perf_counter()
        plugin.getJobs(None)
        warm.append(time.perf_counter() - ended)
        if len(jobs) < HISTORY or count < HISTORY:
            raise RuntimeError(f"listed {len(jobs)} farm jobs and {count} bare results")
        if index:
            listings.append(middle - started)
            bare_listings.append(ended - middle)
    for _ in range(b.sizes.listings):
        b.farm.store.redis.delete(b.farm.store.keys.snapshot(b.settings.user))
        plugin = CeleryFarmPlugin(Farm(b.settings))
        plugin.farm.store.redis.ping()
        started = time.perf_counter()
        plugin.getJobs(None)
        unsnapped.append(time.perf_counter() - started)
    picks = random.Random(6).choices(range(HISTORY), k=b.sizes.state_reads)
    for index in picks:
        job_id, task_id = b.history_ids[index], b.bare_history_ids[index]
        started = time.perf_counter()
        b.plugin.getJobState(job_id)
        middle = time.perf_counter()
        b.bare_app.AsyncResult(task_id).state  # noqa: B018 - the read is what is timed
        bare_reads.append(time.perf_counter() - middle)
        reads.append(middle - started)
    listing, bare_list = ms(median(listings)), ms(median(bare_listings))
    read50, bare50 = ms(median(reads)), ms(median(bare_reads))
    again = ms(median(warm[1:]))
    return [
        Row("5", f"getJobs(None), {HISTORY:,} jobs listed, first call of a fresh plug-in "
            f"(median of {len(listings)})", "ms", listing, bare_list, "MGET of 10k results",
            "< 100 ms", listing < 100),
        Row("5", "  the same with no listing snapshot (the user's first session: every "
            "record read, the snapshot written)", "ms", ms(median(unsnapped)), bare_list,
            "MGET of 10k results"),
        Row("5", "getJobs(None) again, nothing changed", "ms", again, target="< 5 ms",
            met=again < 5),
        Row("5", f"getJobState p50 (n={len(reads)})", "ms", read50, bare50,
            "AsyncResult.state", "< 2 ms", read50 < 2),
        Row("5", "getJobState p99", "ms", ms(percentile(reads, 99)),
            ms(percentile(bare_reads, 99)), "AsyncResult.state"),
    ]


def fig6_log(b: Bench) -> list[Row]:
    """A render prints a timestamped line every 50 ms; the benchmark follows the render log
    through the shared root and times each line from print to readable. The baseline is
    the same program with its output going straight to a file on the same root."""
    b.farm_workers()
    lines, interval = b.sizes.log_lines, 0.05
    printer = [sys.executable, "-c", PRINTER, str(lines), str(interval)]
    farm, direct = [], []
    for index in range(b.sizes.log_jobs):
        job_id = b.submit([printer], name="log latency")
        path = Path(b.plugin.getRenderLogFilename(job_id))
        farm += follow(path, lines, timeout=60)
        b.wait_farm([job_id])

        path = b.settings.shared_root / f"direct-{index}.log"
        with open(path, "ab") as output:
            process = subprocess.Popen(printer, stdout=output, stderr=subprocess.STDOUT)
        try:
            direct += follow(path, lines, timeout=60)
        finally:
            process.kill()
            process.wait()
    worst, bare_worst = ms(max(farm)), ms(max(direct))
    return [
        Row("6", f"log line printed to readable in the log, worst of {len(farm)}", "ms",
            worst, bare_worst, "output straight to a file", "< 250 ms", worst < 250),
        Row("6", "  p50", "ms", ms(median(farm)), ms(median(direct)), "straight to a file"),
    ]


def follow(path: Path, count: int, timeout: float) -> list[float]:
    """Read ``path`` as it grows (every millisecond) until ``count`` tick lines have been
    seen; return each line's delay from its timestamp to when it was read (s)."""
    delays: list[float] = []
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)
    pending = b""
    with open(path, "rb") as log:
        while len(delays) < count:
            data = log.read()
            now = time.time()
            if data:
                pending += data
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    if line.startswith(b"tick "):
                        delays.append(now - float(line.split()[1]))
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{path}: {len(delays)} of {count} lines in {timeout} s")
            else:
                time.sleep(0.001)
    return delays


def fig7_node_loss(b: Bench) -> list[Row]:
    """Time from a node's death to its step running on the other node (the step's second
    start in the job's record), with the default lease and reaper settings. A dead machine
    is emulated by SIGKILL of the worker and everything under it (render included) at once;
    a crashed worker on a live machine by SIGKILL of the worker's main process alone. The
    baseline is when bare Celery (acks_late) would deliver the message again: after the
    visibility timeout."""
    b.farm_workers()
    settings = b.settings
    machine, worker = [], []
    for index in range(2 * b.sizes.node_losses):
        whole_node = index % 2 == 0
        tag = f"node-loss-{index}-{uuid.uuid4().hex[:8]}"
        job_id = b.submit([[*RENDERBOOT, "--seconds", "600", "--tag", tag]], name="node loss")
        (render,) = b.find_tree(FARM_NODES, tag, 1)
        ancestors = {proc.pid for proc in render.parents()}
        victim = next(name for name in FARM_NODES if b.node_pids([name])[0] in ancestors)
        main = psutil.Process(b.node_pids([victim])[0])
        doomed = main.children(recursive=True)
        b.baseline_pids.extend(doomed)  # whatever the dead node leaves is killed at the end
        killed = time.time()
        for proc in [main, *doomed] if whole_node else [main]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + settings.lease_seconds + settings.reap_seconds + 60
        while True:
            starts = [e for e in b.farm.store.events(job_id) if e["event"] == "start"]
            if len(starts) > 1:
                (machine if whole_node else worker).append(starts[1]["at"] / 1000 - killed)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not start again after its node died")
            time.sleep(0.02)
        b.plugin.stopJob(job_id)
        b.cluster.stop_worker(victim)  # reaps the killed worker
        kill_all(doomed)
        b.cluster.start_worker(victim, concurrency=CONCURRENCY)
        b.cluster.wait_for_workers(b.farm.app, [victim])
        while b.plugin.getJobState(job_id) != JobState.CANCELLED:
            time.sleep(0.01)
    bare = f"{settings.visibility_timeout:,} s"
    return [
        Row("7", f"node death (worker, pool and render killed) to step running elsewhere, "
            f"median of {len(machine)}; lease {settings.lease_seconds:g} s, reaper every "
            f"{settings.reap_seconds:g} s", "s", median(machine), baseline_text=bare,
            baseline_name="bare acks_late: the visibility timeout"),
        Row("7", "  slowest", "s", max(machine)),
        Row("7", f"worker crash (main process killed, machine alive), median of {len(worker)}",
            "s", median(worker), baseline_text=bare, baseline_name="bare acks_late"),
    ]


def fig8_plugin_memory(b: Bench) -> list[Row]:
    """Peak memory of a fresh plug-in process listing 10,000 jobs (getJobs(None)), against a
    fresh bare-Celery client reading the states of 10,000 results."""
    b.ensure_history()
    ids_file = b.base / "bare-ids.txt"
    ids_file.write_text("\n".join(b.bare_history_ids))
    env = {**b.env, "BENCH_BARE_URL": b.bare_url, "PYTHONPATH": str(REPO),
           "CELERYFARM_USER": b.settings.user}
    farm, baseline = [], []
    for _ in range(b.sizes.memory_runs):
        for kind, samples in (("plugin", farm), ("bare", baseline)):
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", kind, str(ids_file)],
                env=env, cwd=REPO, capture_output=True, text=True, check=True,
            ).stdout
            samples.append(json.loads(output))
    peak = median([s["peak_mib"] for s in farm])
    idle = median([s["idle_mib"] for s in farm])
    bare_peak = median([s["peak_mib"] for s in baseline])
    return [Row("mem", f"plug-in peak RSS, getJobs(None) of {farm[0]['jobs']:,} jobs "
                f"({idle:.0f} MiB before)", "MiB", peak, bare_peak, "bare client, 10k states")]


FIGURES: dict[int, tuple[str, Callable[[Bench], list[Row]]]] = {
    1: ("submitJob latency", fig1_submit),
    2: ("per-step overhead", fig2_steps),
    3: ("throughput and worker memory", fig3_throughput),
    4: ("stop", fig4_stop),
    5: ("getJobs and getJobState", fig5_listing),
    6: ("log latency", fig6_log),
    7: ("node-loss recovery", fig7_node_loss),
    8: ("plug-in memory", fig8_plugin_memory),
    9: ("Redis memory per finished job", history.fig9_job_memory),
    10: ("a big history: listing and retention", history.fig10_big_history),
    11: ("with Flower running", watched.fig11_flower),
}
#: Run order: the listings first, while the history holds exactly the 10,000 jobs; Flower
#: last, as the task events it turns on stay on until it turns them off.
ORDER = (5, 8, 1, 2, 3, 9, 10, 6, 4, 7, 11)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples (about a minute)")
    parser.add_argument("--only", type=int, nargs="+", choices=sorted(FIGURES),
                        metavar="N", help="run only these figures (8: plug-in memory)")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                        help="update BENCHMARKS.md (default: only for a full run)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args(argv)


def figure_order(row: Row) -> tuple[int, str]:
    """Rows by figure number ("1F" after "1", "10" after "9"), "mem" last."""
    digits = "".join(itertools.takewhile(str.isdigit, row.figure))
    return int(digits) if digits else 99, row.figure


def method(figure: Callable) -> str:
    """The first paragraph of a figure's docstring, on one line."""
    return " ".join((figure.__doc__ or "").split("\n\n")[0].split())


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    selected = [n for n in ORDER if not args.only or n in args.only]
    base = Path(tempfile.mkdtemp(prefix="celeryfarm-bench-"))
    bench = Bench(base, sizes)
    signal.signal(signal.SIGTERM, _interrupt)
    started, load_before, rows = time.monotonic(), load(), []
    failed = False
    say(f"celeryfarm benchmarks ({'quick' if args.quick else 'full'}), in {base}; "
        f"load {load_before}")
    try:
        bench.start()
        for number in selected:
            title, measure = FIGURES[number]
            say(f"figure {number}: {title} ...")
            figure_started = time.monotonic()
            try:
                new = measure(bench)
            except Exception as error:  # one broken figure must not hide the others
                traceback.print_exc()
                failed = True
                new = [Row(str(number), title, "", farm_text=f"error: {error}", met=False)]
            rows += new
            say(text_table(new) + f"\n  ({time.monotonic() - figure_started:.0f} s)\n")
    except KeyboardInterrupt:
        say("interrupted: stopping the workers and Redis")
        return 130
    finally:
        bench.stop()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    duration = time.monotonic() - started
    rows.sort(key=figure_order)  # stable: 1, 1F, 2 ... 10, mem
    say(text_table(rows))
    info = {"date": now_text(), "duration": f"{duration / 60:.1f} min", **machine(),
            "load at start (1/5/15 min)": load_before, "load at end": load()}
    say("\n" + "\n".join(f"{key}: {value}" for key, value in info.items()))
    if args.json:
        args.json.write_text(json.dumps(
            {"info": info, "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]},
            indent=2))
    write = args.write if args.write is not None else not (args.quick or args.only)
    if write:
        notes = [f"{n}. {FIGURES[n][0]}: {method(FIGURES[n][1])}" for n in sorted(selected)]
        notes.append(f"{'quick' if args.quick else 'full'} sizes: {dataclasses.asdict(sizes)}")
        write_report(args.output, report(rows, info, command_line(), notes))
        say(f"results written to {args.output}")
    missed = [r for r in rows if r.met is False]
    say(f"{len(missed)} target(s) missed" if missed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
