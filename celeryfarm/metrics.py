"""``celeryfarm metrics``: the farm's state for Prometheus, read from Redis at each scrape.

Nothing is kept in the exporter: every scrape reads the farm's records (job states, the
node registry, limits, the counters the scripts keep in the stats hash) and the broker's
queues, so any number of exporters agree and a restart loses nothing. Labels are bounded:
pools, nodes, job states, limit names and kinds of retry; never job ids or names.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

#: Upper bounds (seconds) of the step-duration histogram's buckets: a second to a day.
STEP_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)


class FarmCollector:
    """A prometheus_client collector over one farm."""

    def __init__(self, farm: Any, lease_seconds: float) -> None:
        from .nodes import Nodes

        self.farm = farm
        self.nodes = Nodes(farm.store, farm.app, lease_seconds)
        self.broker = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from . import rescue
        from .records.states import JobState
        from .records.store import connect

        store = self.farm.store
        settings = self.farm.settings
        self.broker = self.broker or connect(settings.broker_url, settings.tls,
                                             settings.sentinel_master,
                                             settings.sentinel_password)
        nodes = self.nodes.list()
        pools = sorted({pool for node in nodes for pool in node.pools}
                       | {self.farm.settings.default_queue})
        depth = GaugeMetricFamily("celeryfarm_queue_depth", "Steps waiting in a pool's queue",
                                  labels=["pool"])
        for pool in pools:
            depth.add_metric([pool], rescue.queue_depth(self.broker, pool,
                                                        self.farm.settings.broker_key_prefix))
        yield depth

        jobs = GaugeMetricFamily("celeryfarm_jobs", "Jobs by state", labels=["state"])
        counts = store.states()
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs

        running = GaugeMetricFamily("celeryfarm_running_steps", "Steps a node runs",
                                    labels=["node"])
        up = GaugeMetricFamily("celeryfarm_node_state", "1 for a node's state",
                               labels=["node", "state"])
        for node in nodes:
            running.add_metric([node.name], len(node.running))
            up.add_metric([node.name, node.state], 1)
        yield running
        yield up

        stats = store.stats()
        yield CounterMetricFamily("celeryfarm_lease_losses", "Steps lost with their node",
                                  value=stats.get("lease_losses", 0))
        retries = CounterMetricFamily("celeryfarm_retries", "Failed tries run again",
                                      labels=["kind"])
        retries.add_metric(["retry"], stats.get("retries_failures", 0))
        retries.add_metric(["licence"], stats.get("retries_licence_waits", 0))
        yield retries

        units = GaugeMetricFamily("celeryfarm_limit_units", "A limit's units", labels=["limit"])
        used = GaugeMetricFamily("celeryfarm_limit_in_use", "A limit's units held by running "
                                 "steps", labels=["limit"])
        for name, (total, held) in store.limits().items():
            units.add_metric([name], total)
            used.add_metric([name], held)
        yield units
        yield used

        counts = [stats.get(f"step_in_{bound:g}", 0) for bound in STEP_BUCKETS]
        buckets = list(zip((f"{bound:g}" for bound in STEP_BUCKETS), itertools.accumulate(counts)))
        buckets.append(("+Inf", stats.get("step_count", 0)))
        yield HistogramMetricFamily("celeryfarm_step_duration_seconds",
                                    "How long steps ran, whatever their outcome",
                                    buckets=buckets, sum_value=stats.get("step_sum", 0))


def serve(farm: Any, lease_seconds: float, port: int, host: str) -> Any:
    """Serve ``/metrics`` on ``host:port`` in a background thread; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(FarmCollector(farm, lease_seconds))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
