"""celeryfarm's errors: one root, :class:`FarmError`, so a caller catches one family.

Each error's message is meant for a person: it says what is wrong and, where it can, what
to do. The Katana plug-in turns them into ``FarmPluginException`` (``JobNotFound`` into
``JobNotFoundException``); the command line prints them as one line.
"""

from __future__ import annotations


class FarmError(Exception):
    """Something the farm cannot do, with a message a person can act on."""


class JobNotFound(FarmError):
    """No job with this id exists on the farm."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class CorruptRecord(FarmError):
    """A job's stored record cannot be read (edited by hand, or written by other code)."""

    def __init__(self, job_id: str, problem: str) -> None:
        self.job_id = job_id
        super().__init__(f"the record of job {job_id} is corrupt ({problem}); an admin can "
                         f"inspect it in Redis")


class ConfigError(FarmError, ValueError):
    """A ``CELERYFARM_*`` variable holds a value that cannot be used."""


class RedisServerError(FarmError, RuntimeError):
    """redis-server is missing or did not start; the message says how to fix it."""


class LocalFarmError(FarmError):
    """The local farm (``celeryfarm up``) cannot start; the message says what to do."""


class StepFailed(FarmError):
    """A render step did not succeed; the message says why (also in the log and record)."""


class NotAllowed(FarmError):
    """Redis refused a change: the user's ACL role does not allow it (another artist's
    job, say)."""
