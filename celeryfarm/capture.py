"""Celery messages composed as usual but pushed by the farm's own write to Redis.

A dispatch is a record change and a message: the record says which steps are in flight,
the message carries the first of them to a node. Sent apart, they need an outbox for the
moment between them and a round trip each. Here Celery and kombu build the message exactly
as they would send it (the chain, the queue, the priority's list, the key prefix), but the
farm's broker channel hands the final ``LPUSH`` back instead of running it, and the record
store pushes it in the same transaction as the record (see ``JobStore.create`` and
``JobStore.sent``): both happen, or neither.

Only the thread inside :func:`captured` is affected; every other publish (Flower's,
remote control, a node's own) goes out as kombu sends it. The farm's kombu transports
(:mod:`celeryfarm.broker`) use :class:`CapturingPut`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from kombu.utils.json import dumps


class Push(NamedTuple):
    """A message's final write: ``LPUSH key payload`` (the key with kombu's prefix)."""

    key: str
    payload: str


_local = threading.local()


@contextlib.contextmanager
def captured() -> Iterator[list[Push]]:
    """Collect what this thread publishes through the farm's broker channel instead of
    sending it; the caller pushes the list in its own write."""
    pushes: list[Push] = []
    _local.pushes = pushes
    try:
        yield pushes
    finally:
        _local.pushes = None


class CapturingPut:
    """For a kombu Redis channel: its ``_put`` (the transport's one write of a message)
    is collected inside :func:`captured`."""

    def _put(self: Any, queue: str, message: dict, **kwargs: Any) -> None:
        pushes = getattr(_local, "pushes", None)
        if pushes is None:
            return super()._put(queue, message, **kwargs)
        expires = getattr(self, "_expires", None)  # kombu 5.7's queues with x-expires
        if expires and queue in expires:
            raise RuntimeError(f"queue {queue!r} expires: its messages cannot be captured")
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        pushes.append(Push(self.global_keyprefix + key, dumps(message)))
        return None
