"""The render node: the one object that makes a Celery worker a celeryfarm node.

:class:`RenderNode` is a bootstep of the worker (:func:`celeryfarm.celery.create_app` adds
it), made once per worker in its main process before the pool processes fork, so they share
it. It owns the node's job store and its :class:`~celeryfarm.reaper.Reaper`, registers the
render step task, and wires the worker's signals:

* a node drained by a wrangler stays drained when it restarts (:mod:`celeryfarm.nodes`);
* its main process runs the reaper, and when one of its pool processes dies mid-step it
  gives the step up at once and kills the render left behind (should the worker die first,
  a reaper on the host kills it: :mod:`celeryfarm.orphans`);
* its pool processes become child subreapers (so renders that detach are still found), and
  their parent-death signal is :data:`~celeryfarm.tasks.PARENT_DIED` instead of Celery's
  SIGKILL: when the main process is killed, an idle pool process exits at once, and a busy
  one treats it as a stop (see ``tasks.stop_signals``): it kills its render and gives the
  step up, then exits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from billiard.exceptions import WorkerLostError
from billiard.util import set_pdeathsig
from celery import bootsteps, signals
from celery.worker import state as worker_state

from . import controls, process, renderenv, tasks
from .celery import RENDER_STEP, FarmApp
from .lease import owner_prefix
from .nodes import drained_at_start
from .reaper import Reaper
from .records.store import JobStore

logger = logging.getLogger(__name__)


class RenderNode(bootsteps.StartStopStep):
    """A worker's render node: its store, its reaper and its hooks."""

    label = "render node"
    # Started once the pool has forked: the reaper's thread must not be copied into it.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.app: FarmApp = worker.app
        self.settings = self.app.settings
        self.hostname: str = worker.hostname or ""
        self.protect()
        self.store = JobStore.from_settings(self.settings)
        #: The user renders run as (``CELERYFARM_RENDER_USER``), or None: the node's own.
        self.render_user = renderenv.render_user(self.settings.render_user)
        self.reaper: Reaper | None = None
        self.app.node = self
        # No SUCCESS results: the record says Completed, and a result would only take
        # memory until it expired. Failures and revokes are still stored: Farm._settle reads
        # them for the crashes that happen before a step could record anything.
        self.app.task(bind=True, name=RENDER_STEP, ignore_result=True,
                      store_errors_even_if_ignored=True)(tasks.render_step)
        signals.worker_process_init.connect(self.prepare_pool_process, weak=False)
        controls.install(self.settings.events_idle_seconds)
        signals.task_failure.connect(self.on_task_failure, weak=False)

    # -- the main process --------------------------------------------------------------------
    def protect(self) -> None:
        """Before any render runs: a node runs as root only when told to, and renders must
        not read the node's environment or memory."""
        problem = renderenv.root_problem(self.settings)
        if problem:
            raise SystemExit(problem)  # not an Exception: Celery would log it and carry on
        if not renderenv.protect_node_process():
            logger.warning("could not make the node non-dumpable: renders running as its "
                           "user can read its environment, which holds the farm's credentials")

    def start(self, worker: Any) -> None:
        pools = tuple(self.app.amqp.queues.consume_from or ())  # before a drain empties it
        if drained_at_start(self.app, self.store, self.hostname):
            logger.warning("%s is drained: it takes no step until `celeryfarm enable %s`",
                           self.hostname, self.hostname)
        self.reaper = Reaper(self.app, self.store, self.settings, self.hostname, pools,
                             running=_running_steps, render_user=self.render_user)
        self.reaper.start()

    def stop(self, worker: Any) -> None:
        if self.reaper is not None:
            self.reaper.stop()

    def on_task_failure(
        self, sender: Any = None, task_id: str = "", exception: Any = None,
        kwargs: dict | None = None, **_: Any,
    ) -> None:
        """When a pool process died running a step: give the step's lease up at once so a
        reaper re-dispatches it, and kill the render it left behind (in a thread: the grace
        period must not stall the worker's main loop). If the step had ended, before Celery
        sent the chain's next step, there is no lease to give up: the next step awaits a
        node, and the reapers find its message missing (see :mod:`celeryfarm.reaper`)."""
        if getattr(sender, "name", "") != RENDER_STEP or not isinstance(exception,
                                                                        WorkerLostError):
            return
        job_id = (kwargs or {}).get("job_id", "")
        if job_id and not self.store.abandon(job_id, owner_prefix(task_id, self.hostname)):
            logger.info("step %s of job %s: nothing to give up (its lease had lapsed, or the "
                        "step had ended)", task_id, job_id)
        threading.Thread(target=self._after_lost_pool_process, args=(task_id,),
                         daemon=True).start()

    def _after_lost_pool_process(self, task_id: str) -> None:
        survivors = process.kill_step(task_id, self.settings.stop_grace_seconds)
        if survivors:
            logger.error("processes of step %s survived SIGKILL: %s", task_id, survivors)
        renderenv.remove_private_folders(task_id, self.render_user)

    # -- a pool process ----------------------------------------------------------------------
    def prepare_pool_process(self, **_: Any) -> None:
        renderenv.protect_node_process()  # inherited from the main process; made sure of here
        process.become_subreaper()
        signal.signal(tasks.PARENT_DIED, _exit_now)  # idle; a running step handles it itself
        set_pdeathsig(tasks.PARENT_DIED)


def _running_steps() -> list[str]:
    """Task ids of the steps this worker runs (its main process's view)."""
    return [request.id for request in worker_state.active_requests]


def _exit_now(_signum: int, _frame: Any) -> None:
    os._exit(0)  # nothing to clean up, and no parent to report to
