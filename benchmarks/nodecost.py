"""What a render node costs Redis, and how many nodes one Redis carries: ``make bench``.

    python -m benchmarks.nodecost              # about three minutes
    python -m benchmarks.nodecost --quick      # smaller samples, about a minute

Two ways of measuring, each for what it shows best:

* **Real nodes** (``celeryfarm worker``, one render slot each) show everything a node does:
  broker polling, heartbeats, the reaper, lease renewals while a render runs, and the task
  events it sends while Flower watches (Flower turns events on with the ``enable_events``
  control; here the benchmark sends it). Redis's CPU and commands are measured over a window
  with the nodes idle, busy, and idle with events on.
* **Light simulated nodes** show how the farm's own traffic scales past what fits on one
  machine: the Redis CPU of one heartbeat with hundreds of nodes known, one lease renewal
  with 10,000 leases running, and one reaper pass with 10,000 leases running, each issued as
  a node issues it (one round trip each, from several threads).

From those it says how many nodes one Redis carries at half a core. Redis's CPU is read from
``/proc`` for the ``redis-server`` process, so it counts only Redis's own work; the machine's
other load stretches the windows, not the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import redis

from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.jobs import JobRecord, JobSpec
from celeryfarm.lease import lease_owner
from celeryfarm.reaper import Reaper
from celeryfarm.records import JobState
from celeryfarm.records.store import JobStore, Token
from celeryfarm.testing.cluster import LocalCluster

from .common import load, machine

#: The smallest per-node share of a core a window tells apart from Redis's housekeeping.
RESOLUTION = 0.0002
#: Threads issuing the simulated nodes' calls: enough to keep Redis busy.
THREADS = 8


@dataclasses.dataclass(frozen=True)
class Sizes:
    nodes: int  # real nodes
    window: float  # seconds each real-node window lasts
    leases: int  # running leases for the per-operation costs
    sim_nodes: int  # simulated nodes heartbeating
    operations: int  # calls per operation measured
    passes: int  # reaper passes measured


FULL = Sizes(nodes=4, window=30.0, leases=10_000, sim_nodes=1_000, operations=20_000,
             passes=1_000)
QUICK = Sizes(nodes=2, window=8.0, leases=2_000, sim_nodes=200, operations=4_000, passes=200)


@dataclasses.dataclass(frozen=True)
class Window:
    """What Redis did over a measuring window."""

    seconds: float
    cpu_seconds: float
    commands: dict[str, int]  # calls per command over the window

    @property
    def cpu_share(self) -> float:
        """Redis's CPU over the window, as a share of one core."""
        return self.cpu_seconds / self.seconds

    @property
    def commands_per_second(self) -> float:
        return sum(self.commands.values()) / self.seconds

    def top(self, count: int = 5) -> str:
        ranked = sorted(self.commands.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{name} {calls / self.seconds:.1f}/s" for name, calls in ranked)


class RedisMeter:
    """Redis's own CPU time and per-command call counts, read before and after a window."""

    def __init__(self, client: redis.Redis, pid: int) -> None:
        self.client, self.process = client, psutil.Process(pid)

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def calls(self) -> dict[str, int]:
        return {name.removeprefix("cmdstat_"): int(stats["calls"])
                for name, stats in self.client.info("commandstats").items()}

    def measure(self, run: Callable[[], object]) -> Window:
        """Measure Redis while ``run`` runs (the reads themselves are left out)."""
        calls, cpu, started = self.calls(), self.cpu(), time.monotonic()
        run()
        seconds, used = time.monotonic() - started, self.cpu() - cpu
        after = self.calls()
        commands = {name: count - calls.get(name, 0) for name, count in after.items()}
        commands["info"] = max(0, commands.get("info", 0) - 1)  # our own reads
        return Window(seconds, used, {name: n for name, n in commands.items() if n > 0})


def pause(seconds: float) -> Callable[[], None]:
    """A window of ``seconds`` in which the nodes do what they do on their own."""
    return lambda: time.sleep(seconds)


def in_threads(calls: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """Run ``calls`` from :data:`THREADS` threads, one round trip each, as many nodes would."""

    def run() -> None:
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(call) for call in calls]:
                future.result()

    return run


# -- real nodes --------------------------------------------------------------------------------
def real_nodes(cluster: LocalCluster, farm: Farm, meter: RedisMeter, sizes: Sizes) -> dict:
    """Redis's load with no node (its own housekeeping), then with the nodes idle, busy,
    and idle with task events on."""
    figures = {"no node": meter.measure(pause(sizes.window))}
    names = [f"cost{index}" for index in range(sizes.nodes)]
    for name in names:
        cluster.start_worker(name, concurrency=1)
    cluster.wait_for_workers(farm.app, names)
    time.sleep(sizes.window / 4)  # let start-up traffic pass before measuring
    figures["idle"] = meter.measure(pause(sizes.window))

    context = farm.create_context()
    jobs = [farm.submit_commands([["sleep", str(int(sizes.window * 3))]],
                                 context=context.name, name="nodecost").job_id
            for _ in names]
    deadline = time.monotonic() + 60
    while sum(farm.store.state(job) == JobState.RUNNING for job in jobs) < len(jobs):
        if time.monotonic() > deadline:
            raise TimeoutError("the nodes did not all start a render within 60 s")
        time.sleep(0.2)
    figures["busy"] = meter.measure(pause(sizes.window))
    for job in jobs:
        farm.stop(job)

    farm.app.control.enable_events()  # what a watching Flower sends
    time.sleep(sizes.window / 4)
    figures["idle, events on"] = meter.measure(pause(sizes.window))
    farm.app.control.disable_events()
    for name in names:
        cluster.stop_worker(name)
    return figures


# -- simulated nodes ---------------------------------------------------------------------------
def running_leases(store: JobStore, settings: Settings, count: int) -> list[tuple[Token, str]]:
    """``count`` jobs whose one step runs, each with a lease held by a simulated node."""
    host = socket.gethostname()
    now = int(time.time() * 1000)
    records = [JobRecord(job_id=uuid.uuid4().hex,
                         spec=JobSpec.build(name=f"sim{index}", commands=[["true"]],
                                            environment={}, frames=range(1, 2),
                                            context="sim", user="sim", host=host, session="sim"),
                         log_path="sim/render.log", submitted_ms=now)
               for index in range(count)]
    store.create_many(records)
    leases = [(Token(record.job_id, record.attempt, record.dispatch, 0),
               lease_owner(f"{record.job_id}-task", f"sim{index % 1000}@{host}", 1))
              for index, record in enumerate(records)]
    lease_ms = int(settings.lease_seconds * 1000)
    in_threads([lambda token=token, owner=owner: store.claim(token, owner, "sim", lease_ms)
                for token, owner in leases])()
    return leases


def simulated(store: JobStore, farm: Farm, meter: RedisMeter, sizes: Sizes) -> dict:
    settings = farm.settings
    leases = running_leases(store, settings, sizes.leases)
    lease_ms = int(settings.lease_seconds * 1000)
    picks = [leases[index % len(leases)] for index in range(sizes.operations)]
    figures = {"renew": meter.measure(in_threads(
        [lambda token=token, owner=owner: store.renew(token, owner, lease_ms)
         for token, owner in picks]))}
    nodes = [f"sim{index}@{socket.gethostname()}" for index in range(sizes.sim_nodes)]
    beats = [nodes[index % len(nodes)] for index in range(sizes.operations)]
    figures["heartbeat"] = meter.measure(in_threads(
        [lambda node=node: store.heartbeat(node, ("renders",), ("renders",), [])
         for node in beats]))
    reaper = Reaper(farm.app, store, settings, node=nodes[0], pools=("renders",))
    figures["reaper pass"] = meter.measure(lambda: [reaper.reap_once()
                                                    for _ in range(sizes.passes)])

    def looking_pass() -> None:
        for _ in range(sizes.passes):
            store.redis.delete(store.keys.look_turn)  # every pass takes the look's turn
            reaper.reap_once()

    figures["reaper pass with the look"] = meter.measure(looking_pass)
    figures["calls"] = {"renew": sizes.operations, "heartbeat": sizes.operations,
                        "reaper pass": sizes.passes, "reaper pass with the look": sizes.passes}
    return figures


# -- the report --------------------------------------------------------------------------------
def report(real: dict[str, Window], sim: dict, sizes: Sizes, settings: Settings) -> str:
    housekeeping = real.pop("no node")
    lines = ["| measured | Redis CPU | Redis commands/s | busiest commands |",
             "|---|---|---|---|",
             f"| no node (Redis's own housekeeping) | {housekeeping.cpu_share * 100:.2f}% of a "
             f"core | {housekeeping.commands_per_second:.1f} | {housekeeping.top()} |"]
    per_node = {}
    for what, window in real.items():
        per_node[what] = max(0.0, window.cpu_share - housekeeping.cpu_share) / sizes.nodes
        lines.append(f"| {sizes.nodes} real nodes, {what} | {per_node[what] * 100:.2f}% of a "
                     f"core per node | {window.commands_per_second / sizes.nodes:.1f} per node "
                     f"| {window.top()} |")
    costs = {}
    for what, calls in sim["calls"].items():
        window: Window = sim[what]
        costs[what] = window.cpu_seconds / calls
        lines.append(f"| one {what} ({sizes.leases} leases running, {sizes.sim_nodes} nodes) "
                     f"| {costs[what] * 1e6:.0f} µs | {sum(window.commands.values()) / calls:.1f}"
                     f" commands each | {window.top(3)} |")
    idle, busy, events = per_node["idle"], per_node["busy"], per_node["idle, events on"]
    renews = 1 / settings.poll_seconds
    model = (renews * costs["renew"] + (costs["heartbeat"] + costs["reaper pass"])
             / settings.reap_seconds)
    lines += [
        "",
        f"- A busy node renews its lease {renews:g} times a second (CELERYFARM_POLL_SECONDS "
        f"{settings.poll_seconds:g}: the renewal is also how a step hears of a stop) and "
        f"heartbeats and reaps every {settings.reap_seconds:g} s: "
        f"{model * 100:.2f}% of a core by the per-operation costs, "
        f"{busy * 100:.2f}% measured on real nodes (broker polling included, Redis's "
        f"housekeeping taken out).",
        f"- At half a core, one Redis carries {carried(busy)} busy nodes, "
        f"{carried(idle)} idle ones, and {carried(max(events, busy))} busy nodes "
        f"while Flower watches (the events cost {max(0.0, events - idle) * 100:.2f}% of a "
        f"core per idle node).",
    ]
    return "\n".join(lines)


def carried(share: float) -> str:
    """How many nodes that each cost ``share`` of a core fit in half a core. Redis's own
    housekeeping wanders by about :data:`RESOLUTION` of a core per node between windows, so a
    smaller cost only gives a lower bound."""
    if share < RESOLUTION:
        return f"more than {0.5 / RESOLUTION:,.0f}"
    return f"about {0.5 / share:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nodecost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    base = Path(tempfile.mkdtemp(prefix="celeryfarm-nodecost-"))
    cluster = LocalCluster(base)
    print(f"# node cost: {machine()['cpu']}; load {load()}", flush=True)
    try:
        cluster.start()
        settings = Settings.from_env(cluster.env)
        farm = Farm(settings)
        meter = RedisMeter(redis.Redis.from_url(cluster.redis.url),
                           cluster.redis.process.pid)
        real = real_nodes(cluster, farm, meter, sizes)
        sim = simulated(farm.store, farm, meter, sizes)
        print(report(real, sim, sizes, settings))
        print(f"# load afterwards {load()}")
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
