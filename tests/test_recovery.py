"""No render lost, none run twice: lost pool processes and nodes, frozen nodes, limits.

Each test runs its own render nodes on a private pool, so killing them does not disturb the
session's nodes. Leases are 6 s and reapers scan every 0.5 s (see conftest.WORKER_ENV).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

from .helpers import (
    all_gone,
    assert_never_two_current,
    closing_a_channel_let_go,
    pids_of,
    read_log,
    renderboot,
    submit,
    tagged_processes,
    wait_for_state,
    wait_until,
)

State = Job.State


class Pool:
    """Render nodes serving a pool of their own."""

    def __init__(self, cluster: LocalCluster, plugin: CeleryFarmPlugin) -> None:
        self.cluster, self.plugin = cluster, plugin
        self.name = f"pool-{uuid.uuid4().hex[:6]}"
        self.nodes: list[str] = []

    def add_node(self, concurrency: int = 1, env: dict[str, str] | None = None) -> str:
        node = f"n{uuid.uuid4().hex[:6]}"
        self.cluster.start_worker(node, concurrency=concurrency, queues=self.name, env=env)
        self.nodes.append(node)
        return node

    def start(self, count: int, concurrency: int = 1, env: dict[str, str] | None = None
              ) -> Pool:
        """``count`` nodes more, each with these variables besides the farm's."""
        new = [self.add_node(concurrency, env) for _ in range(count)]
        self.cluster.wait_for_workers(self.plugin.farm.app, new)
        return self

    def submit(self, commands: list, **settings) -> str:
        return submit(self.plugin.farm, commands, settings={"pool": self.name,
                                                                    **settings})[0]

    def node_process(self, node: str) -> psutil.Process:
        return psutil.Process(self.cluster.workers[node].pid)

    def stop(self) -> None:
        for node in self.nodes:
            if node in self.cluster.workers:
                self.cluster.stop_worker(node, signal.SIGKILL if self.cluster.workers[node]
                                         .poll() is None else signal.SIGTERM)


@pytest.fixture
def pool(cluster: LocalCluster, plugin: CeleryFarmPlugin) -> Iterator[Pool]:
    nodes = Pool(cluster, plugin)
    yield nodes
    nodes.stop()


def node_of_render(pool: Pool, render: psutil.Process) -> str:
    """The pool node whose worker runs ``render``."""
    ancestors = {proc.pid for proc in render.parents()}
    (node,) = [n for n in pool.nodes if pool.cluster.workers[n].pid in ancestors]
    return node


def redispatch_seconds(events: list[dict]) -> float:
    """Time from the step's first start to its next start elsewhere, from the records."""
    starts = [event["at"] for event in events if event["event"] == "start"]
    return (starts[1] - starts[0]) / 1000


def test_a_killed_worker_s_step_completes_on_another_node(pool: Pool, capsys):
    pool.start(2, concurrency=2)  # the victim has a busy and an idle pool process
    tag = uuid.uuid4().hex
    job_id = pool.submit([renderboot("--seconds", 4, "--children", 2, "--tag", tag),
                          renderboot("--seconds", 0.2)])
    first = wait_until(lambda: len(tagged_processes(tag)) == 5 and tagged_processes(tag), 30,
                       "the render's 5 processes")
    victim = node_of_render(pool, first[0])
    pool_processes = pids_of(pool.node_process(victim).children())
    assert len(pool_processes) == 2
    killed_at = time.time()
    pool.node_process(victim).send_signal(signal.SIGKILL)

    # The killed worker's render and pool processes die with it; the machine lives on.
    wait_until(lambda: all_gone(pids_of(first)), 15, "the killed node's render to be gone")
    wait_until(lambda: all_gone(pool_processes), 15, "the killed node's pool processes to go")
    assert wait_for_state(pool.plugin, job_id, timeout=60) == State.kCompleted
    events = pool.plugin.farm.events(job_id)
    assert_never_two_current(events)
    restarted = [e for e in events if e["event"] == "start" and e["step"] == 0][1]
    assert victim not in restarted["node"]
    log = read_log(pool.plugin, job_id).decode(errors="replace")
    assert f"node {victim}" in log and "lost while running step 1/2" in log
    assert "step 1/2 re-dispatched" in log
    assert log.count("| exit status 0 |") == 2
    with capsys.disabled():
        print(f"\n[recovery] worker SIGKILL -> step running elsewhere after "
              f"{restarted['at'] / 1000 - killed_at:.2f} s "
              f"(first start to second start {redispatch_seconds(events):.2f} s)")


