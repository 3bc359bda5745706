"""Task events only while someone watches: a render node sends none until asked (Flower's
``enable_events``, every 5 s while Flower runs), and turns them off again once nobody has
asked for ``CELERYFARM_EVENTS_IDLE_SECONDS`` (Flower stopped), so a farm Flower once watched
does not pay for them forever. Seen by a real event receiver on the real broker."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from celery import Celery

from celeryfarm.config import Settings
from celeryfarm.farm import Farm
from celeryfarm.testing.cluster import LocalCluster

from .conftest import WORKER_ENV, running
from .helpers import submit, wait_until

NODE = "watched"
IDLE_SECONDS = 3


class TaskEvents:
    """Every task event the farm's nodes publish while this receiver runs."""

    def __init__(self, app: Celery) -> None:
        self.seen: list[dict] = []
        self.connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self.connection, handlers={"*": self.seen.append})
        self.thread = threading.Thread(target=self.receiver.capture, daemon=True,
                                       kwargs={"limit": None, "timeout": None, "wakeup": True})

    def __enter__(self) -> TaskEvents:
        self.thread.start()
        # The wake-up makes every node send a heartbeat event: once one is here, the
        # receiver's queue is bound and no later event is missed.
        wait_until(lambda: any(e["type"] == "worker-heartbeat" for e in self.seen), 30,
                   "a node's heartbeat event")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.connection.release()

    def of(self, job_id: str) -> list[str]:
        """The types of the task events of the job's steps."""
        return [e["type"] for e in self.seen
                if e["type"].startswith("task-") and e.get("uuid", "").startswith(job_id)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One render node that turns events off after ``IDLE_SECONDS`` without an ask."""
    env = {**WORKER_ENV, "CELERYFARM_EVENTS_IDLE_SECONDS": str(IDLE_SECONDS)}
    with running(LocalCluster(tmp_path_factory.mktemp("events"), extra_env=env),
                 [NODE]) as farm:
        yield farm


def finished(farm: Farm, job_id: str) -> bool:
    return farm.state(job_id) == "Completed"


def test_task_events_only_while_someone_asks_for_them(cluster: LocalCluster):
    farm = Farm(Settings.from_env(cluster.env))
    with TaskEvents(farm.app) as events:
        quiet, _ = submit(farm, [["true"]])
        wait_until(lambda: finished(farm, quiet), 30, "the first job")
        assert events.of(quiet) == []  # nobody asked: no events

        asking = threading.Event()

        def ask_like_flower() -> None:
            while not asking.wait(1):
                farm.app.control.enable_events()

        farm.app.control.enable_events()
        flower = threading.Thread(target=ask_like_flower, daemon=True)
        flower.start()
        try:
            watched, _ = submit(farm, [["true"]])
            wait_until(lambda: "task-succeeded" in events.of(watched), 30,
                       "the watched job's task events")
            assert {"task-received", "task-started"} <= set(events.of(watched))
        finally:
            asking.set()
            flower.join(10)

        node_log = cluster.base / f"worker-{NODE}.log"
        wait_until(lambda: "Task events off" in node_log.read_text(), 10 * IDLE_SECONDS,
                   "the node to turn task events off")
        after, _ = submit(farm, [["true"]])
        wait_until(lambda: finished(farm, after), 30, "the job after")
        assert events.of(after) == []  # nobody has asked since: no events again
