"""Render nodes as a wrangler sees them: list them, drain one, enable it again, forget one.

Every node's reaper records the node in Redis on each pass (``heartbeat.lua``): when it was
last seen, its pools and its running steps. A *drained* node finishes what it runs and takes
nothing new: the farm keeps the drained nodes in a Redis set, so a node that restarts stays
drained (its :class:`~celeryfarm.node.RenderNode` bootstep reads the set before the worker
starts consuming), and tells a running node with Celery's own remote control
(``cancel_consumer``, and ``add_consumer`` to enable it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from celery import Celery

from .errors import FarmError
from .records.store import JobStore

#: Seconds to wait for a running node to answer a drain or enable.
CONTROL_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One render node, as its last heartbeat left it."""

    name: str
    pools: tuple[str, ...]
    running: tuple[str, ...]  # task ids of the steps it runs
    last_seen_ms: int
    state: str  # "up", "drained", or "lost" (not seen for a lease period)


class Nodes:
    """The farm's render nodes, through its records' Redis and Celery's remote control."""

    def __init__(self, store: JobStore, app: Celery, lease_seconds: float) -> None:
        self.store, self.app, self.lease_ms = store, app, int(lease_seconds * 1000)
        self.redis, self.keys = store.redis, store.keys

    def list(self) -> list[NodeInfo]:
        """Every node that ever recorded itself, by name."""
        names = sorted(self.redis.zrange(self.keys.nodes, 0, -1))
        seconds, micros = self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        drained = self.redis.smembers(self.keys.drained)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.node(name))
        found = []
        for name, fields in zip(names, pipe.execute()):
            seen = int(fields.get("seen") or 0)
            state = ("drained" if name in drained
                     else "lost" if now_ms - seen > self.lease_ms else "up")
            found.append(NodeInfo(name, tuple(filter(None, fields.get("pools", "").split(","))),
                                  tuple(json.loads(fields.get("running") or "[]")), seen, state))
        return found

    def resolve(self, text: str) -> NodeInfo:
        """The node named ``text`` (``name@host``, or ``name`` when one host has it)."""
        nodes = self.list()
        matches = [n for n in nodes if n.name == text] or [
            n for n in nodes if n.name.split("@", 1)[0] == text]
        if len(matches) != 1:
            known = ", ".join(n.name for n in nodes) or "none"
            raise FarmError(f"{'no' if not matches else 'more than one'} render node "
                            f"{text!r}; known: {known}")
        return matches[0]

    def drain(self, text: str) -> tuple[NodeInfo, bool]:
        """Drain a node: it finishes what runs and takes nothing new, across restarts.
        Returns the node and whether it answered now (else it applies it when it starts)."""
        node = self.resolve(text)
        self.redis.sadd(self.keys.drained, node.name)
        return node, self._control("cancel_consumer", node)

    def enable(self, text: str) -> tuple[NodeInfo, bool]:
        """Let a drained node take steps again."""
        node = self.resolve(text)
        self.redis.srem(self.keys.drained, node.name)
        return node, self._control("add_consumer", node)

    def forget(self, text: str) -> NodeInfo:
        """Forget a node that is gone (retired, or a container made again under a new name):
        it leaves the list, the pools' node sets and the drained set. One seen within a
        lease period is refused; one that comes back records itself again, not drained."""
        node = self.resolve(text)
        silent_ms, forgotten = self.store.forget_node(node.name, node.pools, self.lease_ms)
        if silent_ms < 0:
            raise FarmError(f"render node {node.name} is not known any more (forgotten meanwhile)")
        if not forgotten:
            raise FarmError(f"render node {node.name} was seen {max(silent_ms, 0) / 1000:.0f} s "
                            f"ago: stop it first (it is forgotten once silent for "
                            f"{self.lease_ms / 1000:g} s)")
        return node

    def _control(self, command: str, node: NodeInfo) -> bool:
        """Send ``command`` for each of the node's pools; whether it answered every one."""
        answered = True
        for pool in node.pools:
            replies: list[Any] = getattr(self.app.control, command)(
                pool, destination=[node.name], reply=True, timeout=CONTROL_TIMEOUT) or []
            answered = answered and any(node.name in reply for reply in replies)
        return answered


def drained_at_start(app: Celery, store: JobStore, node: str) -> bool:
    """In a starting worker, before it consumes: if ``node`` is drained, consume from none
    of its pools (``add_consumer`` on enable brings them back). Returns whether it is."""
    if not store.redis.sismember(store.keys.drained, node):
        return False
    queues = app.amqp.queues
    queues.deselect(list(queues.consume_from))
    return True
