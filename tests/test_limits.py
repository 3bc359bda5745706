"""Limits: each running step holds one unit of each of its job's limits; a step over a limit
waits without holding a node slot; a dead node's unit comes back with its lease."""

from __future__ import annotations

import uuid

from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.records import JobState
from celeryfarm.records.states import ClaimStatus
from celeryfarm.records.store import Token

from .cli_fixtures import base_env, cli, ok
from .helpers import renderboot, submit_like_katana, wait_for_state, wait_until
from .test_plugin import render_node
from .test_records import LEASE_MS, OWNER, new_job, store  # noqa: F401 - the fixture

State = Job.State


def limited(plugin: CeleryFarmPlugin, job_id: str) -> bool:
    return any(e["event"] == "limited" for e in plugin.farm.events(job_id))


def test_a_step_over_a_limit_waits_without_holding_a_node_slot(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin
):
    env, name = base_env(**farm_env), f"lic{uuid.uuid4().hex[:6]}"
    assert "1 unit" in ok(env, "limit", "set", name, "1")
    first = ok(env, "submit", "--limit", name, "--", *renderboot("--seconds", 600)).strip()
    wait_for_state(plugin, first, State.kRunning)
    second = ok(env, "submit", "--limit", name, "--", "true").strip()
    wait_until(lambda: limited(plugin, second), 30, "the second job to wait for the limit")
    assert plugin.getJobState(second) == State.kWaiting
    assert [name, "1", "1"] in [line.split() for line in ok(env, "limit", "list").splitlines()]
    # the other node is free for jobs without the limit
    free = ok(env, "submit", "--", "true").strip()
    assert wait_for_state(plugin, free) == State.kCompleted
    assert plugin.getJobState(second) == State.kWaiting
    plugin.stopJob(first)
    assert wait_for_state(plugin, second) == State.kCompleted
    assert not any(e["event"] == "start" and e["step"] == 0 for e in plugin.farm.events(second)
                   if e["at"] < plugin.farm.get(first).end_ms)


def test_an_unknown_limit_is_refused_and_the_farm_setting_reaches_the_job(
    farm_env: dict[str, str], plugin: CeleryFarmPlugin, katana_dropin: dict
):
    env, name = base_env(**farm_env), f"lic{uuid.uuid4().hex[:6]}"
    result = cli(env, "submit", "--limit", name, "--", "true")
    assert result.returncode == 1 and f"unknown limit(s) {name}" in result.stderr
    ok(env, "limit", "set", name, "2")
    node = render_node(limits=f"{name}", pool=f"nobody-{uuid.uuid4().hex[:6]}")
    job_id, _ = submit_like_katana(plugin, ["true"], node_name=node)
    assert plugin.farm.get(job_id).spec.limits == (name,)
    plugin.stopJob(job_id)


def test_a_unit_held_by_a_lost_step_comes_back_with_its_lease(store):  # noqa: F811
    name = f"lic{uuid.uuid4().hex[:6]}"
    store.set_limit(name, 1)
    holder, waiter = (new_job(store, JobState.WAITING) for _ in range(2))
    for token in (holder, waiter):
        store.redis.hset(store.keys.job(token.job_id), "limits", name)
    assert store.claim(holder, OWNER, "n1", LEASE_MS)[0] == ClaimStatus.OK
    assert store.limits()[name] == (1, 1)
    assert store.claim(waiter, OWNER, "n2", LEASE_MS)[0] == ClaimStatus.LIMITED
    store.redis.zadd(store.keys.leases, {holder.job_id: 0})  # its node died: lease expired
    assert store.limits()[name] == (1, 0)
    again = Token(waiter.job_id, 1, 2, 0)  # the limited step was re-dispatched
    assert store.claim(again, OWNER, "n2", LEASE_MS)[0] == ClaimStatus.OK
