"""The render node's side: one Celery task that runs one step of a job.

A job is a chain of these tasks, one per command; the worker's
:class:`~celeryfarm.node.RenderNode` registers the task and gives it the node's store. A
step first claims its lease (see :mod:`celeryfarm.lease`): a stopped or restarted job's
leftover messages, a re-dispatched step's old message and a duplicate delivery all stop
there. It then runs its command through :mod:`celeryfarm.process`, frames its output in the
render log, and records the outcome, which counts only if its fencing token is still
current. The record, not Celery's result, is the job's truth.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

import redis
from celery import states
from celery.exceptions import Ignore

from . import admission, process, progress, renderenv, retries
from .celery import RENDER_STEP
from .config import Settings
from .dispatch import task_id as dispatch_task_id
from .errors import CorruptRecord, FarmError, StepFailed
from .jobs import JobRecord
from .lease import StepLease, lease_owner
from .paths import SharedRoot
from .records.states import ClaimStatus, FailureKind, StepOutcome
from .records.store import Token
from .renderlog import RenderLog, stamp

logger = logging.getLogger(__name__)
#: Sent to a pool process when its worker's main process dies. Not SIGTERM: billiard's
#: handler for that leaves an idle pool process blocked on a pipe no one reads, for ever.
PARENT_DIED = signal.SIGRTMIN + 2
#: Sent by a step's lease thread to its own process when the step must stop (a stop
#: request, another node given the step): it wakes the render loop at once instead of at its
#: next poll. Ignored by default, so one that arrives outside a step does nothing.
WAKE = signal.SIGWINCH
#: How long a pool process that got SIGTERM looks for its task's REVOKED state (see
#: :func:`_revoked`) before taking it for a shutdown's.
REVOKE_WAIT_SECONDS = 3.0


def _wake() -> None:
    os.kill(os.getpid(), WAKE)


def render_environment(record: JobRecord, folders: dict[str, str], settings: Settings,
                       user: renderenv.RenderUser | None) -> dict[str, str]:
    """The job's environment, the node's allowed variables, and the step's own ``folders``
    and ids; nothing else of the node's (see :mod:`celeryfarm.renderenv`)."""
    farm = {**folders, "CELERYFARM_JOB_ID": record.job_id,
            "CELERYFARM_ATTEMPT": str(record.attempt)}
    if user is not None:
        farm.update(USER=user.name, LOGNAME=user.name)
    return renderenv.environment(record.spec.environment, _node_variables(settings.render_env),
                                 settings.render_env, farm)


@functools.cache
def _node_variables(also_allowed: tuple[str, ...]) -> dict[str, str]:
    """The node's variables a render may have, read once per pool process: the node's
    environment does not change while it runs, and reading ``os.environ`` decodes every
    variable (a millisecond a step)."""
    return renderenv.environment({}, os.environ, also_allowed)


class GatedLog:
    """The render log as the command's output sees it: writes stop once the step is no
    longer sure to be current, so a superseded node never adds to the log."""

    def __init__(self, log: RenderLog, lease: StepLease) -> None:
        self.log, self.lease = log, lease

    def write(self, data: bytes) -> None:
        if self.lease.valid():
            self.log.write(data)


@contextlib.contextmanager
def stop_signals(check: Callable[[], str]) -> Iterator[Callable[[], str]]:
    """Turn SIGTERM and the parent-death signal into stop requests while a render runs.

    ``revoke(terminate=True)`` (from ``stopJob`` or Flower) sends SIGTERM to the pool
    process. Left alone it raises ``SystemExit`` wherever the step happens to be, possibly in
    the middle of killing the render's tree. Instead the step notices it at its next poll,
    kills the tree and records its outcome as for any stop, and only then exits the pool
    process as Celery expects of a terminated task. When the worker's main process has died
    (:data:`PARENT_DIED`), the same happens, and the pool process then exits at once: no
    one is left to report to.
    """
    received: list[int] = []
    signals = (signal.SIGTERM, PARENT_DIED, WAKE)

    def on_signal(signum: int, _frame: object) -> None:
        if signum != WAKE:  # WAKE only wakes the render loop, which then asks ``check``
            received.append(signum)

    previous = [signal.signal(signum, on_signal) for signum in signals]

    def reason() -> str:
        if PARENT_DIED in received:
            return ORPHANED
        return TERMINATED if received else check()

    try:
        yield reason
    finally:
        for signum, handler in zip(signals, previous):
            signal.signal(signum, handler)
        if PARENT_DIED in received:
            os._exit(1)
        if received:
            raise SystemExit("the render step was terminated")


