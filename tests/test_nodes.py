"""Render nodes for a wrangler: `celeryfarm nodes` lists them; a drained node finishes what
it runs, takes nothing new, stays drained when it restarts, and takes steps once enabled."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.testing.cluster import LocalCluster

from .cli_fixtures import base_env, ok
from .helpers import renderboot, submit, wait_for_state, wait_until

State = Job.State


def listed(env: dict[str, str], name: str) -> dict | None:
    """The node named ``name`` (before its @host) in ``celeryfarm nodes --json``."""
    for line in ok(env, "nodes", "--json").splitlines():
        node = json.loads(line)
        if node["name"].split("@")[0] == name:
            return node
    return None


def heartbeats_after(env: dict[str, str], name: str, count: int = 2) -> None:
    """Wait until the node has recorded itself ``count`` more times."""
    seen = [listed(env, name)["last_seen"]]
    while len(seen) <= count:
        seen.append(wait_until(lambda: (n := listed(env, name)) and n["last_seen"] > seen[-1]
                               and n["last_seen"], 30, f"{name}'s next heartbeat"))


@contextlib.contextmanager
def running_node(cluster: LocalCluster, plugin: CeleryFarmPlugin, name: str,
                 pool: str) -> Iterator[None]:
    """Node ``name`` serving ``pool`` alone, answering before the block runs; stopped after
    it, if it still runs."""
    cluster.start_worker(name, concurrency=1, queues=pool)
    try:
        cluster.wait_for_workers(plugin.farm.app, [name])
        yield
    finally:
        if name in cluster.workers:
            cluster.stop_worker(name)


def test_nodes_lists_drain_survives_a_restart_and_enable_brings_a_node_back(
    cluster: LocalCluster, farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    env = base_env(**farm_env)
    pool, name = f"drain-{uuid.uuid4().hex[:6]}", f"d{uuid.uuid4().hex[:6]}"
    with running_node(cluster, plugin, name, pool):
        running, _ = submit(plugin.farm, [renderboot("--seconds", 4)], settings={"pool": pool})
        node = wait_until(lambda: (n := listed(env, name)) and n["running"] and n, 30,
                          "the node to report its running step")
        assert node["pools"] == [pool] and node["state"] == "up"
        assert node["running"][0].startswith(running)
        assert name in ok(env, "nodes")

        assert "drained" in ok(env, "drain", name)
        assert listed(env, name)["state"] == "drained"
        assert wait_for_state(plugin, running) == State.kCompleted  # it finishes what runs
        waiting, _ = submit(plugin.farm, [["true"]], settings={"pool": pool})

        cluster.stop_worker(name)  # a restart: still drained
        cluster.start_worker(name, concurrency=1, queues=pool)
        cluster.wait_for_workers(plugin.farm.app, [name])
        heartbeats_after(env, name)
        assert plugin.getJobState(waiting) == State.kWaiting
        assert listed(env, name)["state"] == "drained"

        assert "enabled" in ok(env, "enable", name)
        assert wait_for_state(plugin, waiting) == State.kCompleted
        assert listed(env, name)["state"] == "up"


def test_draining_an_unknown_node_is_a_one_line_error(farm_env: dict[str, str]):
    from .cli_fixtures import cli

    result = cli(base_env(**farm_env), "drain", "no-such-node")
    assert result.returncode == 1 and "no render node 'no-such-node'" in result.stderr


def test_a_node_that_is_gone_is_forgotten_and_one_that_comes_back_records_itself_again(
    cluster: LocalCluster, farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    from .cli_fixtures import cli

    env = base_env(**farm_env)
    pool, name = f"gone-{uuid.uuid4().hex[:6]}", f"g{uuid.uuid4().hex[:6]}"
    with running_node(cluster, plugin, name, pool):
        wait_until(lambda: listed(env, name), 30, f"{name} to record itself")
        assert "drained" in ok(env, "drain", name)
        refused = cli(env, "forget", name)
        assert refused.returncode == 1 and "stop it first" in refused.stderr
        assert listed(env, name)
    # Silent for a lease period (this command's CELERYFARM_LEASE_SECONDS): forgotten.
    quick = {**env, "CELERYFARM_LEASE_SECONDS": "3", "CELERYFARM_STOP_GRACE_SECONDS": "1"}
    wait_until(lambda: cli(quick, "forget", name).returncode == 0, 30, f"{name} forgotten")
    assert listed(env, name) is None
    store = plugin.farm.store
    assert not [n for n in store.redis.smembers(store.keys.drained) if n.startswith(f"{name}@")]
    assert not [n for n in store.redis.zrange(store.keys.pool_nodes(pool), 0, -1)
                if n.startswith(f"{name}@")]
    # It comes back: recorded again, and no longer drained (its drain was forgotten too).
    with running_node(cluster, plugin, name, pool):
        node = wait_until(lambda: listed(env, name), 30, f"{name} to record itself again")
        assert node["state"] == "up"
        job_id, _ = submit(plugin.farm, [["true"]], settings={"pool": pool})
        assert wait_for_state(plugin, job_id) == State.kCompleted
