"""Step messages in kombu's Redis keys: the one module that knows kombu's key names.

With late acknowledgement, kombu's Redis transport keeps a message a worker took aside
(``unacked``, indexed by time in ``unacked_index``) until it is acknowledged, or until the
visibility timeout (longer than any render) gives it back. If the worker dies between
taking a step's message and claiming the step, nothing else would run it for days. The
reaper reads the messages set aside for longer than a lease (a live worker claims within
moments) and rescues their steps (see :meth:`~celeryfarm.records.store.JobStore.rescue`).

kombu takes a message from its queue (BRPOP) and only then sets it aside, in a second
round trip: a worker killed in between takes the message with it. :func:`message_ids`
lets the reaper see which messages are still somewhere.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator

import redis

from .celery import PRIORITY_SEP, PRIORITY_STEPS, RENDER_STEP
from .records.store import Token

#: Where kombu's Redis transport keeps messages taken but not yet acknowledged.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
#: Messages read per pass, or per round trip when reading a queue.
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


def stranded(broker: redis.Redis, set_aside_before: float,
             prefix: str) -> Iterator[tuple[str, Token]]:
    """(delivery tag, token) of the step messages set aside before ``set_aside_before``
    (a Unix time), on the broker whose keys start with ``prefix``
    (``Settings.broker_key_prefix``)."""
    tags = broker.zrangebyscore(prefix + UNACKED_INDEX, "-inf", set_aside_before, start=0,
                                num=BATCH)
    if not tags:
        return
    for tag, raw in zip(tags, broker.hmget(prefix + UNACKED, tags)):
        token = step_token(raw)
        if token is not None:
            yield tag, token


def drop(broker: redis.Redis, tag: str, prefix: str) -> None:
    """Forget a message set aside whose step no longer needs it."""
    broker.pipeline().zrem(prefix + UNACKED_INDEX, tag).hdel(prefix + UNACKED, tag).execute()


def message_ids(broker: redis.Redis, queues: Iterable[str], prefix: str) -> set[str]:
    """The task ids of the messages waiting in ``queues`` (each of their priority lists),
    then of the messages set aside, on the broker whose keys start with ``prefix``: in that
    order, so a message moving from a queue to the unacked set is seen (unless a worker
    holds it between the two: look twice)."""
    found = set()
    for queue in sorted(set(queues)):
        for key in queue_keys(queue, prefix):
            for start in range(0, broker.llen(key), BATCH):
                found.update(_message_id(raw)
                             for raw in broker.lrange(key, start, start + BATCH - 1))
    found.update(_message_id(raw, set_aside=True) for raw in broker.hvals(prefix + UNACKED))
    return found


def _message_id(raw: str, set_aside: bool = False) -> str:
    """The task id of a message as kombu queues it (or sets it aside), or ""."""
    try:
        message = json.loads(raw)
        return str((message[0] if set_aside else message)["headers"].get("id", ""))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        return ""


def queue_keys(queue: str, prefix: str) -> list[str]:
    """The Redis lists of a queue on the broker whose keys start with ``prefix``: kombu
    keeps one per priority step (``queue`` for 0, ``queue<sep>N`` for the others)."""
    return [prefix + (f"{queue}{PRIORITY_SEP}{priority}" if priority else queue)
            for priority in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, pool: str, prefix: str) -> int:
    """Messages waiting in a pool's queue, in all its priority lists."""
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(pool, prefix):
        pipe.llen(key)
    return sum(pipe.execute())
