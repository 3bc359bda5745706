"""Writes acknowledged only once a replica has them: Redis's ``WAIT``, for a replicated Redis.

Redis replicates asynchronously: the primary answers a write before any replica has it, so
a primary that dies a moment later takes the write with it, and the replica the sentinels
promote never saw it. The farm's promises are writes: a submitted job, a step that started
(its fencing token), a step that ended, a stop. So with replicas each of those writes is
followed by ``WAIT numreplicas timeout`` on the same connection, in the same round trip
(after ``EXEC`` for a transaction: ``WAIT`` inside ``MULTI`` returns at once). ``WAIT``
waits for the replicas to acknowledge the connection's last write; the replication stream
is ordered, so that covers every earlier write of every connection too.

When ``WAIT`` times out (no replica answered in time: the replicas are down or far behind),
the write stands, as it must: it was made, and an artist who saw an error would submit the
same job again. It is logged as not yet replicated, and the farm carries on: a farm with a
dead replica keeps rendering. A primary cut off from every replica for longer refuses
writes itself (``min-replicas-to-write``, set by ``celeryfarm up --replicas``): for the
farm's clients, that primary is out of reach (see
:class:`celeryfarm.redisclient.FollowingConnection`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from ..sentinel import uses_sentinel

if TYPE_CHECKING:
    from ..config import Settings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReplicaWait:
    """How many replicas must have an acknowledged write (0: none, no ``WAIT``), and how
    long to wait for them."""

    replicas: int = 0
    timeout_ms: int = 1000

    def __bool__(self) -> bool:
        return self.replicas > 0

    @classmethod
    def of(cls, settings: Settings) -> ReplicaWait:
        """The farm's: none unless its records are on a replicated Redis (Sentinel)."""
        if not uses_sentinel(settings.records_url):
            return cls()
        return cls(settings.wait_replicas, int(settings.wait_seconds * 1000))


#: No ``WAIT``: a Redis without replicas.
NO_WAIT = ReplicaWait()


def run(client: redis.Redis, script: Script, keys: Sequence[Any], args: Sequence[Any],
        wait: ReplicaWait, what: str) -> Any:
    """Run ``script`` (a write the farm acknowledges: ``what`` names it in the log) and,
    with ``wait``, ``WAIT`` for its replicas in the same round trip; the script's reply."""
    if not wait:
        return script(keys=keys, args=args, client=client)
    for loaded in (False, True):
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
        try:
            reply, acknowledged = pipe.execute()
            break
        except redis.exceptions.NoScriptError:  # a new primary, or a restarted one
            if loaded:
                raise
            client.script_load(script.script)
    _check(acknowledged, wait, what)
    return reply


def transaction(client: redis.Redis, write: Callable[[Pipeline], None], wait: ReplicaWait,
                what: str) -> list[Any]:
    """Run the commands ``write`` queues as one ``MULTI``/``EXEC`` and, with ``wait``,
    ``WAIT`` for the replicas after it, in one round trip on one connection (``WAIT``
    inside ``MULTI`` returns at once, and on another connection it would wait for that
    one's writes). Returns ``EXEC``'s replies; raises the first error among them (or the
    error that refused a command as it was queued: then nothing ran)."""
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("MULTI")
    write(pipe)
    pipe.execute_command("EXEC")
    if wait:
        pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
    replies = pipe.execute()
    results = replies[-2] if wait else replies[-1]
    for result in results:
        if isinstance(result, Exception):
            raise result
    if wait:
        _check(replies[-1], wait, what)
    return results


def _check(acknowledged: int, wait: ReplicaWait, what: str) -> None:
    if acknowledged < wait.replicas:
        logger.warning("%s: not yet on %d replica(s) after %d ms (%d acknowledged); it "
                       "stands, but a failover now would lose it", what, wait.replicas,
                       wait.timeout_ms, acknowledged)