def test_a_lost_pool_process_is_replaced_and_its_render_killed(pool: Pool, capsys):
    pool.start(1)
    tag = uuid.uuid4().hex
    job_id = pool.submit([renderboot("--seconds", 3, "--children", 1, "--tag", tag)])
    first = wait_until(lambda: len(tagged_processes(tag)) == 3 and tagged_processes(tag), 30,
                       "the render's 3 processes")
    pool_process = psutil.Process(min(first, key=lambda p: p.pid).ppid())
    killed_at = time.time()
    pool_process.send_signal(signal.SIGKILL)
    wait_until(lambda: all_gone(pids_of(first)), 15, "the orphaned render to be gone")
    assert wait_for_state(pool.plugin, job_id, timeout=60) == State.kCompleted
    events = pool.plugin.farm.events(job_id)
    assert_never_two_current(events)
    assert [e["event"] for e in events] == ["start", "lost", "start", "end"]
    with capsys.disabled():
        print(f"\n[recovery] pool process SIGKILL -> step running again after "
              f"{events[2]['at'] / 1000 - killed_at:.2f} s")


def test_a_render_whose_pool_process_and_worker_died_together_is_killed(pool: Pool):
    """The worker dies right after its pool process, before billiard tells it the pool
    process is gone, so the worker's own hook never kills the render: a reaper on the host
    finds the step's cgroup, whose lease no live process holds, and kills it."""
    pool.start(2)
    tag = uuid.uuid4().hex
    job_id = pool.submit([renderboot("--seconds", 300, "--children", 1, "--tag", tag)])
    first = wait_until(lambda: len(tagged_processes(tag)) == 3 and tagged_processes(tag), 30,
                       "the render's 3 processes")
    victim = pool.node_process(node_of_render(pool, first[0]))
    psutil.Process(min(first, key=lambda p: p.pid).ppid()).send_signal(signal.SIGKILL)
    victim.send_signal(signal.SIGKILL)

    wait_until(lambda: all_gone(pids_of(first)), 30, "the orphaned render to be gone")
    again = wait_until(lambda: (procs := [p for p in tagged_processes(tag)
                                          if p.pid not in pids_of(first)])
                       and len(procs) == 3 and procs, 30, "the step to run again")
    pool.plugin.stopJob(job_id)
    assert wait_for_state(pool.plugin, job_id, timeout=30) == State.kCancelled
    wait_until(lambda: all_gone(pids_of(again)), 15, "the stopped render to be gone")
    assert_never_two_current(pool.plugin.farm.events(job_id))


def test_a_frozen_node_is_fenced_off_when_it_wakes(pool: Pool):
    """A node that stops answering (SIGSTOP: a hang or a network cut) loses its step; when
    it comes back it finds its token superseded, kills its render and records nothing."""
    pool.start(2)
    tag = uuid.uuid4().hex
    # The render outlives the lease, so it still runs when the step is given away.
    job_id = pool.submit([renderboot("--seconds", 12, "--tag", tag)])
    farm = pool.plugin.farm
    (first,) = wait_until(lambda: tagged_processes(tag), 30, "the render to start")
    victim = node_of_render(pool, first)
    frozen = [pool.node_process(victim), *pool.node_process(victim).children(recursive=True)]
    frozen = [proc for proc in frozen if proc.pid != first.pid]  # the render itself runs on
    for proc in frozen:
        proc.suspend()
    try:
        wait_until(lambda: [e["event"] for e in farm.events(job_id)].count("start") == 2,
                   60, "the step to run elsewhere")
        assert first.is_running()
    finally:
        for proc in frozen:
            proc.resume()
    wait_until(lambda: gone(first), 15, "the superseded render to be killed")
    assert wait_for_state(pool.plugin, job_id, timeout=60) == State.kCompleted
    events = pool.plugin.farm.events(job_id)
    assert_never_two_current(events)
    finished = [e for e in events if e["event"] == "end"]
    assert len(finished) == 1 and finished[0]["outcome"] == "succeeded"
    assert victim not in finished[0]["owner"]
    log = read_log(pool.plugin, job_id)
    assert log.count(b"| exit status 0 |") == 1
    assert log.count(b"step 1/1 | stopped") == 0  # the superseded node wrote no footer