TERMINATED = "the worker was told to terminate the step"
ORPHANED = "the worker's main process died"
#: Times a step retries claiming its lease while Redis is unreachable (about 3 minutes).
MAX_CLAIM_RETRIES = 20


#: A step message's arguments and their types (what :func:`dispatch.send` puts in it).
MESSAGE = {"job_id": str, "attempt": int, "dispatch": int, "step": int, "steps": int,
           "name": str, "command": list}


def checked_message(task_id: str, args: tuple, kwargs: dict) -> str:
    """Why a step message is not one the farm sent, or "". Anyone who can push to a queue
    can forge one, so before anything else a node checks that it has a step's arguments
    and that its task id is the one its token names (so it can neither mark another step's
    Celery state nor pass for it); :func:`checked_dispatch` and the claim then check it
    against the record."""
    if args or not isinstance(kwargs, dict) or set(kwargs) != set(MESSAGE) or any(
            type(kwargs[name]) is not kind for name, kind in MESSAGE.items()):
        return "its arguments are not a render step's"
    token = Token(kwargs["job_id"], kwargs["attempt"], kwargs["dispatch"], kwargs["step"])
    if task_id != dispatch_task_id(token):
        return f"its task id is not its step's ({dispatch_task_id(token)})"
    return ""


def checked_dispatch(request: Any, kwargs: dict) -> tuple[str, list]:
    """Why a well-formed step message is not a dispatch as the farm sends it, or "", and
    the commands it carries: its own, then those of the rest of the job's steps (Celery's
    chain, which a node sends on when the step succeeds), each a step of the same dispatch,
    with no callback of its own. The claim then checks those commands against the record's
    (``claim.lua``, in the same write: a message that passes both is the same as the farm's
    own; one that ran a step without the rest would leave the job's next step with no
    message)."""
    if request.callbacks or request.errbacks or request.chord:
        return "it carries callbacks, which the farm's messages never do", []
    commands = [kwargs["command"]]
    chain = list(reversed(request.chain or []))  # Celery keeps the next task last
    same = ("job_id", "attempt", "dispatch")
    for later, signature in enumerate(chain, start=kwargs["step"] + 1):
        try:
            options, arguments = signature["options"], signature["kwargs"]
            problem = "" if signature["task"] == RENDER_STEP else "another task"
            problem = problem or checked_message(options.get("task_id", ""), (), arguments)
        except (KeyError, TypeError, AttributeError):
            return "its chain is not the job's remaining steps", []
        if problem or arguments["step"] != later or any(
                arguments[name] != kwargs[name] for name in same):
            return f"its chain's step {later + 1} is not the job's", []
        commands.append(arguments["command"])
    return "", commands


