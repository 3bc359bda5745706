"""`celeryfarm metrics`: a real exporter process, scraped over HTTP and read with
prometheus_client's own parser."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
import uuid

from prometheus_client.parser import text_string_to_metric_families

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin

from .cli_fixtures import CELERYFARM, base_env, ok
from .helpers import renderboot, submit, wait_for_state, wait_until

State = Job.State


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, dict[tuple, float]] | None:
    """Every sample, by metric name and labels; None while the exporter is not up yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def test_metrics_serves_the_farm_on_loopback_with_bounded_labels(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    env, name = base_env(**farm_env), f"lic{uuid.uuid4().hex[:6]}"
    ok(env, "limit", "set", name, "3")
    done, _ = submit(plugin.farm, [renderboot("--seconds", 0.2)])
    assert wait_for_state(plugin, done) == State.kCompleted
    port = free_port()
    exporter = subprocess.Popen([*CELERYFARM, "metrics", "--port", str(port)], env=env,
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        samples = wait_until(lambda: scrape(port), 30, "the exporter to answer")
        assert samples["celeryfarm_jobs"][(("state", "Completed"),)] >= 1
        assert (("pool", "renders"),) in samples["celeryfarm_queue_depth"]
        assert samples["celeryfarm_limit_units"][(("limit", name),)] == 3
        assert samples["celeryfarm_limit_in_use"][(("limit", name),)] == 0
        assert samples["celeryfarm_step_duration_seconds_count"][()] >= 1
        buckets = samples["celeryfarm_step_duration_seconds_bucket"]
        assert buckets[(("le", "+Inf"),)] >= 1
        # Cumulative, as Prometheus reads them: the 0.2 s step is in every bucket from 1 s.
        counts = [buckets[(("le", bound),)] for bound in ("1", "10", "60", "+Inf")]
        assert counts == sorted(counts) and counts[0] >= 1
        assert {labels for labels in samples["celeryfarm_retries_total"]} == {
            (("kind", "retry"),), (("kind", "licence"),)}
        assert "celeryfarm_lease_losses_total" in samples
        assert any(dict(labels)["node"].startswith("node1@")
                   for labels in samples["celeryfarm_running_steps"])
        for metric in samples.values():  # never a job id as a label
            assert not any(done in str(labels) for labels in metric)
    finally:
        exporter.terminate()
        exporter.wait(30)
    assert "127.0.0.1" in exporter.stderr.read().decode()
