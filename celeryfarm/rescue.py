"""Steps stranded in kombu's "unacked" set: the one module that knows kombu's key names.

With late acknowledgement, kombu's Redis transport keeps a message a worker took aside
(``unacked``, indexed by time in ``unacked_index``) until it is acknowledged, or until the
visibility timeout (longer than any render) gives it back. If the worker dies between
taking a step's message and claiming the step, nothing else would run it for days. The
reaper reads the messages set aside for longer than a lease (a live worker claims within
moments) and rescues their steps (see :meth:`~celeryfarm.records.store.JobStore.rescue`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import redis

from .celery import RENDER_STEP
from .records.store import Token

#: Where kombu's Redis transport keeps messages taken but not yet acknowledged.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
#: Messages read per pass.
BATCH = 500


def step_token(raw: str | None) -> Token | None:
    """The token of a render-step message as kombu stores it aside, or None."""
    try:
        message = json.loads(raw or "null")[0]
        if message["headers"].get("task") != RENDER_STEP:
            return None
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        kwargs = json.loads(body)[1]
        return Token(kwargs["job_id"], int(kwargs["attempt"]), int(kwargs["dispatch"]),
                     int(kwargs["step"]))
    except (TypeError, ValueError, KeyError, IndexError):
        return None


def stranded(broker: redis.Redis, set_aside_before: float) -> Iterator[tuple[str, Token]]:
    """(delivery tag, token) of the step messages set aside before ``set_aside_before``
    (a Unix time)."""
    tags = broker.zrangebyscore(UNACKED_INDEX, "-inf", set_aside_before, start=0, num=BATCH)
    if not tags:
        return
    for tag, raw in zip(tags, broker.hmget(UNACKED, tags)):
        token = step_token(raw)
        if token is not None:
            yield tag, token


def drop(broker: redis.Redis, tag: str) -> None:
    """Forget a message set aside whose step no longer needs it."""
    broker.pipeline().zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).execute()


def queue_depth(client: redis.Redis, pool: str, priorities: int = 10) -> int:
    """Messages waiting in a pool's queue: kombu keeps one Redis list per priority step
    (``pool`` for 0, ``pool:N`` for the others, with celeryfarm's ``sep``)."""
    pipe = client.pipeline(transaction=False)
    for priority in range(priorities):
        pipe.llen(f"{pool}:{priority}" if priority else pool)
    return sum(pipe.execute())
