"""getJobs filters, batched reads, and history that outlives Celery's results."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import redis
from redis.client import Pipeline

from celeryfarm.farm import Farm
from celeryfarm.farmapi import FarmPluginException, Job
from celeryfarm.jobs import Listed
from celeryfarm.listing import Listing
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.records import fields
from celeryfarm.records.states import JobState
from celeryfarm.records.store import BATCH, JobStore

from .helpers import renderboot, submit, wait_for_state, wait_until

State = Job.State


def test_a_snapshot_reads_back_as_written_and_a_bad_line_spoils_it():
    """The snapshot's lines hold the listing fields in the order records are read in
    (one owner of it: ``encode_listed_values``); a line with a value too many or too few,
    or a value no record holds, makes the whole snapshot unusable rather than misread."""
    jobs = [Listed("ann-1", "Render_a", "ann", "ws1", "s1", "Preview", JobState.RUNNING, 2,
                   1000, None, "ctx1/render.log", '["t1"]'),
            Listed("ann-2", "Render_b", "ann", "ws1", "s2", "Disk", JobState.FAILED, 1,
                   900, 1200, "ann-2/render.log", "[]")]
    text = fields.encode_snapshot(7, jobs)
    assert fields.decode_snapshot(text) == (7, jobs)
    assert fields.decode_snapshot("v1 7") == (7, [])
    first, second = text.split("\n")[1:]
    for spoilt in (second + fields.LISTING_SEP, second.rpartition(fields.LISTING_SEP)[0],
                   second.replace("Failed", "Exploded"), second.replace("ann-2/", "/etc/")):
        assert fields.decode_snapshot(f"v1 7\n{first}\n{spoilt}") is None, spoilt
    assert fields.encode_snapshot(7, [dataclasses.replace(jobs[0], name="a\nb")]) is None


def test_filters_select_and_and_together(plugin: CeleryFarmPlugin, monkeypatch):
    done, _ = submit(plugin.farm, [["true"]], name="Render_beauty")
    failed, _ = submit(plugin.farm, [["false"]], name="Render_shadow", render_type="Preview")
    wait_for_state(plugin, done), wait_for_state(plugin, failed)

    artist = plugin.farm.settings.user

    def ids(filters):
        """This artist's jobs matching ``filters`` (other tests' jobs share the farm)."""
        filters = [filters] if isinstance(filters, dict) else filters
        return {job.jobId for job in plugin.getJobs([{"user": artist}, *filters])}

    assert {job.jobId for job in plugin.getJobs(None)} == {done, failed}
    assert ids({"state": State.kFailed}) == {failed}
    assert ids({"state": [State.kFailed, State.kCompleted]}) == {done, failed}
    assert ids({"name": "beauty"}) == {done}
    assert ids({"renderType": "Preview"}) == {failed}
    assert ids({"session": plugin.session}) == {done, failed}
    assert ids({"session": "another-session"}) == set()
    assert ids([{"name": "Render"}, {"renderType": ["Disk", "Preview"]}]) == {done, failed}
    assert {job.jobId for job in plugin.getJobs({"state": State.kFailed})} >= {failed}
    assert ids([{"name": "beauty"}, {"state": State.kFailed}]) == set()
    assert ids([{"state": State.kFailed}, {"state": State.kCompleted}]) == set()

    monkeypatch.setenv("CELERYFARM_USER", "someone-else")
    other_user = CeleryFarmPlugin()
    assert {job.jobId for job in other_user.getJobs(None)}.isdisjoint({done, failed})
    assert {job.jobId for job in other_user.getJobs({"user": artist})} == {done, failed}

    with pytest.raises(FarmPluginException, match="unknown job filter"):
        plugin.getJobs({"colour": "red"})


def test_get_jobs_reads_records_in_batches(plugin: CeleryFarmPlugin, monkeypatch):
    """Katana polls getJobs: a farm with a long history must not cost a round trip a job."""
    farm = plugin.farm
    pending = [submit(plugin.farm, [["true"]], settings={"pool": "parked"})[0]
               for _ in range(3)]
    # Fill the history straight through the store: many finished jobs.
    template = farm.get(pending[0])
    for _ in range(2 * BATCH + 5):
        template.job_id, template.state = f"history-{uuid.uuid4().hex}", State.kCompleted
        farm.store.create(template)

    round_trips = []
    real_execute = Pipeline.execute
    monkeypatch.setattr(Pipeline, "execute",
                        lambda self, *a, **k: round_trips.append(1) or real_execute(self, *a, **k))
    jobs = plugin.getJobs(None)
    assert len(jobs) == 2 * BATCH + 5 + 3
    assert len(round_trips) <= 3 + 1  # ceil(jobs / BATCH) pipelines
    assert sum(job.state == State.kWaiting for job in jobs) == 3
    for job_id in pending:
        plugin.stopJob(job_id)


def test_a_finished_job_keeps_its_state_after_celery_results_expire(plugin: CeleryFarmPlugin):
    completed, _ = submit(plugin.farm, [renderboot("--seconds", 0.1)])
    failed, _ = submit(plugin.farm, [["false"], ["true"]])
    assert wait_for_state(plugin, completed) == State.kCompleted
    assert wait_for_state(plugin, failed) == State.kFailed
    backend = plugin.farm.app.backend
    for job_id in (completed, failed):
        for task_id in plugin.farm.get(job_id).task_ids:
            backend.client.delete(backend.get_key_for_task(task_id))
    assert plugin.getJobState(completed) == State.kCompleted
    assert plugin.getJobState(failed) == State.kFailed


def round_trips(monkeypatch) -> list[str]:
    """A list that gets an entry for each round trip to Redis this process makes from now
    on (a command, or a pipeline of them)."""
    sent: list[str] = []
    real_command, real_execute = redis.Redis.execute_command, Pipeline.execute

    def command(self, *args, **options):
        sent.append(str(args[0]))
        return real_command(self, *args, **options)

    def execute(self, *args, **options):
        sent.append(f"pipeline of {len(self.command_stack)}")
        return real_execute(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", command)
    monkeypatch.setattr(Pipeline, "execute", execute)
    return sent


def listed(plugin: CeleryFarmPlugin) -> dict[str, tuple[str, int, int]]:
    return {job.jobId: (job.state, job.startTime, job.endTime)
            for job in plugin.getJobs(None)}


def test_get_jobs_keeps_up_with_every_change_and_costs_one_round_trip_when_none(
        plugin: CeleryFarmPlugin, monkeypatch):
    """Katana polls getJobs(None): the plug-in keeps this user's jobs and re-reads only what
    changed. Whatever happens to a job shows up on the next call, and the kept listing is
    what a fresh plug-in (which reads everything) lists."""

    def like_a_fresh_plugin() -> None:
        wait_until(lambda: listed(plugin) == listed(CeleryFarmPlugin()), 30,
                   "the kept listing to be a fresh plug-in's")

    done, _ = submit(plugin.farm, [["true"]])
    assert wait_for_state(plugin, done) == State.kCompleted
    assert listed(plugin)[done][0] == State.kCompleted

    long, _ = submit(plugin.farm, [renderboot("--seconds", 60)])  # a new job
    assert long in listed(plugin)
    assert wait_for_state(plugin, long, State.kRunning) == State.kRunning  # a state change
    assert listed(plugin)[long][0] in (State.kRunning, State.kCompleted)
    plugin.stopJob(long)
    assert listed(plugin)[long][0] == State.kCancelled
    like_a_fresh_plugin()

    before = listed(plugin)[done]
    plugin.startJob(done)  # a restart changes a finished job
    assert listed(plugin)[done][1] > before[1]
    assert wait_for_state(plugin, done) == State.kCompleted
    assert listed(plugin)[done][0] == State.kCompleted
    like_a_fresh_plugin()

    other_user = dataclasses.replace(plugin.farm.settings, user=f"other-{uuid.uuid4().hex[:6]}")
    other_farm = Farm(other_user)
    others, _ = submit(other_farm, [["true"]])  # another user's job
    assert others not in listed(plugin)
    wait_until(lambda: other_farm.state(others) == State.kCompleted, 30, "the other job")

    unchanged = listed(plugin)
    sent = round_trips(monkeypatch)
    assert listed(plugin) == unchanged
    # The change feed, and nothing of this user's; other users' jobs that changed meanwhile
    # (other tests') cost one look-up in this user's index.
    assert [what for what in sent if what != "ZMSCORE"] == ["pipeline of 3"], sent


def full_read(farm: Farm) -> dict[str, tuple[str, int, int]]:
    """What reading every record of this user's lists (no snapshot, no change feed), as
    Katana's ``Job`` shows it: an end for Completed jobs only."""
    return {job.job_id: (job.state.value, job.submitted_ms,
                         (job.end_ms or 0) if job.state == JobState.COMPLETED else 0)
            for job in Listing(farm.store, farm.user).jobs()}


