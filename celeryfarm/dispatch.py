"""Sending a job's remaining steps to the render nodes, through an outbox so none is lost.

A submission's record and its first message are one write (``JobStore.create``). Any other
dispatch is recorded first (the record's dispatch number, and the job in the outbox set, in
one atomic write); then the message and the record of it as sent are one write, which takes
the job out of the outbox. If the sender dies in between, a node's reaper sends it again (see
:mod:`celeryfarm.reaper`). A message sent twice is harmless: a step runs only if its fencing
token is current and no live execution holds its lease. Messages are composed by Celery and
pushed by the store (:mod:`celeryfarm.capture`).
"""

from __future__ import annotations

import re

from celery import Celery, chain

from .capture import Push, captured
from .celery import RENDER_STEP
from .jobs import MAX_PRIORITY, JobRecord
from .records.store import JobStore, Token


def celery_priority(priority: int) -> int:
    """Map farm priority 0..100 (higher first) to Redis priority 9..0 (0 first)."""
    return 9 - round(priority * 9 / MAX_PRIORITY)


def task_id(token: Token) -> str:
    """The Celery id of one step of one dispatch: readable in Flower."""
    return f"{token.job_id}-{token.attempt}.{token.dispatch}-{token.step}"


def task_ids(record: JobRecord) -> tuple[str, ...]:
    """Celery ids for the steps the record's dispatch will run."""
    return tuple(
        task_id(Token(record.job_id, record.attempt, record.dispatch, step))
        for step in range(record.next_step, len(record.spec.commands))
    )


#: The longest argument text Flower is sent (Celery's ``kwargsrepr_maxsize``).
KWARGSREPR_CHARS = 1024

#: Redis priority of a step resumed after its node was lost: the top bucket, so a job that
#: was already running does not go to the back of the queue.
RESUMED_PRIORITY = 0


_TASK_ID = re.compile(r"(?P<job_id>.+)-(?P<attempt>\d+)\.(?P<dispatch>\d+)-(?P<step>\d+)")


def token_of(task_id: str) -> Token | None:
    """The step execution a task id of :func:`task_id` names, or None for any other name."""
    match = _TASK_ID.fullmatch(task_id)
    if not match:
        return None
    return Token(match["job_id"], int(match["attempt"]), int(match["dispatch"]),
                 int(match["step"]))


def step_of(task_id: str) -> int:
    """The step index a task id of :func:`task_ids` names."""
    return int(task_id.rsplit("-", 1)[1])


def compose(app: Celery, record: JobRecord, resumed: bool = False) -> list[Push]:
    """The broker writes that send the chain of steps ``next_step..`` of the record's
    current dispatch, for the store to push with its own write (:mod:`celeryfarm.capture`).

    Queue and priority go on every signature: options given to the chain itself would apply
    to its first task only. A ``resumed`` step (re-dispatched after a node loss) goes first.
    """
    spec, steps = record.spec, len(record.spec.commands)
    priority = celery_priority(spec.priority)
    signatures = [
        app.signature(
            RENDER_STEP,
            kwargs={
                "job_id": record.job_id, "attempt": record.attempt,
                "dispatch": record.dispatch, "step": step, "steps": steps,
                "name": spec.name, "command": list(spec.commands[step]),
            },
            immutable=True,
            task_id=step_id,
            queue=spec.queue,
            priority=RESUMED_PRIORITY if resumed and step == record.next_step else priority,
            shadow=f"{spec.name} [{step + 1}/{steps}]",
            # Nothing waits on a step's result: without this the client subscribes to the
            # chain's result channel at every submission (see celeryfarm.node).
            ignore_result=True,
        )
        for step, step_id in zip(range(record.next_step, steps), task_ids(record))
    ]
    # What Flower shows of the first step's arguments, made here: Celery's own (saferepr, in
    # Python) was a sixth of a submission. The later steps' are made on the node that sends
    # them (options set here would ride in the message once per step).
    signatures[0].options["kwargsrepr"] = _kwargs_repr(signatures[0].kwargs)
    with captured() as pushes:
        chain(*signatures).apply_async()
    return pushes


def _kwargs_repr(kwargs: dict) -> str:
    """``repr`` of a step's arguments cut as Celery cuts its own (1,024 characters)."""
    text = repr(kwargs)
    return text if len(text) <= KWARGSREPR_CHARS else text[:KWARGSREPR_CHARS - 3] + "..."


def send(app: Celery, store: JobStore, record: JobRecord, resumed: bool = False,
         by_node: bool = True) -> None:
    """Send the chain of steps ``next_step..`` of the record's current dispatch, and record
    the ids sent in ``record.task_ids`` and in the job's record, in one write (a client's
    ``by_node=False`` send writes only that record; see ``JobStore.sent``)."""
    pushes = compose(app, record, resumed)
    record.task_ids = task_ids(record)
    store.sent(record.job_id, record.dispatch, record.task_ids, by_node, pushes)
