"""A render node's changes to Celery's remote controls (one process-wide registry,
``Panel.data``), taken over by :func:`install`.

``enable_events``: Celery task events only while someone watches. Render nodes start
without task events and Flower turns them on with its ``enable_events`` control, which it
sends every 5 seconds while it runs. Nothing ever sends ``disable_events``: once Flower
stopped, a node would publish three events a step for no one until it restarted. So the
node's own ``enable_events`` notes when it was last asked, and once nobody has asked for
``CELERYFARM_EVENTS_IDLE_SECONDS`` it turns off the task events it was asked for. Events
the node was started with (``--task-events``) stay on.

``add_consumer``: see :func:`add_consumer`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker import control

logger = logging.getLogger(__name__)

#: Celery's own handlers, which this module's wrap.
_CELERY_ENABLE = control.Panel.data["enable_events"]
_CELERY_ADD_CONSUMER = control.Panel.data["add_consumer"]


def install(events_idle_seconds: float) -> None:
    """Take over the worker's ``add_consumer`` and, unless ``events_idle_seconds`` is 0
    (Celery's own, then: events stay on once asked for), its ``enable_events``
    (:class:`OnDemand`). The registry is the process's: each call sets both."""
    control.Panel.data["enable_events"] = (
        OnDemand(events_idle_seconds).enable_events if events_idle_seconds > 0
        else _CELERY_ENABLE)
    control.Panel.data["add_consumer"] = add_consumer


def add_consumer(state: Any, queue: str, *args: Any, **kwargs: Any) -> dict:
    """Celery's ``add_consumer`` (``celeryfarm enable``, a wrangler's new pool), which also
    selects the queue among those the app consumes from: Celery 5.6 (the last for Python
    3.9) leaves that selection as it was for a queue the app knew already (one its reaper
    re-sent a step to, one it consumed before a drain), and the node's heartbeat names the
    pools it serves from it, as a consumer restarted after a lost connection consumes from
    it. Celery 5.7 selects it itself."""
    reply = _CELERY_ADD_CONSUMER(state, queue, *args, **kwargs)
    queues = state.app.amqp.queues
    if queue in queues:  # else add_task_queue adds and selects it
        queues.select_add(queues[queue])
    return reply


class OnDemand:
    """A node's task events: on while asked for, off ``idle_seconds`` after the last ask."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self.asked_at: float | None = None  # when a remote last asked (monotonic)
        self.remote_on = False  # whether the task events on now are a remote's
        self._timer: Any = None

    def enable_events(self, state: Any) -> dict:
        """Celery's ``enable_events``, remembering the ask; a first ask starts the check."""
        reply = _CELERY_ENABLE(state)
        self.asked_at = time.monotonic()
        if reply == control.ok("task events enabled"):
            self.remote_on = True
        if self._timer is None:
            self._timer = state.consumer.timer.call_repeatedly(
                max(self.idle_seconds / 4, 0.5), self.check, (state.consumer,))
        return reply

    def check(self, consumer: Any) -> None:
        """Turn the task events a remote asked for off once nobody has asked for a while."""
        dispatcher = consumer.event_dispatcher
        if (not self.remote_on or dispatcher is None or self.asked_at is None
                or time.monotonic() - self.asked_at < self.idle_seconds):
            return
        dispatcher.groups.discard("task")
        self.remote_on = False
        logger.info("Task events off: nobody asked for them for %g s (Flower stopped?); "
                    "Flower's next enable_events turns them on again", self.idle_seconds)
