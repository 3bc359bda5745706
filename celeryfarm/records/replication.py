"""Writes acknowledged only once a replica has them: Redis's ``WAIT``, for a replicated Redis.

Redis replicates asynchronously: the primary answers a write before any replica has it, so
a primary that dies a moment later takes the write with it, and the replica the sentinels
promote never saw it. The farm's promises are writes: a submitted job, a step that started
(its fencing token), a step that ended, a stop. So with replicas each of those writes is
followed by ``WAIT numreplicas timeout`` on the same connection, in the same round trip
(a pipeline, not a transaction: ``WAIT`` inside ``MULTI`` returns at once). ``WAIT`` waits
for the replicas to acknowledge the connection's last write; the replication stream is
ordered, so that covers every earlier write of every connection too: a submission's record
and its broker message (kombu's ``LPUSH``, on another connection) are on a replica once the
submission's last write is.

When ``WAIT`` times out (no replica answered in time: the replicas are down or far behind),
the write stands, as it must: it was made, and an artist who saw an error would submit the
same job again. It is logged as not yet replicated, and the farm carries on: a farm with a
dead replica keeps rendering. A primary cut off from every replica for longer refuses
writes itself (``min-replicas-to-write``, set by ``celeryfarm up --replicas``); that
refusal (``NOREPLICAS``) is retried here for a bounded time, then raised as a
:class:`redis.ConnectionError`: for the farm, that primary is unreachable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.commands.core import Script

from ..sentinel import uses_sentinel

if TYPE_CHECKING:
    from ..config import Settings

logger = logging.getLogger(__name__)
#: How Redis starts its refusal of a write when too few replicas are connected.
NO_REPLICAS = "NOREPLICAS"
#: Back-off between tries of a refused write (seconds), and how long to keep trying.
RETRY_SECONDS, RETRY_FOR_SECONDS = 0.25, 10.0


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
    deadline = time.monotonic() + RETRY_FOR_SECONDS
    while True:
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
        try:
            reply, acknowledged = pipe.execute()
        except redis.exceptions.NoScriptError:  # a new primary, or a restarted one
            if time.monotonic() > deadline:
                raise
            client.script_load(script.script)
            continue
        except redis.ResponseError as error:
            if not _refused(error):
                raise
            if time.monotonic() > deadline:
                raise redis.ConnectionError(f"the primary refuses writes: {error}") from None
            # Cut off from its replicas, it may no longer be the primary: connect afresh,
            # through the sentinels, to the one they name.
            client.connection_pool.disconnect(inuse_connections=False)
            time.sleep(RETRY_SECONDS)
            continue
        if acknowledged < wait.replicas:
            logger.warning("%s: not yet on %d replica(s) after %d ms (%d acknowledged); it "
                           "stands, but a failover now would lose it", what, wait.replicas,
                           wait.timeout_ms, acknowledged)
        return reply



def _refused(error: redis.ResponseError) -> bool:
    """Whether Redis refused the write for want of replicas (a pipeline's error names the
    command first: "Command # 1 (...) of pipeline caused error: NOREPLICAS ...")."""
    text = str(error)
    return text.startswith(NO_REPLICAS) or f"caused error: {NO_REPLICAS}" in text
