"""Job records: the one owner of the job state machine.

* :mod:`~celeryfarm.records.states`: job states, step outcomes, claim statuses, failure
  kinds, and the transition table;
* :mod:`~celeryfarm.records.keys`: the Redis key layout;
* :mod:`~celeryfarm.records.fields`: the job hash's one encoder and decoder;
* ``lua/``: the scripts, each headed by its KEYS/ARGV layout, loaded by
  :mod:`~celeryfarm.records.scripts`;
* :mod:`~celeryfarm.records.store`: :class:`JobStore`, the only writer of a job hash.

Only the enums are imported here (``celeryfarm.jobs`` needs them); import the store from
:mod:`celeryfarm.records.store`.
"""

from .states import (
    ACTIVE,
    FINISHED,
    TRANSITIONS,
    ClaimStatus,
    Event,
    FailureKind,
    JobState,
    LossOutcome,
    StepOutcome,
)

__all__ = [
    "ACTIVE", "FINISHED", "TRANSITIONS", "ClaimStatus", "Event", "FailureKind", "JobState",
    "LossOutcome", "StepOutcome",
]
