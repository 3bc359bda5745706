"""What a step costs Redis, counted with MONITOR on a real farm: one write to claim (which
checks the message's commands against the record's too), one to end, no Celery result for
a step that succeeded, and frames counted without a round trip of their own."""

from __future__ import annotations

import threading

import psutil

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.records.scripts import Scripts

from .helpers import renderboot, submit, wait_for_state, wait_until

State = Job.State


class Monitor(threading.Thread):
    """Every command Redis runs while it is on, from a MONITOR connection of its own."""

    def __init__(self, client) -> None:
        super().__init__(daemon=True)
        self.monitor = client.monitor().__enter__()
        self.commands: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.commands.append(self.monitor.next_command())

    def stop(self, client) -> list[dict]:
        self.done.set()
        client.ping()  # one more command wakes the thread up
        self.join(30)
        self.monitor.__exit__()
        return self.commands


def own_ports() -> set[str]:
    """The local ports of this process's connections (the plug-in's), not the nodes'."""
    return {str(c.laddr.port) for c in psutil.Process().net_connections("tcp") if c.laddr}


def test_a_step_claims_and_ends_in_one_write_each(plugin: CeleryFarmPlugin):
    # A first job loads the scripts into Redis (each script's first EVALSHA on a fresh
    # server fails and is sent again), as any running farm has.
    warm_up, _ = submit(plugin.farm, [renderboot("--frames", "1", "--seconds", 0.1)])
    assert wait_for_state(plugin, warm_up) == State.kCompleted
    monitored = Monitor(plugin.farm.store.redis)
    monitored.start()
    frames = range(1, 6)
    job_id, _ = submit(plugin.farm, [renderboot("--frames", "1-5", "--seconds", 0.5)],
                       frames=frames)
    assert wait_for_state(plugin, job_id) == State.kCompleted
    commands = monitored.stop(plugin.farm.store.redis)
    assert plugin.farm.get(job_id).frames_done == len(frames)

    mine = own_ports()
    broker = plugin.farm.settings.broker_key_prefix
    scripts = {script.sha: name for name, script in vars(Scripts(plugin.farm.store.redis)).items()}
    node = [c["command"] for c in commands
            if c["client_type"] == "tcp" and c["client_port"] not in mine
            and job_id in c["command"] and broker not in c["command"]]
    ran = [scripts.get(command.split()[1], command) if command.startswith("EVALSHA")
           else command for command in node]
    # Besides the step's own writes: the lease's renewals and the node's heartbeat, the
    # reapers' look at the leases of the steps on their host (orphans.sweep), and, once a
    # dispatch, their taking the job from the inbox into the shared sets (adopt.lua).
    periodic = ("renew", "heartbeat", f"HMGET {plugin.farm.store.keys.job(job_id)} state "
                                      f"lease_owner")
    adoption = ("adopt", f"HGET {plugin.farm.store.keys.job(job_id)} session")
    assert [name for name in ran if name not in periodic + adoption] == ["claim", "finish"], (
        ran, node)
    # Celery wrote no result for the step: the record says Completed.
    assert not [c["command"] for c in commands if f"celery-task-meta-{job_id}" in c["command"]
                and c["command"].split()[0] in ("SET", "SETEX", "PUBLISH")]


def test_a_submission_is_one_transaction_with_its_message(plugin: CeleryFarmPlugin):
    """submitJob writes the record, the inbox entry and the chain's one message in a single
    MULTI, and nothing else: the message composed by Celery is never also sent by kombu."""
    # The broker's producer exists and has declared the pool's queue, as in use.
    warm_up, _ = submit(plugin.farm, [["true"]])
    assert wait_for_state(plugin, warm_up) == State.kCompleted
    monitored = Monitor(plugin.farm.store.redis)
    monitored.start()
    job_id, _ = submit(plugin.farm, [["true"], ["true"]])
    plugin.farm.store.redis.echo("submitted")  # MONITOR shows the submission before this

    def marker(command: dict) -> bool:
        return command["command"].startswith("ECHO") and "submitted" in command["command"]

    wait_until(lambda: any(map(marker, monitored.commands)), 10,
               "MONITOR to show the submission")
    commands = monitored.stop(plugin.farm.store.redis)
    mine = own_ports()
    end = next(n for n, c in enumerate(commands) if marker(c))
    sent = [c["command"] for c in commands[:end]
            if c["client_type"] == "tcp" and c["client_port"] in mine
            and c["command"].split()[0] not in ("PING", "HELLO", "CLIENT")]
    assert [command.split()[0] for command in sent] == [
        "MULTI", "EVAL", "RPUSH", "LPUSH", "EXEC"], sent
    push = sent[3]
    queue = plugin.farm.settings.broker_key_prefix + plugin.farm.settings.default_queue
    assert push.split()[1].strip('"').startswith(queue), push
    # That one message carries the chain: both steps run.
    assert wait_for_state(plugin, job_id) == State.kCompleted
    assert [event["step"] for event in plugin.farm.events(job_id)
            if event["event"] == "end"] == [0, 1]