def test_a_step_lost_on_three_nodes_in_a_row_fails_the_job(pool: Pool):
    pool.start(2)
    kills_its_worker = [sys.executable, "-c",
                        "import os, signal, time; os.kill(os.getppid(), signal.SIGKILL); "
                        "time.sleep(60)"]
    job_id = pool.submit([kills_its_worker])
    assert wait_for_state(pool.plugin, job_id, timeout=90) == State.kFailed
    record = pool.plugin.farm.get(job_id)
    assert record.reason == "step 1 was lost on 3 nodes in a row"
    log = read_log(pool.plugin, job_id)
    assert log.count(b"lost while running step 1/1") == 3
    assert b"job failed: step 1 was lost on 3 nodes in a row" in log
    assert_never_two_current(pool.plugin.farm.events(job_id))


def test_a_lease_that_hears_of_a_stop_wakes_its_step_at_once(pool: Pool):
    """Stopping writes only the job's record; the step's lease thread reads it at its next
    renewal and wakes the render loop then, rather than leaving it to its own next poll."""
    import threading

    from celeryfarm.lease import StepLease
    from celeryfarm.records.store import Token

    job_id = pool.submit([["true"]])  # a pool no node serves: only the lease below runs it
    lease = StepLease(pool.plugin.farm.store, pool.plugin.farm.settings,
                      Token(job_id, 1, 1, 0), f"{job_id}-1.1-0/n@host/1")
    assert lease.claim("n@host")[0] == "ok"
    woken, calls = threading.Event(), []
    with lease.keep(on_problem=lambda: calls.append(1) or woken.set()):
        assert not woken.is_set()
        pool.plugin.stopJob(job_id)
        assert woken.wait(30), "the lease thread never woke the step"
        assert lease.stop_reason() == "stop requested"
    assert calls == [1]
    assert pool.plugin.getJobState(job_id) == State.kCancelled


def test_the_log_says_why_a_job_failed_for_lost_nodes_before_its_state_does(pool: Pool):
    """Katana reads the render log once a job has ended, so the reaper that fails a job
    whose step was lost too often writes why first. Here the render log is a FIFO: each of
    the reaper's writes waits for the test to read it, and until the last one the job must
    not be Failed."""
    from celeryfarm.lease import StepLease
    from celeryfarm.records.store import Token

    plugin, store = pool.plugin, pool.plugin.farm.store
    job_id = pool.submit([["true"]])  # a pool no node serves: only the ghost below runs it
    ghost = StepLease(store, plugin.farm.settings, Token(job_id, 1, 1, 0),
                      "ghost-task/ghost@nowhere/1")
    assert ghost.claim("ghost@nowhere")[0] == "ok"  # then it dies: its lease will expire
    store.redis.hset(store.keys.job(job_id), "lost", 2)  # lost on two nodes before
    log = Path(plugin.getRenderLogFilename(job_id))
    log.unlink()
    os.mkfifo(log)
    try:
        wait_until(lambda: store.get_field(job_id, "lease_owner") != ghost.owner, 60,
                   "a reaper to take the lost step")
        said = ""
        while "job failed" not in said:
            assert plugin.getJobState(job_id) == State.kRunning, f"the log said only {said!r}"
            with open(log, "rb") as fifo:  # lets one of the reaper's writes through
                said += fifo.read().decode()
        assert "node ghost@nowhere lost while running step 1/1: its lease expired" in said
        assert wait_for_state(plugin, job_id, timeout=30) == State.kFailed
        assert plugin.farm.get(job_id).reason == "step 1 was lost on 3 nodes in a row"
        assert "job failed: step 1 was lost on 3 nodes in a row" in said
        assert [e["event"] for e in plugin.farm.events(job_id)] == ["start", "lost"]
    finally:
        os.close(os.open(log, os.O_RDONLY | os.O_NONBLOCK))  # frees a writer still waiting
        log.unlink()
        log.touch()


