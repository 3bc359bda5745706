"""The farm's own vocabulary: what a submission asks for, what a job record holds.

These types know nothing of Katana (the plug-in maps them to ``FarmAPI`` types) nor of Redis
(:mod:`celeryfarm.records` persists them, and owns the job states), so workers, the
command line and the plug-in share them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from . import sizes
from .errors import FarmError
from .records.states import FINISHED, JobState
from .retries import compile_pattern

RENDER_TYPES = ("Disk", "Preview", "Live")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Farm priorities run 0..100, higher first, as in Deadline and Tractor.
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 100, 50

Command = Union[str, Sequence[str]]
#: Frames as sorted, disjoint, inclusive ranges: ``((1, 10), (20, 20))`` is frames 1-10 and 20.
FrameRanges = tuple[tuple[int, int], ...]


#: What makes shlex.split differ from str.split: quotes, escapes, and white space other than
#: shlex's (str.split also splits at vertical tabs, form feeds, NBSP...).
_SHLEX_SYNTAX = re.compile(r"['\"\\]|(?![ \t\r\n])\s")


def parse_command(command: Command) -> list[str]:
    """Return the argv of a command given as a list or as a command-line string.

    Strings are split with :func:`shlex.split` and never handed to a shell; one without
    quotes, backslashes or unusual white space splits the same at white space, faster.
    """
    if isinstance(command, str) and not _SHLEX_SYNTAX.search(command):
        argv = command.split()
    elif isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as error:
            raise FarmError(f"cannot parse command {command!r}: {error}") from None
    elif isinstance(command, Sequence) and not isinstance(command, (bytes, bytearray)):
        argv = list(command)
    else:
        raise FarmError(f"a command must be a string or a list of strings, got {command!r}")
    if not argv:
        raise FarmError("a command is empty")
    for arg in argv:
        if not isinstance(arg, str):
            raise FarmError(f"command arguments must be strings, got {arg!r} in {argv!r}")
        if "\0" in arg:
            raise FarmError(f"command argument contains a NUL byte: {arg!r}")
    if not argv[0]:
        raise FarmError(f"a command has an empty program name: {argv!r}")
    return argv


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A validated request for a job: everything the farm needs to run it."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    environment: Mapping[str, str]
    render_type: str = "Disk"
    frames: FrameRanges = ()  # the frames the job renders (Katana's request lists each one)
    context: str = ""
    queue: str = "renders"
    priority: int = DEFAULT_PRIORITY
    max_step_seconds: int = 0  # 0: only the farm-wide limit
    stall_seconds: int = 0  # 0: no stall detection
    max_memory_mb: int = 0  # 0: no memory cap
    retries: int = 0  # runs again of a step that exits non-zero (see celeryfarm.retries)
    retry_delay_seconds: int = 0
    licence_pattern: str = ""  # failure rules of the job: regular expressions over output
    fatal_pattern: str = ""
    limits: tuple[str, ...] = ()  # each running step holds one unit of each (celeryfarm limit)
    user: str = ""
    host: str = ""
    session: str = ""

    @classmethod
    def build(
        cls,
        *,
        name: str,
        commands: Sequence[Command],
        environment: Mapping[str, Any] | None = None,
        render_type: str | None = None,
        frames: Iterable[int] = (),
        settings: Mapping[str, Any] | None = None,
        default_queue: str = "renders",
        **identity: str,
    ) -> JobSpec:
        """Validate loosely-typed input (from Katana or the command line) into a spec.

        Raises :class:`FarmError` naming the first thing that is wrong.
        """
        if isinstance(commands, (str, bytes)) or not isinstance(commands, Sequence):
            raise FarmError(f"commands must be a list of commands, got {commands!r}")
        if not commands:
            raise FarmError("the job has no commands to run")
        argvs = tuple(tuple(parse_command(command)) for command in commands)
        sizes.check_commands(argvs)
        env = _environment(environment)
        sizes.check_environment(env)
        render_type = render_type or "Disk"
        if render_type not in RENDER_TYPES:
            raise FarmError(f"unknown render type {render_type!r}; expected one of {RENDER_TYPES}")
        settings = dict(settings or {})
        queue = str(settings.pop("pool", None) or default_queue)
        if not _QUEUE_NAME.fullmatch(queue):
            raise FarmError(f"invalid pool name {queue!r}: use letters, digits, '_', '.', '-'")
        priority = _priority(settings.pop("priority", DEFAULT_PRIORITY))
        max_step_seconds = _seconds(settings.pop("maxStepSeconds", 0), "maxStepSeconds")
        stall_seconds = _seconds(settings.pop("stallSeconds", 0), "stallSeconds")
        max_memory_mb = _not_negative(settings.pop("maxMemoryMB", 0), "maxMemoryMB", "megabytes")
        retries = _not_negative(settings.pop("retries", 0), "retries", "runs again")
        retry_delay = _seconds(settings.pop("retryDelaySeconds", 0), "retryDelaySeconds")
        patterns = {setting: str(settings.pop(setting, "") or "")
                    for setting in ("licencePattern", "fatalPattern")}
        for setting, pattern in patterns.items():
            compile_pattern(pattern, setting)
        limits = limit_names(settings.pop("limits", ""))
        if settings:
            raise FarmError(f"unknown farm settings: {', '.join(sorted(map(str, settings)))}")
        return cls(
            name=sizes.check_name(str(name or "render")),
            commands=argvs,
            environment=env,
            render_type=render_type,
            frames=frame_ranges(frames),
            queue=queue,
            priority=priority,
            max_step_seconds=max_step_seconds,
            stall_seconds=stall_seconds,
            max_memory_mb=max_memory_mb,
            retries=retries,
            retry_delay_seconds=retry_delay,
            licence_pattern=patterns["licencePattern"],
            fatal_pattern=patterns["fatalPattern"],
            limits=limits,
            **identity,
        )


def limit_names(value: Any) -> tuple[str, ...]:
    """Limit names from a comma-separated string (Katana's string setting) or a list;
    each a name like a pool's."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    found = tuple(dict.fromkeys(str(name).strip() for name in names if str(name).strip()))
    for name in found:
        if not _QUEUE_NAME.match(name):
            raise FarmError(f"invalid limit name {name!r}: use letters, digits, '_', '.', '-'")
    return found


def _environment(environment: Mapping[str, Any] | None) -> dict[str, str]:
    if environment is None:
        return {}
    if not isinstance(environment, Mapping):
        raise FarmError(f"environment must be a mapping of names to values, got {environment!r}")
    env = {}
    for key, value in environment.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise FarmError(f"invalid environment variable name {key!r}")
        if value is None or "\0" in str(value):
            raise FarmError(f"invalid value for environment variable {key}: {value!r}")
        env[key] = str(value)
    return env


def frame_ranges(frames: Iterable[int]) -> FrameRanges:
    """Katana's list of frame numbers as sorted ranges (duplicates dropped)."""
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Iterable):
        raise FarmError(f"frames must be a list of frame numbers, got {frames!r}")
    numbers = sorted({_whole(frame, "a frame number") for frame in frames})
    ranges: list[tuple[int, int]] = []
    for frame in numbers:
        if ranges and frame == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], frame)
        else:
            ranges.append((frame, frame))
    return tuple(ranges)


