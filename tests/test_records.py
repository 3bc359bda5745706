"""The job state machine against a real redis-server, without workers.

Every event of the transition table is tried from every state through the store's own
methods (the scripts the nodes and clients run): the allowed ones change the record as the
table says, the others are refused and change nothing.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from celeryfarm.jobs import JobRecord, JobSpec
from celeryfarm.records import TRANSITIONS, Event, JobState, StepOutcome
from celeryfarm.records.scripts import NAMES, source
from celeryfarm.records.states import ClaimStatus, FailureKind, LossOutcome, allowed
from celeryfarm.records.store import JobStore, Loss, Token, connect
from celeryfarm.redisserver import RedisServer

OWNER = "task/node@host/1"
LEASE_MS = 60_000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStore]:
    server = RedisServer(tmp_path_factory.mktemp("records") / "redis", appendonly=False)
    with server:
        yield JobStore(connect(server.url), f"test-{uuid.uuid4().hex[:6]}")


def new_job(store: JobStore, state: JobState, leased: bool = False) -> Token:
    """A one-step job on attempt 1, dispatch 1, in ``state``; ``leased``: its step runs
    under ``OWNER``'s lease (set up by hand: only a claim writes a lease, and a claim
    needs an active job)."""
    spec = JobSpec.build(name="t", commands=["true"])
    job_id = uuid.uuid4().hex
    store.create(JobRecord(job_id=job_id, spec=spec, log_path=f"{job_id}/render.log",
                           state=state, submitted_ms=1), dispatching=False)
    if leased:
        store.redis.hset(store.keys.job(job_id), "lease_owner", OWNER)
        store.redis.zadd(store.keys.leases, {job_id: 0})  # expired, for the reaper
    return Token(job_id, 1, 1, 0)


def claim(store: JobStore, token: Token) -> bool:
    status, _, record = store.claim(token, OWNER, "node@host", LEASE_MS)
    assert (status == ClaimStatus.OK) == (record is not None)
    return status == ClaimStatus.OK


def finish(outcome: StepOutcome) -> Callable[[JobStore, Token], bool]:
    def act(store: JobStore, token: Token) -> bool:
        assert store.finish(token, OWNER, outcome, last=True, reason="why")  # it is current
        return True
    return act


def restart(store: JobStore, token: Token) -> bool:
    record = store.get(token.job_id)
    record.attempt, record.dispatch, record.next_step = 2, 2, 0
    return store.restart(record, previous_attempt=1)


def lose(store: JobStore, token: Token) -> bool:
    loss = store.lose(token.job_id, max_losses=3, hold_ms=LEASE_MS, cause="test")
    assert loss is None or loss.outcome == LossOutcome.REDISPATCHED
    return loss is not None


def fail_lost(store: JobStore, token: Token) -> bool:
    """The step was lost too often, and a reaper holds it (set up by hand: only a loss
    writes a hold, and a loss needs an active job)."""
    hold = f"failing:{OWNER}"
    store.redis.hset(store.keys.job(token.job_id), "lease_owner", hold)
    store.redis.zadd(store.keys.leases, {token.job_id: 0})
    loss = Loss(token.job_id, LossOutcome.FAILING, 0, "node@host", 3, "test", hold, 1)
    return store.fail_lost(loss, "lost")


def retry(store: JobStore, token: Token) -> bool:
    return store.retry(token, OWNER, delay_ms=0, counted=True, why="exit status 1") > 0


#: Each event, through each method that causes it: (event, name, action, needs a lease).
ACTIONS = [
    (Event.CLAIM, "claim", claim, False),
    (Event.COMPLETE, "finish succeeded (last step)", finish(StepOutcome.SUCCEEDED), True),
    (Event.FAIL, "finish failed", finish(StepOutcome.FAILED), True),
    (Event.FAIL, "fail", lambda store, t: store.fail(t.job_id, 1, "why"), False),
    (Event.FAIL, "fail lost", fail_lost, False),
    (Event.CANCEL, "finish revoked", finish(StepOutcome.REVOKED), True),
    (Event.CANCEL, "cancel", lambda store, t: store.cancel(t.job_id, 1, "why"), False),
    (Event.LOSE, "lose", lose, True),
    (Event.RESTART, "restart", restart, False),
    (Event.RETRY, "retry", retry, True),
]
# finish's own success is "the execution was current", so its refusals show in the state only.
REPORTS_REFUSAL = {"claim", "fail", "fail lost", "cancel", "lose", "restart", "retry"}


def test_every_event_of_the_table_is_tried():
    assert {event for event, *_ in ACTIONS} == set(Event) == set(TRANSITIONS)


@pytest.mark.parametrize(("action", "state"),
                         list(itertools.product(ACTIONS, JobState)),
                         ids=lambda value: value[1] if isinstance(value, tuple) else str(value))
def test_each_transition_is_applied_if_allowed_and_refused_otherwise(
    store: JobStore, action: tuple, state: JobState
):
    event, name, act, leased = action
    token = new_job(store, state, leased)
    before = store.get(token.job_id)
    applied = act(store, token)
    after = store.get(token.job_id)
    target = TRANSITIONS[event].target
    if allowed(event, state):
        assert applied
        assert after.state == (target or state)
        if event in (Event.LOSE, Event.RETRY):
            assert after.dispatch == before.dispatch + 1
        if event == Event.RESTART:
            assert (after.attempt, after.dispatch, after.end_ms) == (2, 2, None)
    else:
        if name in REPORTS_REFUSAL:
            assert not applied
        assert after.state == state
        assert (after.attempt, after.dispatch) == (before.attempt, before.dispatch)


def test_a_stale_token_is_refused_whatever_the_state(store: JobStore):
    token = new_job(store, JobState.WAITING)
    store.redis.hset(store.keys.job(token.job_id), "dispatch", 2)  # re-dispatched meanwhile
    status, _, _ = store.claim(token, OWNER, "node@host", LEASE_MS)
    assert status == ClaimStatus.SUPERSEDED
    assert not store.cancel(token.job_id, 2, "wrong attempt")
    assert store.get(token.job_id).state == JobState.WAITING


def test_a_running_step_learns_it_was_stopped_or_superseded(store: JobStore):
    token = new_job(store, JobState.WAITING)
    assert claim(store, token)
    assert store.renew(token, OWNER, LEASE_MS) is None
    assert store.renew(token, "someone else", LEASE_MS) == FailureKind.SUPERSEDED
    assert store.cancel(token.job_id, 1, "stopped")
    assert store.renew(token, OWNER, LEASE_MS) == FailureKind.STOPPED


def test_a_live_lease_keeps_a_second_execution_out(store: JobStore):
    token = new_job(store, JobState.WAITING)
    assert claim(store, token)
    status, detail, _ = store.claim(token, "task/other@host/2", "other@host", LEASE_MS)
    assert status == ClaimStatus.DUPLICATE and OWNER in detail
    assert store.lose(token.job_id, 3, LEASE_MS, "test") is None  # the lease is live


def test_every_script_states_its_keys_and_arguments():
    folder = Path(__file__).resolve().parents[1] / "celeryfarm" / "records" / "lua"
    for name in NAMES:
        header = (folder / f"{name}.lua").read_text().split("\nlocal", 1)[0]
        assert "KEYS[1]" in header and "ARGV[1]" in header, name
        assert "Returns" in header, name
        assert "is_one_of" in source(name)  # common.lua is put in front


def test_a_step_awaits_a_node_from_its_sending_until_a_node_claims_it(store: JobStore):
    """The reapers look for the messages of the steps that await a node too long, so a step
    awaits one from its sending (or its previous step's success) to its claim, and a job
    that ended awaits nothing."""
    spec = JobSpec.build(name="t", commands=["true", "true"], settings={"pool": "p"})
    job_id = uuid.uuid4().hex
    store.create(JobRecord(job_id=job_id, spec=spec, log_path=f"{job_id}/render.log",
                           state=JobState.WAITING, submitted_ms=1))
    first, second = Token(job_id, 1, 1, 0), Token(job_id, 1, 1, 1)

    def awaiting() -> list[tuple[Token, str]]:
        return [(token, queue) for token, queue in store.awaiting(age_ms=0)
                if token.job_id == job_id]

    assert awaiting() == []  # recorded, not yet sent: the inbox covers it
    store.sent(job_id, 1, ["a", "b"])
    assert awaiting() == [(first, "p")] and job_id not in store.stale_outbox(age_ms=0)
    assert job_id not in {token.job_id for token, _ in store.awaiting(age_ms=60_000)}
    assert claim(store, first)
    assert awaiting() == []
    assert store.finish(first, OWNER, StepOutcome.SUCCEEDED)
    assert awaiting() == [(second, "p")]  # Celery sends it once the task returns
    assert store.cancel(job_id, 1, "stopped")
    assert awaiting() == []
    assert store.redis.zscore(store.keys.awaiting, job_id) is None  # forgotten


def test_nodes_take_a_clients_jobs_from_the_inbox_into_the_shared_sets(store: JobStore):
    """A client writes only its job's record, its own index and the inbox; a node indexes
    the job for everyone, and makes its step await a node once the client has sent it, or
    puts it in the outbox if the client never did (it died)."""
    spec = JobSpec.build(name="t", commands=["true"], settings={"pool": "p"}, user="ann",
                         session="ann-s")
    sent, unsent = (f"ann.{uuid.uuid4().hex}" for _ in range(2))
    for job_id in (sent, unsent):
        store.create(JobRecord(job_id=job_id, spec=spec, log_path=f"{job_id}/render.log",
                               state=JobState.WAITING, submitted_ms=int(time.time() * 1000)))
    ours = {sent, unsent}

    def adopt(age_ms: int) -> dict[str, str]:
        return {job_id: done for job_id, done in store.adopt(age_ms) if job_id in ours}

    assert not ours & set(store.ids()) and set(store.ids("user", "ann")) == ours
    store.sent(sent, 1, [f"{sent}-1.1-0"], by_node=False)
    assert store.redis.zscore(store.keys.awaiting, sent) is None  # a client's send
    assert adopt(60_000) == {sent: "sent", unsent: "unsent"}
    assert ours <= set(store.ids()) and set(store.ids("session", "ann-s")) == ours
    assert store.redis.zscore(store.keys.awaiting, sent) is not None
    assert ours & set(store.redis.lrange(store.keys.inbox, 0, -1)) == {unsent}
    assert adopt(0) == {unsent: "stale"}
    assert unsent in store.stale_outbox(age_ms=0)
    assert not ours & set(store.redis.lrange(store.keys.inbox, 0, -1))


def test_a_step_lost_too_often_is_held_until_the_job_fails(store: JobStore):
    """The reaper that finds a step lost once too often holds it, writes the render log,
    and only then fails the job: until then the job is as it was, and no one else takes the
    step; if that reaper dies, its hold expires and the next reaper loses the step again."""
    token = new_job(store, JobState.RUNNING, leased=True)
    store.redis.hset(store.keys.job(token.job_id), "lost", 2)
    loss = store.lose(token.job_id, max_losses=3, hold_ms=LEASE_MS, cause="test")
    assert loss is not None and loss.outcome == LossOutcome.FAILING
    assert (loss.hold, loss.lost, loss.attempt) == (f"failing:{OWNER}", 3, 1)
    assert store.state(token.job_id) == JobState.RUNNING and store.events(token.job_id) == []
    assert store.lose(token.job_id, 3, LEASE_MS, "test") is None  # held
    assert store.claim(token, "task/other@host/2", "other@host", LEASE_MS)[0] == \
        ClaimStatus.DUPLICATE
    assert store.rescue(token, 3, LEASE_MS, "test").outcome == LossOutcome.LEASED
    store.redis.zadd(store.keys.leases, {token.job_id: 0})  # the reaper died: it expires
    again = store.lose(token.job_id, max_losses=3, hold_ms=LEASE_MS, cause="test")
    assert again == loss  # the same loss, not a fourth
    assert store.fail_lost(again, "lost on 3 nodes")
    record = store.get(token.job_id)
    assert (record.state, record.reason, record.lost) == (JobState.FAILED, "lost on 3 nodes", 3)
    assert [(e["event"], e["owner"], e["lost"]) for e in store.events(token.job_id)] == [
        ("lost", OWNER, 3)]
    assert store.redis.zscore(store.keys.leases, token.job_id) is None
    assert not store.fail_lost(again, "twice")  # the hold is gone


def test_a_hold_on_a_job_restarted_meanwhile_does_not_fail_it(store: JobStore):
    token = new_job(store, JobState.RUNNING, leased=True)
    loss = store.lose(token.job_id, max_losses=1, hold_ms=LEASE_MS, cause="test")
    assert loss is not None and loss.outcome == LossOutcome.FAILING
    assert store.cancel(token.job_id, 1, "stopped")
    assert restart(store, token)
    assert not store.fail_lost(loss, "lost")
    assert store.state(token.job_id) == JobState.WAITING
    assert store.get_field(token.job_id, "lease_owner") is None  # the hold is released


def test_a_retry_counts_its_try_and_is_sent_once_when_due(store: JobStore):
    token = new_job(store, JobState.WAITING)
    assert claim(store, token)
    assert store.retry(token, OWNER, delay_ms=0, counted=False, why="no licence") == 1
    record = store.get(token.job_id)
    assert (record.failures, record.licence_waits, record.next_step) == (0, 1, 0)
    assert token.job_id in store.due()
    assert token.job_id not in store.due()  # taken once
    assert token.job_id in store.stale_outbox(age_ms=0)  # the outbox covers its sender
    assert store.retry(token, OWNER, delay_ms=0, counted=True, why="again") == 0  # stale


def test_the_history_is_compact_and_reads_back_as_it_was_written(store: JobStore):
    """A finished job's history is one string with what it runs and its executions, owners
    written without the job id; it reads back with every name and owner in full."""
    token = new_job(store, JobState.WAITING)
    owner = f"{token.job_id}-1.1-0/node@host/7"
    assert store.claim(token, owner, "node@host", LEASE_MS)[0] == ClaimStatus.OK
    assert store.finish(token, owner, StepOutcome.SUCCEEDED, last=True)
    assert store.redis.type(store.keys.events(token.job_id)) == "string"
    assert token.job_id not in store.redis.get(store.keys.events(token.job_id))
    start, end = store.events(token.job_id)
    assert (start["event"], start["owner"], start["node"], start["step"]) == (
        "start", owner, "node@host", 0)
    assert (end["event"], end["owner"], end["outcome"]) == ("end", owner, "succeeded")
    assert store.get(token.job_id).spec.commands == (("true",),)
    assert store.redis.object("encoding", store.keys.job(token.job_id)) == "listpack"


def test_a_record_written_before_the_compact_layout_still_runs(store: JobStore):
    """An earlier celeryfarm's record (commands in the hash, events in a list) is read,
    claimed and finished as it is."""
    job_id = uuid.uuid4().hex
    store.redis.hset(store.keys.job(job_id), mapping={
        "name": "old", "commands": '[["true"]]', "environment": '{"A": "1"}', "state": "Waiting",
        "attempt": "1", "dispatch": "1", "next_step": "0", "task_ids": "[]", "submitted": "1",
        "log": f"{job_id}/render.log", "lost": "0", "failures": "0", "priority": "50"})
    store.redis.rpush(store.keys.events(job_id), '{"event": "lost", "owner": "x", "lost": 1}')
    token = Token(job_id, 1, 1, 0)
    forged = store.claim(token, OWNER, "node@host", LEASE_MS, 0, [["false"]])[0]
    assert forged == ClaimStatus.FORGED  # its commands are read from the hash
    status, _, record = store.claim(token, OWNER, "node@host", LEASE_MS, 0, [["true"]])
    assert status == ClaimStatus.OK
    assert (record.spec.commands, record.spec.environment) == ((("true",),), {"A": "1"})
    assert store.finish(token, OWNER, StepOutcome.SUCCEEDED, last=True)
    assert [e["event"] for e in store.events(job_id)] == ["lost", "start", "end"]
    assert store.get(job_id).state == JobState.COMPLETED


@pytest.mark.parametrize("commands, why", [
    ([["touch", "x"], ["b"]], "its command is not the job record's"),
    ([["a"]], "it does not carry the job's remaining steps"),
    ([["a"], ["c"]], "its chain's step 2 is not the job's"),
    ([["a"], ["b"], ["c"]], "it does not carry the job's remaining steps"),
])
def test_a_claim_whose_message_is_not_the_farms_changes_nothing(store: JobStore, commands,
                                                                  why):
    """The claim compares a step message's commands (its own, then its chain's) with the
    record's before it writes anything, in both layouts (history and older hash)."""
    spec = JobSpec.build(name="t", commands=[["a"], ["b"]])
    job_id = f"ann.{uuid.uuid4().hex}"
    store.create(JobRecord(job_id=job_id, spec=spec, log_path=f"{job_id}/render.log",
                           state=JobState.WAITING, submitted_ms=1), dispatching=False)
    token = Token(job_id, 1, 1, 0)
    before = store.redis.hgetall(store.keys.job(job_id))
    status, detail, record = store.claim(token, OWNER, "node@host", LEASE_MS, 0, commands)
    assert (status, record) == (ClaimStatus.FORGED, None) and detail.startswith(why)
    assert store.redis.hgetall(store.keys.job(job_id)) == before
    assert store.events(job_id) == [] and store.redis.zscore(store.keys.leases, job_id) is None
    status, _, record = store.claim(token, OWNER, "node@host", LEASE_MS, 0, [["a"], ["b"]])
    assert status == ClaimStatus.OK and record.spec.commands == (("a",), ("b",))


def test_a_finished_job_keeps_a_compact_record(store: JobStore):
    """A lease owner is longer than the values Redis keeps a hash compact for; the end of
    the step gives the record its compact encoding back."""
    token = new_job(store, JobState.WAITING)
    owner = f"{token.job_id}-1.1-0/a-long-node-name@render-host-042.studio/123456"
    assert store.claim(token, owner, "node@host", LEASE_MS)[0] == ClaimStatus.OK
    assert store.redis.object("encoding", store.keys.job(token.job_id)) == "hashtable"
    assert store.finish(token, owner, StepOutcome.SUCCEEDED, last=True)
    assert store.redis.object("encoding", store.keys.job(token.job_id)) == "listpack"
    assert store.get(token.job_id).state == JobState.COMPLETED
