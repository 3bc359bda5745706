"""The Lua scripts that change job records, loaded from the ``lua/`` folder beside this file.

Each ``.lua`` file starts with its KEYS and ARGV layout. ``common.lua`` (Redis's clock, state
lists) is put in front of every script; a first line ``-- uses: other.lua`` puts that file
in front too. Scripts are registered once per Redis client and run by ``EVALSHA``, or in a
transaction by ``EVAL`` (:func:`in_transaction`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

import redis
from redis.commands.core import Script

COMMON = "common.lua"
#: Scripts by name: each is ``lua/<name>.lua``.
NAMES = ("claim", "renew", "finish", "abandon", "expired", "reap", "rescue", "stale_outbox",
         "transition", "sent", "forget", "fail_lost", "retry", "due", "avoid", "heartbeat",
         "forget_node", "adopt", "create", "listing", "retire", "trim_changes")


@functools.cache
def source(name: str) -> str:
    """The full source of script ``name``: common.lua, what it uses, then its own text."""
    folder = resources.files(__package__) / "lua"
    text = (folder / f"{name}.lua").read_text()
    used = []
    first = text.splitlines()[0] if text else ""
    if first.startswith("-- uses:"):
        used = [part.strip() for part in first.split(":", 1)[1].split(",") if part.strip()]
    parts = [(folder / COMMON).read_text(), *((folder / u).read_text() for u in used), text]
    return "\n".join(parts)


class Scripts:
    """Every script, registered on one Redis client (the names of ``NAMES``)."""

    def __init__(self, client: redis.Redis) -> None:
        load = functools.partial(_register, client)
        self.claim, self.renew, self.finish = load("claim"), load("renew"), load("finish")
        self.abandon = load("abandon")
        self.expired, self.reap = load("expired"), load("reap")
        self.rescue, self.stale_outbox = load("rescue"), load("stale_outbox")
        self.fail_lost = load("fail_lost")
        self.transition, self.sent, self.forget = (
            load("transition"), load("sent"), load("forget"))
        self.retry, self.due = load("retry"), load("due")
        self.avoid, self.heartbeat = load("avoid"), load("heartbeat")
        self.forget_node = load("forget_node")
        self.adopt, self.create, self.listing = load("adopt"), load("create"), load("listing")
        self.retire, self.trim_changes = load("retire"), load("trim_changes")


def in_transaction(pipe: redis.client.Pipeline, script: Script, keys: Sequence[object],
                   args: Sequence[object]) -> None:
    """Queue ``script`` on a MULTI pipeline by its text (``EVAL``), not its digest: on a
    pipeline redis-py asks ``SCRIPT EXISTS`` first (one more round trip), and an
    ``EVALSHA`` of a script the server lost (a restart, a failover) would fail inside
    ``EXEC`` after the transaction's other commands ran. Redis caches the text's digest."""
    pipe.eval(script.script, len(keys), *keys, *args)


def _register(client: redis.Redis, name: str) -> Script:
    return client.register_script(source(name))