def records_read(monkeypatch) -> list[str]:
    """A list that gets the id of each job whose record a listing reads from now on."""
    read: list[str] = []
    real = JobStore.listed

    def spy(self, jobs):
        read.extend(jobs)
        return real(self, jobs)

    monkeypatch.setattr(JobStore, "listed", spy)
    return read


def test_a_new_session_starts_from_the_snapshot_and_reads_only_what_changed_since(
        plugin: CeleryFarmPlugin, monkeypatch):
    """A new Katana session (a fresh plug-in) reads the user's listing snapshot, written by
    the last listing read afresh, and then only the records changed since: a stop, a new
    job. It lists what reading every record lists. Another user listing this user's jobs
    neither reads nor writes the snapshot."""
    farm = plugin.farm
    snapshot = farm.store.keys.snapshot(farm.user)
    done, _ = submit(farm, [["true"]])
    parked = [submit(farm, [["true"]], settings={"pool": "parked"})[0] for _ in range(3)]
    assert wait_for_state(plugin, done) == State.kCompleted

    monkeypatch.setenv("CELERYFARM_USER", f"wrangler-{uuid.uuid4().hex[:6]}")
    assert set(listed(CeleryFarmPlugin())) == set()
    assert {job.jobId for job in CeleryFarmPlugin().getJobs({"user": farm.user})} == {
        done, *parked}
    assert not farm.store.redis.exists(snapshot)
    monkeypatch.setenv("CELERYFARM_USER", farm.user)

    assert set(listed(CeleryFarmPlugin())) == {done, *parked}  # read afresh: written
    assert farm.store.redis.exists(snapshot)
    plugin.stopJob(parked[0])  # changes since the snapshot
    newer, _ = submit(farm, [["true"]], settings={"pool": "parked"})

    with monkeypatch.context() as patch:
        read = records_read(patch)
        session = listed(CeleryFarmPlugin())
    assert session == full_read(farm)
    assert session[parked[0]][0] == State.kCancelled and newer in session
    assert parked[0] in read and newer in read
    assert done not in read  # it did not change: the snapshot had it
    for job_id in [*parked[1:], newer]:
        plugin.stopJob(job_id)