def describe_frames(ranges: FrameRanges) -> str:
    """``1-10,20, 11 frames``; ``-`` for a job without frames."""
    if not ranges:
        return "-"
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
    count = sum(b - a + 1 for a, b in ranges)
    return f"{text}, {count} frame{'s' if count != 1 else ''}"


def _whole(value: Any, what: str) -> int:
    """An integer from an int, a whole float (Katana's number parameters hold floats) or a
    numeric string; anything else is a :class:`FarmError` naming ``what``."""
    if isinstance(value, bool):
        raise FarmError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise FarmError(f"{what} must be a whole number, got {value!r}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FarmError(f"{what} must be a whole number, got {value!r}") from None


def _seconds(value: Any, name: str) -> int:
    return _not_negative(value, name, "seconds")


def _not_negative(value: Any, name: str, unit: str) -> int:
    number = _whole(value or 0, f"{name} ({unit})")
    if number < 0:
        raise FarmError(f"{name} must not be negative, got {number}")
    return number


def _priority(value: Any) -> int:
    priority = _whole(value, "priority")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise FarmError(f"priority must be {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
    return priority


@dataclasses.dataclass
class JobRecord:
    """A job as stored on the farm: its spec plus what has happened to it."""

    job_id: str
    spec: JobSpec
    log_path: str  # relative to the shared root, so every host can resolve it
    state: JobState = JobState.WAITING
    attempt: int = 1  # bumped by each restart
    dispatch: int = 1  # bumped by each (re)dispatch: with attempt and step, the fencing token
    next_step: int = 0  # index of the step to run next
    lost: int = 0  # nodes lost in a row while running the current step
    failures: int = 0  # tries of the current step that failed and used a retry
    licence_waits: int = 0  # tries of the current step that found no licence
    bad_nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # node -> failed tries
    frames_done: int = 0  # frames the render's output reported done (celeryfarm.progress)
    task_ids: tuple[str, ...] = ()  # Celery ids of the current dispatch's steps
    submitted_ms: int = 0
    start_ms: int | None = None
    end_ms: int | None = None
    step: int | None = None  # index of the step running or last run
    node: str = ""
    reason: str = ""  # why the job failed or was cancelled

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclasses.dataclass
class Listed:
    """What a job listing shows of a job (getJobs): a few fields of its record, cheap to
    read and to keep (see :mod:`celeryfarm.listing`). Never changed once made: a change
    is a new object (the plug-in's ``Job`` of it is kept while it is the same one)."""

    job_id: str
    name: str
    user: str
    host: str
    session: str
    render_type: str
    state: JobState
    attempt: int
    submitted_ms: int
    end_ms: int | None
    log_path: str
    task_ids_json: str  # parsed only for active jobs, the only ones settled with Celery
    reason: str = ""

    @property
    def task_ids(self) -> tuple[str, ...]:
        return tuple(json.loads(self.task_ids_json or "[]"))
