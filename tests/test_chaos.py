"""Chaos: hundreds of short jobs while workers are killed at random and Redis restarts.

Run apart with ``pytest -m chaos``; CI runs it with the rest. At the end every job must be
in the state its history explains, no step may ever have had two current executions, and
no render may be left running. The figures are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid

import psutil
import pytest

from celeryfarm.farmapi import FarmPluginException, Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

from .conftest import WORKER_ENV
from .helpers import (
    assert_never_two_current,
    renderboot,
    submit,
    tagged_processes,
    wait_until,
)

JOBS = 240
WORKERS = 3
#: The chaos's random choices; CHAOS_SEED=<int> replays another run.
SEED = int(os.environ.get("CHAOS_SEED", "20261121"))
#: Unfinished jobs the timeout's report shows in detail.
SHOWN = 20
FINISHED = (Job.State.kCompleted, Job.State.kFailed, Job.State.kCancelled)


class Chaos(threading.Thread):
    """Kills a random worker (its main process, or one of its pool processes) every few
    seconds and starts a replacement; restarts Redis once."""

    def __init__(self, farm: LocalCluster, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.farm, self.rng = farm, rng
        self.stop = threading.Event()
        self.actions: list[tuple[float, str, str]] = []  # (time, what, worker)
        self.restarted_redis = False

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(1.5, 3.5)):
            if not self.restarted_redis and len(self.actions) >= 4:
                self.actions.append((time.time(), "redis restart", ""))
                self.farm.redis.stop()
                self.farm.redis.start()
                self.restarted_redis = True
                continue
            name = self.rng.choice(sorted(self.farm.workers))
            worker = psutil.Process(self.farm.workers[name].pid)
            pool = worker.children()
            if pool and self.rng.random() < 0.3:
                self.actions.append((time.time(), "pool process SIGKILL", name))
                self.rng.choice(pool).send_signal(signal.SIGKILL)
            else:
                self.actions.append((time.time(), "worker SIGKILL", name))
                worker.send_signal(signal.SIGKILL)
                self.farm.stop_worker(name)
                self.farm.start_worker(f"c{uuid.uuid4().hex[:6]}", concurrency=2)


@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_chaos(tmp_path, monkeypatch, capsys):
    rng = random.Random(SEED)
    farm = LocalCluster(tmp_path, extra_env=WORKER_ENV).start()
    chaos = Chaos(farm, rng)
    tag = uuid.uuid4().hex
    try:
        for name, value in farm.env.items():
            monkeypatch.setenv(name, value)
        plugin = CeleryFarmPlugin()
        names = [f"w{index}" for index in range(WORKERS)]
        for name in names:
            farm.start_worker(name, concurrency=2)
        farm.wait_for_workers(plugin.farm.app, names)

        expected_failures = set()
        jobs = []
        for index in range(JOBS):
            steps = [renderboot("--seconds", rng.choice((0.05, 0.1, 0.3)), "--tag", tag,
                                *(["--children", 1] if index % 5 == 0 else []))
                     for _ in range(rng.randint(1, 3))]
            if index % 10 == 3:
                steps.append(renderboot("--seconds", 0.05, "--exit-code", 3, "--tag", tag))
                expected_failures.add(index)
            jobs.append(submit(plugin.farm, steps, name=f"chaos-{index}")[0])

        def all_finished() -> bool:
            try:
                return all(job.state in FINISHED for job in plugin.getJobs(None))
            except FarmPluginException:  # Redis is restarting: ask again
                return False

        started = time.time()
        chaos.start()
        try:
            wait_until(all_finished, 600, "every job to finish")
        except AssertionError as error:
            chaos.stop.set()
            raise AssertionError(f"{error} (seed {SEED})\n{diagnose(farm, plugin, chaos)}") \
                from None
        chaos.stop.set()
        chaos.join(60)
        elapsed = time.time() - started
        try:
            wait_until(lambda: not tagged_processes(tag), 30, "every render process to be gone")
        except AssertionError as error:
            raise AssertionError(f"{error} (seed {SEED}): {describe(tagged_processes(tag))}; "
                                 f"chaos actions: {chaos.actions}") from None

        records = [plugin.farm.get(job_id) for job_id in jobs]
        histories = [plugin.farm.events(job_id) for job_id in jobs]
        lost_on_nodes = 0
        for index, (record, events) in enumerate(zip(records, histories)):
            assert_never_two_current(events)
            steps = len(record.spec.commands)
            succeeded = sorted(e["step"] for e in events
                               if e["event"] == "end" and e["outcome"] == "succeeded")
            if index in expected_failures:
                assert record.state == Job.State.kFailed, (record, events)
                assert record.reason.endswith("failed: exit status 3") or "lost on" in record.reason
            elif record.state == Job.State.kFailed:  # allowed only for a real reason
                assert "was lost on 3 nodes in a row" in record.reason, (record, events)
                lost_on_nodes += 1
            else:
                assert record.state == Job.State.kCompleted, (record, events)
                assert succeeded == list(range(steps)), (record, events)

        losses = [(e, job) for job, events in zip(jobs, histories) for e in events
                  if e["event"] == "lost"]
        by_job = dict(zip(jobs, histories))
        to_redispatch, to_running = [], []
        for lost, job in losses:
            causes = [at for at, _, name in chaos.actions
                      if at * 1000 <= lost["at"] and (not name or name in lost["node"])]
            if not causes:
                continue  # a stranded message: no single action to time it from
            to_redispatch.append(lost["at"] / 1000 - max(causes))
            later = [e["at"] for e in by_job[job] if e["event"] == "start"
                     and e["at"] > lost["at"] and e["step"] == lost["step"]
                     and e["attempt"] == lost["attempt"]]
            if later:
                to_running.append(later[0] / 1000 - max(causes))
        with capsys.disabled():
            kills = [what for _, what, _ in chaos.actions]
            print(f"\n[chaos] seed {SEED}: {JOBS} jobs ({len(expected_failures)} failing on "
                  f"purpose) on {WORKERS} workers in {elapsed:.1f} s; actions: "
                  f"{kills.count('worker SIGKILL')} worker kills, "
                  f"{kills.count('pool process SIGKILL')} pool process kills, "
                  f"{kills.count('redis restart')} Redis restart; "
                  f"{len(losses)} steps lost and re-dispatched, "
                  f"{lost_on_nodes} jobs failed after 3 losses; from the fault to the "
                  f"re-dispatch: worst {max(to_redispatch, default=0):.1f} s; to the step "
                  f"running again: worst {max(to_running, default=0):.1f} s "
                  f"(lease {WORKER_ENV['CELERYFARM_LEASE_SECONDS']} s)")
        assert chaos.restarted_redis and kills.count("worker SIGKILL") >= 2
    finally:
        chaos.stop.set()
        farm.stop()
    # Killed workers' pool processes must not outlive them (idle or busy).
    try:
        wait_until(lambda: not processes_of(farm), 30, "every process of the farm to be gone")
    except AssertionError:
        raise AssertionError([(p.pid, p.ppid(), p.status(), " ".join(p.cmdline())[-90:])
                              for p in processes_of(farm)]) from None


def diagnose(farm: LocalCluster, plugin: CeleryFarmPlugin, chaos: Chaos) -> str:
    """Everything the farm knows about its unfinished jobs, for a CI log: the record, the
    lease, the outbox, whether its step awaits a node, where the current step's messages are
    (queues, kombu's unacked messages), Celery's task states, the history, and the lines
    about the job in the workers' logs and its render log."""
    store, app = plugin.farm.store, plugin.farm.app
    client, keys = store.redis, store.keys
    start = chaos.actions[0][0] if chaos.actions else 0
    began = time.strftime("%H:%M:%S", time.localtime(start)) + f".{int(start * 1000) % 1000:03d}"
    lines = [f"chaos actions (+0 s is {began}, local time as in the worker logs): " + "; ".join(
        f"+{at - start:.1f} s {what} {name}" for at, what, name in chaos.actions)]
    prefix = plugin.farm.settings.broker_key_prefix  # kombu's keys start with it
    queued = [raw for key in client.scan_iter(f"{prefix}renders*") if client.type(key) == "list"
              for raw in client.lrange(key, 0, -1)]
    unacked = client.hvals(f"{prefix}unacked")
    logs = {path.name: path.read_text(errors="replace").splitlines()
            for path in sorted(farm.base.glob("worker-*.log"))}
    unfinished = {job_id: fields for job_id in store.ids()
                  if (fields := client.hgetall(keys.job(job_id))).get("state")
                  in ("Waiting", "Running")}
    # Nothing will ever run these, unless a reaper acts: no lease, no message anywhere.
    stranded = [job_id for job_id in unfinished
                if client.zscore(keys.leases, job_id) is None
                and not any(job_id in raw for raw in [*queued, *unacked])]
    suspects = stranded + [job_id for job_id in unfinished if job_id not in stranded]
    lines.append(f"{len(unfinished)} unfinished jobs; with no lease and no message anywhere: "
                 f"{stranded}; the first {min(len(suspects), SHOWN)}, those first:")
    for job_id in suspects[:SHOWN]:
        fields = unfinished[job_id]
        task_ids = json.loads(fields.get("task_ids") or "[]")
        task_states = [(task_id, app.AsyncResult(task_id).state) for task_id in task_ids]
        shown = {k: v for k, v in fields.items()
                 if k not in ("commands", "environment", "context", "user", "host", "session")}
        lines += [
            f"--- unfinished job {job_id}: {shown}",
            f"lease deadline: {client.zscore(keys.leases, job_id)} "
            f"(Redis time now: {client.time()}); outbox: "
            f"{client.zscore(keys.outbox, job_id)}; awaiting a node since: "
            f"{client.zscore(keys.awaiting, job_id)}; missing at the last look: "
            f"{client.hget(keys.missing, job_id)}",
            f"messages in the queues: {sum(job_id in raw for raw in queued)}; "
            f"in kombu's unacked: {sum(job_id in raw for raw in unacked)}",
            f"celery task states: {task_states}",
            "events: " + "\n  ".join(["", *client.lrange(keys.events(job_id), 0, -1)]),
        ]
        for name, text in logs.items():
            about = [line for line in text if job_id in line][-8:]
            if about:
                lines += [f"{name}:"] + [f"  {line}" for line in about]
        log = plugin.farm.log_file(job_id)
        if log is not None and log.exists():
            lines += ["render log tail:"] + [
                f"  {line}" for line in log.read_text(errors="replace").splitlines()[-10:]]
    for name, text in logs.items():
        problems = [line for line in text if ("ERROR" in line or "WARNING" in line
                    or "Traceback" in line) and "StepFailed" not in line][-10:]
        if problems:
            lines += [f"{name} warnings and errors:"] + [f"  {line}" for line in problems]
    return "\n".join(lines)


def describe(procs: list[psutil.Process]) -> list[tuple]:
    """(pid, parent pid, job, attempt, seconds alive, command line) of each process."""
    found = []
    for proc in procs:
        try:
            env = proc.environ()
            found.append((proc.pid, proc.ppid(), env.get("CELERYFARM_JOB_ID"),
                          env.get("CELERYFARM_ATTEMPT"), round(time.time() - proc.create_time()),
                          " ".join(proc.cmdline())[-90:]))
        except psutil.Error:
            pass
    return found


def processes_of(farm: LocalCluster) -> list[psutil.Process]:
    """Live processes started with this farm's broker URL in their environment."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if (proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get("CELERYFARM_BROKER_URL") == farm.redis.url):
                found.append(proc)
        except psutil.Error:
            pass
    return found
