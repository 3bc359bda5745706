"""Starting render nodes: the ``celery worker`` command line, and waiting for nodes to answer.

``celeryfarm worker``, ``celeryfarm up`` and the test cluster all start nodes with
:func:`worker_command`, so a node joined by hand behaves exactly like the ones the tests run.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterable
from typing import Callable

from celery import Celery


def worker_command(
    name: str, concurrency: int = 2, queues: str = "renders", app: str = "celeryfarm",
    events: bool = True,
) -> list[str]:
    """The command that starts one render node called ``name@<host>``.

    The prefork pool is the one whose tasks can be terminated (stopping a render); task
    events let Flower and the command line follow the farm. ``app`` and ``events`` let the
    benchmarks start bare-Celery baselines the same way.
    """
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", "prefork", "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
        "--queues", queues, *(["--task-events"] if events else []), "--loglevel", "INFO",
    ]


def node_name(name: str) -> str:
    """The full Celery node name ``worker_command(name)`` gets on this host (``%h``)."""
    return f"{name}@{socket.gethostname()}"


def wait_for_workers(
    app: Celery,
    names: Iterable[str],
    exited: Callable[[], list[str]],
    timeout: float = 60.0,
    hint: str = "",
) -> None:
    """Wait until every named node (``worker_command`` names) answers a ping.

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
