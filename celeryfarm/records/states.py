"""The job state machine: states, what happens to a step, and which state may go to which.

Katana sees a job's state (its ``Job.State`` strings); the nodes and the reaper see more:
how a claim went, how a step ended, why a running step must stop. Each is an enum here, and
:data:`TRANSITIONS` says which state a job may leave, on which event, for which state. The
Lua scripts take their states from this table (as arguments), so a state name is written
once, here.
"""

from __future__ import annotations

import dataclasses
from enum import Enum


class _Text(str, Enum):
    """A string enum that prints and formats as its value (``enum.StrEnum`` is 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class JobState(_Text):
    """A job's state; the values are Katana's ``Job.State`` strings."""

    WAITING = "Waiting"
    RUNNING = "Running"
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"
    FAILED = "Failed"


#: States in which a job's steps may still run.
ACTIVE = (JobState.WAITING, JobState.RUNNING)
#: States a job ends in; only a restart leaves them.
FINISHED = (JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED)


class StepOutcome(_Text):
    """How one execution of a step ended, as its node records it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # the job was stopped through the farm
    REVOKED = "revoked"  # a step was revoked outside the farm (Flower)
    ABANDONED = "abandoned"  # given up for another node (lost lease, cold shutdown)


class ClaimStatus(_Text):
    """The answer to a step's claim (``claim.lua``): run it, or why not."""

    OK = "ok"
    GONE = "gone"  # the record no longer exists
    SUPERSEDED = "superseded"  # the job was restarted or the step re-dispatched
    FINISHED = "finished"  # the job has ended
    DONE = "done"  # the step already ran
    DUPLICATE = "duplicate"  # another execution holds a live lease on it
    LIMITED = "limited"  # one of the job's limits is in full use: sent again later
    FORGED = "forged"  # the message's commands are not the record's: dropped


class FailureKind(_Text):
    """Why a running step must stop (``renew.lua`` says the first two)."""

    STOPPED = "stopped"  # the job was stopped: the step stays current
    SUPERSEDED = "superseded"  # the step was given to another node
    LAPSED = "lapsed"  # the lease could not be renewed in time


class LossOutcome(_Text):
    """What became of a lost step (``lose.lua``)."""

    REDISPATCHED = "redispatched"
    FAILING = "failing"  # lost too often: the job fails once the log says why (fail_lost.lua)
    STALE = "stale"  # the lost message's token is no longer current: nothing to do
    LEASED = "leased"  # the step runs after all: nothing to do


class Event(_Text):
    """What makes a job change state."""

    CLAIM = "claim"  # a node starts a step
    COMPLETE = "complete"  # the last step succeeded
    FAIL = "fail"  # a step failed, or was lost on too many nodes
    CANCEL = "cancel"  # stopped through the farm, or revoked outside it
    LOSE = "lose"  # the running step's node was lost: the step is sent again
    RESTART = "restart"  # a finished job runs again as a new attempt
    RETRY = "retry"  # a step failed and runs again later (see celeryfarm.retries)


@dataclasses.dataclass(frozen=True)
class Transition:
    """On ``event``, a job in one of ``sources`` goes to ``target`` (None: stays as it is)."""

    sources: tuple[JobState, ...]
    target: JobState | None


TRANSITIONS: dict[Event, Transition] = {
    Event.CLAIM: Transition(ACTIVE, JobState.RUNNING),
    Event.COMPLETE: Transition(ACTIVE, JobState.COMPLETED),
    Event.FAIL: Transition(ACTIVE, JobState.FAILED),
    Event.CANCEL: Transition(ACTIVE, JobState.CANCELLED),
    Event.LOSE: Transition(ACTIVE, None),
    Event.RESTART: Transition(FINISHED, JobState.WAITING),
    Event.RETRY: Transition(ACTIVE, JobState.WAITING),
}


def allowed(event: Event, state: JobState) -> bool:
    """Whether a job in ``state`` may take ``event``."""
    return state in TRANSITIONS[event].sources


def sources_arg(event: Event) -> str:
    """The states ``event`` may leave, as the comma-separated ARGV the scripts take."""
    return ",".join(TRANSITIONS[event].sources)
