"""Retries and failure rules: what the farm does when a step's command fails.

A step whose command exits non-zero (or dies of a signal: a crashed renderer) runs again,
up to the job's ``retries`` times, ``retryDelaySeconds`` later. Before counting a try, its
output is read for *failure rules*: regular expressions matched against each line, from the
farm (``CELERYFARM_LICENCE_PATTERN``, ``CELERYFARM_FATAL_PATTERN``) and from the job
(``licencePattern``, ``fatalPattern``):

* ``fatal``: the step cannot succeed by running again (a missing scene, a bad argument), so
  the job fails at once, retries left or not;
* ``licence``: the renderer found no free licence; the step backs off for
  ``CELERYFARM_LICENCE_BACKOFF_SECONDS`` and runs again without using a retry.

Fatal wins when both match. A step the farm killed (a stop, ``maxStepSeconds``, a stall,
the memory cap) or that could not start is not retried. Node losses are counted apart (see
:mod:`celeryfarm.reaper`). The re-dispatch itself is a state change of the record
(``JobStore.retry``); the node's reaper sends it when it is due.

**Bad nodes**: each try that uses a retry counts against the node it ran on. A node on which
a job's steps failed :data:`BAD_NODE_FAILURES` times hands that job's steps on when it claims
one, as long as another live node that is not bad for the job serves the pool
(``JobStore.avoid``; nodes say they are live in every reaper pass). With no such node it
runs the step itself, so a job is never stuck on a pool of bad nodes.
"""

from __future__ import annotations

import dataclasses
import re
from enum import Enum
from typing import TYPE_CHECKING

from .errors import FarmError

if TYPE_CHECKING:  # the Katana plug-in validates patterns without the node's modules
    from .process import Outcome


class FailureKind(str, Enum):
    """What a failed try's output says about it."""

    PLAIN = "plain"  # retried while retries are left
    LICENCE = "licence"  # backed off and retried, no retry used
    FATAL = "fatal"  # never retried


#: Failed tries of a job on a node that make the node bad for that job.
BAD_NODE_FAILURES = 2


def bad_nodes(bad: dict[str, int]) -> list[str]:
    """The nodes of a record's failure counts that are bad for the job."""
    return sorted(node for node, failures in bad.items() if failures >= BAD_NODE_FAILURES)


def compile_pattern(pattern: str, what: str) -> re.Pattern[bytes] | None:
    """A failure rule's regular expression (matched against output bytes), or None for "";
    a bad one is a :class:`FarmError` naming ``what``."""
    if not pattern:
        return None
    try:
        return re.compile(pattern.encode())
    except re.error as error:
        raise FarmError(f"{what}: invalid regular expression {pattern!r}: {error}") from None


@dataclasses.dataclass
class FailureRules:
    """The farm's and the job's patterns for each kind of failure."""

    licence: tuple[re.Pattern[bytes], ...] = ()
    fatal: tuple[re.Pattern[bytes], ...] = ()

    @classmethod
    def of(cls, farm: tuple[str, str], job: tuple[str, str]) -> FailureRules:
        """Rules from (licence, fatal) patterns of the farm and of the job."""
        farm_rules = [compile_pattern(p, w) for p, w in zip(farm, ("licence", "fatal"))]
        job_rules = [compile_pattern(p, w) for p, w in zip(job, ("licencePattern",
                                                                  "fatalPattern"))]
        return cls(
            licence=tuple(p for p in (farm_rules[0], job_rules[0]) if p is not None),
            fatal=tuple(p for p in (farm_rules[1], job_rules[1]) if p is not None),
        )


class OutputWatcher:
    """Passes a step's output on to ``sink`` and matches each complete line against the
    failure rules as it goes, so nothing needs keeping but the line being read."""

    def __init__(self, sink: object, rules: FailureRules) -> None:
        self.sink, self.rules = sink, rules
        self._partial = b""
        self.licence = self.fatal = False

    def write(self, data: bytes) -> None:
        self.sink.write(data)  # type: ignore[attr-defined]
        if not (self.rules.licence or self.rules.fatal):
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._match(line)
        if len(self._partial) > 64 * 1024:  # a line that never ends: match what there is
            self._match(self._partial)
            self._partial = b""

    def _match(self, line: bytes) -> None:
        self.fatal = self.fatal or any(p.search(line) for p in self.rules.fatal)
        self.licence = self.licence or any(p.search(line) for p in self.rules.licence)

    def kind(self) -> FailureKind:
        """What the output said, once the command has ended."""
        if self._partial:
            self._match(self._partial)
            self._partial = b""
        if self.fatal:
            return FailureKind.FATAL
        return FailureKind.LICENCE if self.licence else FailureKind.PLAIN


def retryable(outcome: Outcome) -> bool:
    """Whether a failed try may run again: it exited non-zero or died of a signal, and was
    neither stopped nor killed by the farm, nor unable to start."""
    return not (outcome.succeeded or outcome.stop_reason or outcome.limit
                or outcome.start_error)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What becomes of a failed try: ``delay`` seconds, then run again (using a retry when
    ``counted``), or, when ``delay`` is None, fail the job."""

    delay: float | None
    counted: bool = True
    why: str = ""


def decide(kind: FailureKind, failures: int, retries: int, retry_delay: float,
           licence_backoff: float) -> Decision:
    """The decision for a try whose output said ``kind``, after ``failures`` counted
    failures of this step (this one not included) and with ``retries`` allowed."""
    if kind == FailureKind.FATAL:
        return Decision(None, why="its output matched a fatal failure rule")
    if kind == FailureKind.LICENCE:
        return Decision(licence_backoff, counted=False,
                        why="its output matched a licence rule: backing off, no retry used")
    if failures < retries:
        return Decision(retry_delay, why=f"retry {failures + 1} of {retries}")
    return Decision(None, why=f"no retry left ({retries} allowed)" if retries else "")


def try_label(failures: int, retries: int) -> str:
    """``try 2 of 4``: which try of a step runs, for the log and ``status``."""
    return f"try {failures + 1} of {retries + 1}"
