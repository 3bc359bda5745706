"""Render nodes: ``celeryfarm worker``, the one command that starts a node, and waiting for
nodes to answer.

``celeryfarm up``, the worker image, docker-compose.yml and the tests all start nodes with
:func:`node_command` (or the same ``celeryfarm worker`` command line), so a node joined by
hand behaves exactly like the ones the tests run. The node runs Celery's worker in its own
process (:func:`run_node`), on an app made from its settings then.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterable
from typing import Callable

from celery import Celery

from .config import Settings

#: The name ``celeryfarm worker`` gives a node unless told another (``render@<host>``).
DEFAULT_NAME = "render"


def node_command(name: str = DEFAULT_NAME, concurrency: int = 1,
                 queues: str = "renders") -> list[str]:
    """The command that starts the render node ``name@<host>``: ``celeryfarm worker``."""
    return [sys.executable, "-m", "celeryfarm", "worker", "--name", name,
            "--concurrency", str(concurrency), "--queues", queues]


def worker_arguments(name: str, concurrency: int, queues: str, events: bool = False) -> list[str]:
    """Celery's ``worker`` arguments for a node called ``name@<host>``.

    The prefork pool is the one whose tasks can be terminated (stopping a render). Task
    events are off until Flower turns them on (its ``enable_events`` control); ``events``
    starts with them on (the benchmarks' "Flower watching" figures).
    """
    return [
        "worker", "--pool", "prefork", "--concurrency", str(concurrency),
        "--hostname", f"{name}@%h", "--queues", queues,
        *(["--task-events"] if events else []), "--loglevel", "INFO",
    ]


def celery_command(app: str, name: str, concurrency: int = 1, queues: str = "renders",
                   events: bool = False) -> list[str]:
    """``celery -A app worker`` with a node's arguments: for the benchmarks' baselines
    (bare Celery apps), not for render nodes."""
    return [sys.executable, "-m", "celery", "-A", app,
            *worker_arguments(name, concurrency, queues, events)]


def run_node(settings: Settings, name: str, concurrency: int, queues: str) -> int:
    """Run a render node in this process until it is told to stop; returns its exit
    status."""
    from .celery import create_app

    return create_app(settings).start(worker_arguments(name, concurrency, queues)) or 0


def node_name(name: str) -> str:
    """The full Celery node name a node called ``name`` gets on this host (``%h``)."""
    return f"{name}@{socket.gethostname()}"


def node_answers(app: Celery, name: str, timeout: float = 10.0) -> bool:
    """Whether this host's node called ``name`` answers a ping (a container's health)."""
    return bool(app.control.ping(destination=[node_name(name)], timeout=timeout))


def wait_for_workers(
    app: Celery,
    names: Iterable[str],
    exited: Callable[[], list[str]],
    timeout: float = 60.0,
    hint: str = "",
) -> None:
    """Wait until every named node of this host answers a ping.

    ``exited`` returns the names of nodes whose process has ended: waiting for them is
    pointless, so that raises at once. Raises ``TimeoutError`` saying who is missing.
    """
    names = list(names)
    wanted = {node_name(name) for name in names}
    deadline = time.monotonic() + timeout
    while True:
        replies = app.control.ping(timeout=0.5)
        answered = {node for reply in replies for node in reply}
        if wanted <= answered:
            return
        dead = exited()
        if dead or time.monotonic() > deadline:
            raise TimeoutError(
                f"workers not ready: {sorted(wanted - answered)}; exited: {dead}"
                + (f"; {hint}" if hint else "")
            )
