"""Hooks that make a Celery worker a celeryfarm render node.

* Its main process runs a :class:`~celeryfarm.leases.Reaper`, and when one of its pool
  processes dies mid-step it kills the orphaned render and gives the step up at once.
* Its pool processes become child subreapers (so renders that detach are still found), and
  their parent-death signal is :data:`PARENT_DIED` instead of Celery's SIGKILL: when the main
  process is killed, an idle pool process exits at once, and a busy one treats it as a stop
  (see ``tasks.stop_signals``): it kills its render and gives the step up, then exits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from billiard.exceptions import WorkerLostError
from billiard.util import set_pdeathsig
from celery import signals

from . import leases, process, renderenv
from .celery import RENDER_STEP, app
from .store import JobStore, connect

logger = logging.getLogger(__name__)
#: Sent to a pool process when its worker's main process dies. Not SIGTERM: billiard's
#: handler for that leaves an idle pool process blocked on a pipe no one reads, for ever.
PARENT_DIED = signal.SIGRTMIN + 2
_reaper: leases.Reaper | None = None
_hostname = ""  # this worker's node name, e.g. render@host


def _store() -> JobStore:
    settings = app.conf.celeryfarm_settings
    return JobStore(connect(settings.records_url), settings.key_prefix)


def lease_owner(task_id: str, node: str, pid: int) -> str:
    """Names one execution of a step: the message, the node and the pool process."""
    return f"{task_id}/{node}/{pid}"


@signals.worker_ready.connect
def start_reaper(sender: Any = None, **_: Any) -> None:
    global _reaper, _hostname
    _hostname = getattr(sender, "hostname", "") or ""
    _reaper = leases.Reaper(app, _store(), app.conf.celeryfarm_settings)
    _reaper.start()


@signals.worker_shutting_down.connect
def stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()


@signals.worker_init.connect
def protect_node(**_: Any) -> None:
    """Before any render runs: a node runs as root only when told to, and renders must not
    read the node's environment or memory."""
    problem = renderenv.root_problem(app.conf.celeryfarm_settings)
    if problem:
        raise SystemExit(problem)  # not an Exception: Celery would log it and carry on
    if not renderenv.protect_node_process():
        logger.warning("could not make the node non-dumpable: renders running as its user "
                       "can read its environment, which holds the farm's credentials")


@signals.worker_process_init.connect
def prepare_pool_process(**_: Any) -> None:
    renderenv.protect_node_process()  # inherited from the main process; made sure of here
    process.become_subreaper()
    signal.signal(PARENT_DIED, _exit_now)  # idle; a step handles it itself while it runs
    set_pdeathsig(PARENT_DIED)


def _exit_now(_signum: int, _frame: Any) -> None:
    os._exit(0)  # nothing to clean up, and no parent to report to


@signals.task_failure.connect
def on_lost_pool_process(
    sender: Any = None, task_id: str = "", exception: Any = None,
    kwargs: dict | None = None, **_: Any,
) -> None:
    """In the main process, when a pool process died running a step: give the step's lease
    up at once so a reaper re-dispatches it, and kill the render it left behind (in a
    thread: the grace period must not stall the worker's main loop)."""
    if getattr(sender, "name", "") != RENDER_STEP or not isinstance(exception, WorkerLostError):
        return
    job_id = (kwargs or {}).get("job_id", "")
    store = _store()
    owner = lease_owner(task_id, _hostname, 0).rsplit("/", 1)[0] + "/"
    if job_id and not leases.abandon(store, leases.Scripts(store), job_id, owner):
        logger.info("step %s of job %s was lost after its lease had lapsed", task_id, job_id)
    threading.Thread(target=_kill_orphaned_render, args=(task_id,), daemon=True).start()


def _kill_orphaned_render(task_id: str) -> None:
    settings = app.conf.celeryfarm_settings
    survivors = process.kill_step(task_id, settings.stop_grace_seconds)
    if survivors:
        logger.error("processes of step %s survived SIGKILL: %s", task_id, survivors)
    renderenv.remove_private_folders(task_id, renderenv.render_user(settings.render_user))
