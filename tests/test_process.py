"""The step runner on real subprocesses: output streaming, outcomes, and the tree kill."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import uuid

import psutil

from celeryfarm import process

from .helpers import renderboot, tagged_processes, wait_until


def run(argv, should_stop=lambda: "", grace_seconds=1.0, **kwargs):
    output = io.BytesIO()
    outcome = process.run(argv, env=dict(os.environ), cwd=os.getcwd(), output=output,
                          should_stop=should_stop, poll_seconds=0.05,
                          grace_seconds=grace_seconds, **kwargs)
    return outcome, output.getvalue()


def test_exit_status_and_output():
    outcome, output = run([sys.executable, "-c", "import sys; print('hi'); sys.exit(7)"])
    assert outcome.exit_code == 7 and not outcome.succeeded
    assert outcome.describe() == "exit status 7"
    assert output == b"hi\n"


def test_output_arrives_while_the_command_runs():
    output = io.BytesIO()
    script = "import time; print('first', flush=True); time.sleep(30)"
    first_line_seen = threading.Event()

    def should_stop() -> str:
        if b"first" in output.getvalue():
            first_line_seen.set()
            return "seen"
        return ""

    started = time.monotonic()
    outcome = process.run([sys.executable, "-c", script], env=dict(os.environ), cwd=".",
                          output=output, should_stop=should_stop, poll_seconds=0.05)
    assert first_line_seen.is_set() and outcome.stop_reason == "seen"
    assert time.monotonic() - started < 25  # stopped long before the sleep ended


def test_a_daemon_that_leaves_the_session_is_still_killed():
    """A double fork plus setsid escapes the process group; the marker still finds it."""
    tag = uuid.uuid4().hex
    script = (
        "import os, subprocess, sys\n"
        "subprocess.Popen(['setsid', sys.executable, '-c', 'import time; time.sleep(300)',\n"
        f"                  '{tag}'], start_new_session=True, stdout=subprocess.DEVNULL)\n"
        "print('daemon started', flush=True)\n"
    )
    outcome, _ = run([sys.executable, "-c", script])
    assert outcome.exit_code == 0
    assert not tagged_processes(tag)
    assert not [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def test_stop_kills_children_and_grandchildren():
    """The grace period is long: a stop that waited it out although every process obeyed
    SIGTERM would not finish in time (as when renderboot's helpers, signalled twice,
    deadlocked in their SIGTERM handler)."""
    tag = uuid.uuid4().hex
    stop = threading.Event()
    result: list = []
    worker = threading.Thread(target=lambda: result.append(run(
        renderboot("--live", "--seconds", 0.5, "--children", 2, "--tag", tag),
        should_stop=lambda: "asked" if stop.is_set() else "", grace_seconds=60)))
    worker.start()
    wait_until(lambda: len(tagged_processes(tag)) == 5, 30, "the render's 5 processes")
    stop.set()
    worker.join(20)
    assert not worker.is_alive(), "the stop waited for the grace period"
    (outcome, _), = result
    assert outcome.describe() == "stopped: asked"
    assert not tagged_processes(tag)
    assert not [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


def test_a_missing_executable_is_an_outcome_not_an_exception():
    outcome, output = run(["/no/such/program"])
    assert outcome.describe() == "could not start: executable not found: /no/such/program"
    assert output == b""


def test_waiting_reaps_a_helper_that_becomes_our_zombie_mid_wait():
    """A render's helper is someone else's child when the wait starts; its parent exits, it
    is reparented to us (a subreaper) and dies: the wait must reap it, not wait it out."""
    assert process.become_subreaper()
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.6)'])\n"
        "time.sleep(0.2)\n")])
    (helper,) = wait_until(lambda: psutil.Process(parent.pid).children(), 10, "the helper")
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(process._wait(None, [helper], 60)))
    waiter.start()
    waiter.join(20)
    parent.wait()
    assert not waiter.is_alive(), "the wait did not reap the helper that became our zombie"
    assert result == [[]]


def test_a_stall_and_the_time_limit_caught_together_fail_the_step(monkeypatch):
    """A silent command breaks its stall limit and, an instant later, its time limit. The
    step must end as a broken limit (the job fails), never as a stop (which hands the step
    to another node): the limit is judged once, when it is caught. The limits' clock is a
    fake that moves 1 s a reading, so the stall (10 s) is caught at the reading where the
    time limit (11 s) is not yet broken, and the next reading breaks that too."""
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(process._Limits, "clock", staticmethod(lambda: float(next(ticks))))
    outcome, _ = run([sys.executable, "-c", "import time; time.sleep(60)"],
                     max_seconds=11, stall_seconds=10)
    assert outcome.stop_reason == ""
    assert outcome.limit == "stalled: no output for 10 s"
    assert not outcome.succeeded and outcome.describe() == "killed: stalled: no output for 10 s"
