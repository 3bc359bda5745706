"""Renders left running by a step whose pool process and worker both died.

A pool process killed mid-render (the OOM killer, a SIGKILL) leaves its render in the step's
cgroup. Its worker's main process kills that group when billiard reports the loss
(:meth:`celeryfarm.node.RenderNode.on_task_failure`), but billiard takes seconds to notice,
and a worker killed in that time (a node's processes killed together, a container restarted)
leaves the render running for ever while the step runs again elsewhere. So each pass of every
node's reaper also looks at the step groups on its host: a group whose step's lease is not
held by a live process here is killed.
"""

from __future__ import annotations

import logging

import psutil

from . import cgroup, process, renderenv
from .dispatch import token_of
from .records.store import JobStore

logger = logging.getLogger(__name__)


def sweep(store: JobStore, render_user: renderenv.RenderUser | None) -> list[str]:
    """Kill the renders of this farm's steps on this host that nothing runs any more; return
    their task ids. Groups of other farms (no such job here) and of live steps are left."""
    tokens = {name: token for name in cgroup.names() if (token := token_of(name))}
    if not tokens:
        return []
    owners = store.lease_owners([token.job_id for token in tokens.values()])
    orphaned = [name for name, owner in zip(tokens, owners)
                if owner is not None and not _held_here(name, owner)]
    for task_id in orphaned:
        survivors = process.kill_step(task_id, grace_seconds=0)
        renderenv.remove_private_folders(task_id, render_user)
        logger.warning("killed the render of step %s: the process that ran it is gone%s",
                       task_id, f" (survived SIGKILL: {survivors})" if survivors else "")
    return orphaned


def _held_here(task_id: str, owner: str) -> bool:
    """Whether ``owner`` (a :func:`~celeryfarm.lease.lease_owner`) is an execution of
    ``task_id`` by a process alive on this host."""
    held_by, _, pid = owner.rpartition("/")
    if not (held_by.startswith(f"{task_id}/") and pid.isdigit()):
        return False
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