def render_step(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the step a message names, if it is one the farm could have sent
    (:func:`checked_message`, :func:`checked_dispatch`, then the claim compares its
    commands with the record's); a forged one is dropped with a log line, and leaves no
    state in Celery's results (which clients read) and the job as it was. Registered as the
    bound task ``RENDER_STEP`` by the worker's render node."""
    problem = checked_message(self.request.id, args, kwargs)
    commands: list = []
    if not problem:
        problem, commands = checked_dispatch(self.request, kwargs)
    if problem:
        _refuse(self, problem)
    return run_step(self, commands, **kwargs)


def _refuse(task: Any, problem: str) -> NoReturn:
    """Drop a message the farm did not send, leaving no state in Celery's results."""
    logger.error("refused the message of task %s: %s", task.request.id, problem)
    raise Ignore()


def run_step(
    self: Any, commands: list, job_id: str, attempt: int, dispatch: int, step: int,
    steps: int, name: str, command: list[str],
) -> dict[str, Any]:
    """Run step ``step`` (0-based) of dispatch ``dispatch`` of job ``job_id``'s
    ``attempt``, if ``commands`` (the message's, from this step on) are the record's.
    ``name``, ``steps`` and ``command`` are in the message so Flower shows what a task
    renders; the node goes by the job's record."""
    settings, store, user = self.app.node.settings, self.app.node.store, self.app.node.render_user
    node = self.request.hostname or "unknown node"
    label = f"step {step + 1}/{steps}"
    token = Token(job_id, attempt, dispatch, step)
    lease = StepLease(store, settings, token, lease_owner(self.request.id, node, os.getpid()))
    try:
        status, detail, record = lease.claim(node, commands)
    except (redis.ConnectionError, redis.TimeoutError) as error:
        # Nothing has started: try again once Redis is back, rather than fail the job.
        raise self.retry(exc=error, countdown=min(2 ** self.request.retries, 10),
                         max_retries=MAX_CLAIM_RETRIES) from None
    except CorruptRecord as error:  # claimed, but what to run cannot be read
        logger.error("job %s %s: %s", job_id, label, error)
        _fail(lease, f"{label}: {error}")
    if status == ClaimStatus.FORGED:
        _refuse(self, detail)
    if status == ClaimStatus.LIMITED:  # sent again by a reaper; the slot is free meanwhile
        _handed_on(self, f"job {job_id} {label} waits for a limit ({detail})")
    if status != ClaimStatus.OK:
        # A duplicate or already-done delivery shares its id with the real execution,
        # whose Celery state must not be overwritten. Only a superseded dispatch's id is
        # marked REVOKED: a finished step's id is still among its job's current ones, and
        # REVOKED there would read as a revoke from Flower (Farm._settle) and cancel the job.
        _skip(self, f"job {job_id} {label} not run ({status}): {detail}",
              revoked=status == ClaimStatus.SUPERSEDED)
    steps = len(record.spec.commands)  # the record's, not the message's
    label = f"step {step + 1}/{steps}"
    if record.bad_nodes.get(node, 0) >= retries.BAD_NODE_FAILURES:
        other = store.avoid(token, lease.owner, node, record.spec.queue,
                            int(settings.lease_seconds * 1000), retries.BAD_NODE_FAILURES)
        if other:
            _handed_on(self, f"job {job_id} {label}: failed {record.bad_nodes[node]} times on "
                             f"this node; left to {other} and the pool's other nodes")
    try:
        log_path = SharedRoot(settings.shared_root).join(record.log_path)
        log = RenderLog(log_path)
    except FarmError as error:
        _fail(lease, f"{label}: the record's render log is not usable: {error}")
    except OSError as error:
        _fail(lease, f"{label}: cannot write the render log {log_path}: {error.strerror}")
    command = _admitted(lease, log, record, step, settings, label)
    spec = record.spec
    rules = retries.FailureRules.of((settings.licence_pattern, settings.fatal_pattern),
                                    (spec.licence_pattern, spec.fatal_pattern))
    frames = progress.FrameWatcher(GatedLog(log, lease), settings.frame_pattern, spec.frames,
                                   done=lease.frame_done)
    output = retries.OutputWatcher(frames, rules)
    started = time.monotonic()
    with log, stop_signals(lease.stop_reason) as should_stop, lease.keep(on_problem=_wake), \
            renderenv.private_folders(user, self.request.id) as folders:
        log.step_started(step, steps, command, node, attempt,
                         retries.try_label(record.failures, spec.retries))
        try:
            env = render_environment(record, folders, settings, user)
            outcome = process.run(
                user.command(command, env) if user else command,
                env=env,
                spawn_options=renderenv.spawn_options(user),
                cwd=str(log_path.parent),
                output=output,
                should_stop=should_stop,
                poll_seconds=settings.poll_seconds,
                grace_seconds=settings.stop_grace_seconds,
                # The node's limit caps the job's: a step running longer could outlive the
                # broker's visibility timeout, and be delivered again while it runs.
                max_seconds=min(spec.max_step_seconds or settings.max_render_seconds,
                                settings.max_render_seconds),
                stall_seconds=record.spec.stall_seconds,
                memory_mb=record.spec.max_memory_mb,
                token=self.request.id,
            )
        except Exception as error:
            log.mark(f"{label} | internal error: {error!r}")
            _fail(lease, f"{label}: internal error: {error!r}")
        if outcome.survivors:
            logger.error("job %s %s: processes outlived SIGKILL: %s", job_id, label,
                         outcome.survivors)
        lease.seconds = time.monotonic() - started  # for the histogram, written at the end
        if lease.valid():
            log.step_ended(step, steps, outcome.describe(), time.monotonic() - started)
        if outcome.stop_reason:
            _after_stop(self, lease, outcome.stop_reason, f"job {job_id} {label}")
        if retries.retryable(outcome):
            _failed_try(self, lease, record, log, f"{label} failed: {outcome.describe()}",
                        output.kind())
    if not outcome.succeeded:
        _fail(lease, f"{label} failed: {outcome.describe()}")
    if not lease.finish(StepOutcome.SUCCEEDED, last=step == steps - 1):
        _skip(self, f"job {job_id} {label} finished, but was given to another node meanwhile",
              revoked=True)
    # What Flower shows as the task's result: short, as Celery logs its repr at every step.
    return f"exit status {outcome.exit_code}"


def _admitted(lease: StepLease, log: RenderLog, record: JobRecord, step: int,
              settings: Settings, label: str) -> list[str]:
    """The command the node runs for ``step``, of a job whose folder is on this node (see
    :mod:`celeryfarm.admission`); a refusal is logged, noted in the render log and fails the
    step before anything runs."""
    # The render's PATH matters only where programs are restricted (found there, then
    # matched); elsewhere the command runs as the record has it.
    search_path = (render_environment(record, {}, settings, None).get("PATH", os.defpath)
                   if settings.allowed_programs else None)
    try:
        admission.check_job_folder(record, settings.shared_root)
        return admission.command_to_run(record, step, settings.allowed_programs, search_path)
    except admission.Refused as refusal:
        logger.error("job %s %s refused: %s", record.job_id, label, refusal)
        with log:
            log.mark(f"{label} | refused: {refusal} | {stamp()}")
        _fail(lease, f"{label} refused: {refusal}")


def _after_stop(task: Any, lease: StepLease, reason: str, what: str) -> NoReturn:
    """Record why a render was stopped, then end the task without continuing the chain.

    A stop request cancels the job; a revoke from outside (Flower) does too. A lost lease,
    a dying main process or a cold shutdown give the step up for another node at once.
    """
    kind = lease.problem_kind
    if kind == FailureKind.STOPPED:
        lease.finish(StepOutcome.STOPPED)
    elif reason == TERMINATED and _revoked(task):
        lease.finish(StepOutcome.REVOKED, reason="a step was revoked outside celeryfarm (Flower?)")
    elif kind != FailureKind.SUPERSEDED:
        lease.finish(StepOutcome.ABANDONED)  # re-dispatched: its Celery state must not say REVOKED
        _skip(task, f"{what}: {reason}; given up for another node")
    _skip(task, f"{what}: {reason}", revoked=True)


def _failed_try(task: Any, lease: StepLease, record: JobRecord, log: RenderLog, what: str,
                kind: retries.FailureKind) -> NoReturn:
    """A try that failed: fail the job, or record that the step runs again later (a reaper
    sends it when due) and end the task without continuing the chain."""
    spec = record.spec
    decision = retries.decide(kind, record.failures, spec.retries, spec.retry_delay_seconds,
                              task.app.node.settings.licence_backoff_seconds)
    if decision.delay is None:
        _fail(lease, f"{what}; {decision.why}" if decision.why else what)
    if lease.valid():
        log.mark(f"{what}; {decision.why}; runs again in {decision.delay:g} s")
    if not lease.retry(int(decision.delay * 1000), decision.counted, what):
        _skip(task, f"job {record.job_id} {what}; not run again: the job was stopped or the "
                    f"step given to another node", revoked=True)
    _handed_on(task, f"job {record.job_id} {what}; {decision.why}")


def _handed_on(task: Any, reason: str) -> NoReturn:
    """End a task whose step runs again under a new dispatch. Its Celery state is RETRY:
    not FAILURE, which would end the job, nor REVOKED, which would cancel it."""
    logger.info(reason)
    task.update_state(state=states.RETRY, meta={"reason": reason})
    raise Ignore()


def _revoked(task: Any, wait_seconds: float = REVOKE_WAIT_SECONDS) -> bool:
    """Whether the task was revoked (Flower's Terminate): Celery's worker sends the SIGTERM
    first and records REVOKED after it, so a busy node's pool process may look before it
    is recorded; it looks again for up to ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    while task.app.AsyncResult(task.request.id).state != states.REVOKED:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _fail(lease: StepLease, reason: str) -> NoReturn:
    """Record the job Failed (if the step is still current) and fail the task, which ends
    the chain: the later steps never run."""
    lease.finish(StepOutcome.FAILED, reason=reason)
    raise StepFailed(reason)


def _skip(task: Any, reason: str, revoked: bool = False) -> NoReturn:
    """End the task without running (more of) it, so the chain goes no further; marked
    REVOKED in Celery when the step will not run again under this id."""
    logger.info(reason)
    if revoked:
        task.update_state(state=states.REVOKED, meta={"reason": reason})
    raise Ignore()