def test_a_snapshot_that_cannot_be_used_means_a_full_read(plugin: CeleryFarmPlugin,
                                                          monkeypatch):
    """A snapshot older than the change feed reaches back (trimmed), or one that does not
    decode, is passed over: the new session reads every record and lists the truth."""
    farm = plugin.farm
    jobs = [submit(farm, [["true"]], settings={"pool": "parked"})[0] for _ in range(3)]
    assert set(listed(CeleryFarmPlugin())) == set(jobs)  # the snapshot written
    plugin.stopJob(jobs[0])
    farm.store.trim_changes(farm.user, keep=1)  # the feed no longer reaches back to it
    with monkeypatch.context() as patch:
        read = records_read(patch)
        assert listed(CeleryFarmPlugin()) == full_read(farm)
    assert set(jobs) <= set(read)

    plugin.stopJob(jobs[1])
    farm.store.redis.set(farm.store.keys.snapshot(farm.user), "v1 12\nnot a job")
    with monkeypatch.context() as patch:
        read = records_read(patch)
        session = listed(CeleryFarmPlugin())
    assert session == full_read(farm) and set(jobs) <= set(read)
    assert session[jobs[1]][0] == State.kCancelled
    plugin.stopJob(jobs[2])


def test_a_step_revoked_outside_the_farm_shows_cancelled_at_once_everywhere(
        plugin: CeleryFarmPlugin):
    """A step revoked from Flower, with no node to record it (its pool has none): the next
    getJobs, getJobState and ``celeryfarm jobs`` each show the job Cancelled, and the record
    keeps it. The listing reads the changed record again rather than patching the one it
    holds, so getJobs makes a new ``Job`` for that job only."""
    farm = plugin.farm
    revoked, waiting, also = (submit(farm, [["true"]], settings={"pool": "parked"})[0]
                              for _ in range(3))
    before = {job.jobId: job for job in plugin.getJobs(None)}
    assert before[revoked].state == State.kWaiting
    farm.app.backend.mark_as_revoked(farm.get(revoked).task_ids[0])  # Flower's revoke

    after = {job.jobId: job for job in plugin.getJobs(None)}
    assert after[revoked].state == State.kCancelled and after[revoked].endTime == 0
    assert after[revoked] is not before[revoked] and after[waiting] is before[waiting]
    assert plugin.getJobState(revoked) == State.kCancelled
    assert [record.state for record in farm.jobs([{"state": "Cancelled"}])
            if record.job_id == revoked] == [JobState.CANCELLED]
    record = farm.store.get(revoked)
    assert record.state == JobState.CANCELLED and "outside celeryfarm" in record.reason
    assert record.end_ms  # the record keeps the end Katana's Job leaves out
    assert record.end_ms  # the farm keeps the end Katana's "Completed" column leaves empty
    assert listed(CeleryFarmPlugin())[revoked][0] == State.kCancelled  # a new session too
    # A listing of every user's jobs (no user filter) reads them again too.
    farm.app.backend.mark_as_revoked(farm.get(also).task_ids[0])
    found = [job.state for job in plugin.getJobs({"session": plugin.session})
             if job.jobId == also]
    assert found == [State.kCancelled]
    plugin.stopJob(waiting)  # no waiting job left for the other tests' farm-wide listings