@pytest.mark.parametrize(
    ("settings", "command", "reason"),
    [
        ({"maxStepSeconds": 1}, renderboot("--seconds", 60, "--children", 1),
         "ran longer than its limit of 1 s"),
        ({"stallSeconds": 1},
         [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"],
         "stalled: no output for 1 s"),
    ],
    ids=["time-limit", "stall"],
)
def test_time_limits_and_stalls_fail_the_job_and_kill_the_render(
    plugin: CeleryFarmPlugin, settings: dict, command: list, reason: str
):
    tag = uuid.uuid4().hex
    job_id, _ = submit(plugin.farm, [[*command, tag], ["true"]], settings=settings)
    assert wait_for_state(plugin, job_id, timeout=30) == State.kFailed
    assert reason in plugin.farm.get(job_id).reason
    assert f"killed: {reason}".encode() in read_log(plugin, job_id)
    wait_until(lambda: not tagged_processes(tag), 15, "the render to be gone")


def test_the_node_s_max_render_seconds_caps_a_job_s_longer_max_step_seconds(pool: Pool):
    """A job may ask for a shorter limit than the node's, never a longer one: a step
    running past the node's limit could outlive the broker's visibility timeout."""
    pool.start(1, env={"CELERYFARM_MAX_RENDER_SECONDS": "2"})
    tag = uuid.uuid4().hex
    job_id = pool.submit([renderboot("--seconds", 60, "--tag", tag)], maxStepSeconds=600)
    assert wait_for_state(pool.plugin, job_id, timeout=30) == State.kFailed
    assert b"killed: ran longer than its limit of 2 s" in read_log(pool.plugin, job_id)
    wait_until(lambda: not tagged_processes(tag), 15, "the render to be gone")


def test_every_job_survives_a_redis_restart(tmp_path, monkeypatch):
    """With append-only persistence, a Redis restart mid-run loses no job: running steps
    finish or are re-dispatched, queued jobs run, and clients reconnect by themselves."""
    from .conftest import WORKER_ENV

    farm = LocalCluster(tmp_path, extra_env=WORKER_ENV).start()
    try:
        for name, value in farm.env.items():
            monkeypatch.setenv(name, value)
        plugin = CeleryFarmPlugin()
        for node in ("r1", "r2"):
            farm.start_worker(node, concurrency=1)
        farm.wait_for_workers(plugin.farm.app, ["r1", "r2"])
        jobs = [submit(plugin.farm, [renderboot("--seconds", 1.5), ["true"]])[0]
                for _ in range(6)]
        wait_until(lambda: sum(plugin.getJobState(j) == State.kRunning for j in jobs) == 2,
                   30, "two jobs running")
        farm.redis.stop()
        farm.redis.start()
        for job_id in jobs:
            assert wait_for_state(plugin, job_id, timeout=90) == State.kCompleted
            assert_never_two_current(plugin.farm.events(job_id))
        assert all(node.poll() is None for node in farm.workers.values())
    finally:
        farm.stop()



def take_queued_message(pool: Pool) -> tuple[redis.Redis, str, bytes]:
    """Take the pool's one queued step message off the broker, as a worker's BRPOP does;
    returns (the broker, its key prefix, the raw message)."""
    broker = redis.Redis.from_url(pool.plugin.farm.settings.broker_url)
    prefix = pool.plugin.farm.settings.broker_key_prefix  # kombu's keys start with it
    queued = wait_until(lambda: [key for key in broker.keys(f"{prefix}{pool.name}*")
                                 if broker.type(key) == b"list" and broker.llen(key)], 10,
                        "the step's message in its queue")
    return broker, prefix, broker.rpop(queued[0])


def test_a_step_taken_by_a_worker_that_died_before_starting_it_runs(pool: Pool):
    """What a worker killed between taking a message and starting the step leaves behind:
    the message set aside as unacknowledged, which the broker would only give back after
    the visibility timeout. The reapers give the step to another node instead."""
    job_id = pool.submit([renderboot("--seconds", 0.2), ["true"]])  # no node serves it yet
    broker, prefix, raw = take_queued_message(pool)
    payload = json.loads(raw)
    tag = uuid.uuid4().hex
    broker.hset(f"{prefix}unacked", tag, json.dumps([payload, pool.name, pool.name]))
    broker.zadd(f"{prefix}unacked_index", {tag: time.time() - 3600})

    pool.start(1)
    assert wait_for_state(pool.plugin, job_id, timeout=60) == State.kCompleted
    events = pool.plugin.farm.events(job_id)
    assert [e["event"] for e in events] == ["lost", "start", "end", "start", "end"]
    assert "never started it" in read_log(pool.plugin, job_id).decode()
    assert broker.hget(f"{prefix}unacked", tag) is None  # the stranded message was dropped


def test_a_step_whose_pool_process_died_just_after_it_ended_is_followed_by_the_next(
    pool: Pool,
):
    """The pool process dies after its step recorded its success and before Celery sent the
    chain's next step (Celery sends it only once the task has returned): the next step
    awaits a node with no message anywhere, and the reapers must send the rest, or the job
    stays Running for ever. The step's part is played through the store, as the pool
    process would have; the node's hook for lost pool processes is called as Celery calls
    it in the worker's main process, and has no lease to give up."""
    from types import SimpleNamespace

    from billiard.exceptions import WorkerLostError
    from celery import signals

    from celeryfarm.celery import RENDER_STEP
    from celeryfarm.lease import lease_owner
    from celeryfarm.node import RenderNode
    from celeryfarm.records import StepOutcome
    from celeryfarm.records.store import Token

    job_id = pool.submit([renderboot("--seconds", 0.1), renderboot("--seconds", 0.1)])
    farm = pool.plugin.farm
    first = farm.get(job_id)
    token = Token(job_id, first.attempt, first.dispatch, 0)
    owner = lease_owner(first.task_ids[0], "gone@host", 1)
    assert farm.store.claim(token, owner, "gone@host", 60_000)[0] == "ok"
    assert farm.store.finish(token, owner, StepOutcome.SUCCEEDED)

    node = RenderNode(SimpleNamespace(app=farm.app, hostname="gone@host"))
    try:
        node.on_task_failure(
            sender=SimpleNamespace(name=RENDER_STEP), task_id=first.task_ids[0],
            exception=WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)"),
            kwargs={"job_id": job_id, "attempt": token.attempt, "dispatch": token.dispatch,
                    "step": 0, "steps": 2})
    finally:
        signals.task_failure.disconnect(node.on_task_failure)
        signals.worker_process_init.disconnect(node.prepare_pool_process)
    resent = wait_until(lambda: (record := farm.get(job_id)).task_ids != first.task_ids
                        and record, 60, "the job's next step to be sent again")
    assert resent.dispatch == first.dispatch + 1 and len(resent.task_ids) == 1

    pool.start(1)  # the first node of this pool: it finds both dispatches' messages
    assert wait_for_state(pool.plugin, job_id, timeout=60) == State.kCompleted
    events = farm.events(job_id)
    assert [(e["event"], e["step"]) for e in events] == [
        ("start", 0), ("end", 0), ("lost", 1), ("start", 1), ("end", 1)]
    assert "step 2/2: its message was lost before any node started it" in read_log(
        pool.plugin, job_id).decode()


def test_a_step_whose_message_vanished_with_its_worker_runs(pool: Pool):
    """What a worker killed between kombu's BRPOP and its record of the message as
    unacknowledged leaves behind: nothing, anywhere. The reapers notice that the step's
    message is in no queue and set aside by no worker, and give the step to another node."""
    job_id = pool.submit([renderboot("--seconds", 0.2), ["true"]])  # no node serves it yet
    assert take_queued_message(pool)[2]  # taken, and gone with its worker

    pool.start(1)
    assert wait_for_state(pool.plugin, job_id, timeout=90) == State.kCompleted
    events = pool.plugin.farm.events(job_id)
    assert [e["event"] for e in events] == ["lost", "start", "end", "start", "end"]
    assert "node (unknown) lost while running step 1/2: its message was lost before any " \
           "node started it" in read_log(pool.plugin, job_id).decode()


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (a zombie counts): it may end between two looks."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_channel_closed_after_its_connection_leaves_its_deliveries_set_aside(
        plugin: CeleryFarmPlugin):
    """Seen through the sentinels in CI's failover test (``closing_a_channel_let_go``);
    kombu's plain ``redis://`` channel takes the same path."""
    closing_a_channel_let_go(plugin.farm)
