"""Frame progress: read from a render's output as it comes, shown by ``jobs`` and ``status``.

How renderboot reports a finished frame depends on the renderer plug-in, so the farm
matches one regular expression against each output line, ``CELERYFARM_FRAME_PATTERN``,
whose first group is the frame number. The default matches lines such as
``Frame 12 rendered`` (also ``done``, ``finished``, ``completed``, ``written``), which the
stand-in renderboot prints after each frame. Each frame of the job counts once, however
many times it is rendered (a retry, a re-dispatch); frames outside the job's are ignored.
The estimate of the time left is the job's running time per frame done, times the frames
left.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .jobs import FrameRanges


def frame_count(ranges: FrameRanges) -> int:
    return sum(last - first + 1 for first, last in ranges)


def in_frames(frame: int, ranges: FrameRanges) -> bool:
    return any(first <= frame <= last for first, last in ranges)


class FrameWatcher:
    """Passes a step's output on to ``sink`` and calls ``done(frame)`` for each finished
    frame of the job that a complete line reports."""

    def __init__(self, sink: object, pattern: str, ranges: FrameRanges,
                 done: Callable[[int], None]) -> None:
        self.sink, self.ranges, self.done = sink, ranges, done
        self.pattern = re.compile(pattern.encode())
        self._partial = b""

    def write(self, data: bytes) -> None:
        self.sink.write(data)  # type: ignore[attr-defined]
        if not self.ranges:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        self._partial = self._partial[-4096:]  # a frame line is short
        for line in lines:
            match = self.pattern.search(line)
            if match and in_frames(frame := int(match.group(1)), self.ranges):
                self.done(frame)


def seconds_left(done: int, total: int, running_ms: int | None) -> float | None:
    """The time left at the pace so far, or None before the first frame, after the last,
    or when the job is not running (``running_ms`` None)."""
    if not running_ms or not 0 < done < total:
        return None
    return running_ms / done * (total - done) / 1000


def describe(done: int, total: int, left: float | None) -> str:
    """``3/11 frames, about 1m20s left``; ``-`` for a job without frames."""
    if not total:
        return "-"
    return f"{done}/{total} frames" + (f", about {_duration(left)} left" if left else "")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
