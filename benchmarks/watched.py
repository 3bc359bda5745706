"""Figure 11 of ``benchmarks.run``: the farm's figures 1-3 again while Flower watches.

The farm sends no task events of its own; Flower turns them on in every node (its
``enable_events`` control, every few seconds), and the nodes then publish three events a
step. This runs Flower as celeryfarm runs it, waits until every farm node says Flower has
turned its events on, measures submitJob, the 20-step job and the throughput again, then
stops Flower and turns the events off (Flower never does).
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from celeryfarm.redisserver import free_port

from .common import Row

if TYPE_CHECKING:
    from .run import Bench

ENABLED = "Events of group {task} enabled by remote"


def fig11_flower(b: Bench) -> list[Row]:
    """Figures 1-3 (submitJob, the 20-step job, throughput) with Flower running: Flower has
    turned the nodes' task events on. Reported, no target."""
    from .run import FARM_NODES, fig1_submit, fig2_steps, fig3_throughput

    b.farm_workers()
    b.bare_workers()
    env = {**b.env, "FLOWER_BASIC_AUTH": f"bench:{secrets.token_urlsafe(12)}"}
    with open(b.base / "flower.log", "ab") as log:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celeryfarm.flower", "--address=127.0.0.1",
             f"--port={free_port()}"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=b.base)
    try:
        logs = [b.cluster.base / f"worker-{name}.log" for name in FARM_NODES]
        deadline = time.monotonic() + 60
        while not all(ENABLED in path.read_text(errors="replace") for path in logs):
            if flower.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Flower did not turn task events on; see {b.base}")
            time.sleep(0.2)
        return [dataclasses.replace(row, figure=f"{row.figure}F", target="reported",
                                    met=None, measure=f"with Flower: {row.measure.strip()}")
                for figure in (fig1_submit, fig2_steps, fig3_throughput)
                for row in figure(b)]
    finally:
        flower.terminate()
        flower.wait(30)
        b.farm.app.control.disable_events()
