"""Helpers of the benchmark run: statistics, result rows, the machine description, the report.

Nothing here times anything; :mod:`benchmarks.run` does.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: Where the generated part of BENCHMARKS.md goes; text outside the markers is kept.
BEGIN, END = "<!-- benchmark results: begin -->", "<!-- benchmark results: end -->"


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (p99 of 20 values is the largest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclasses.dataclass
class Row:
    """One line of the results table. ``farm`` and ``baseline`` are numbers in ``unit``, or
    None with the reason in ``farm_text``/``baseline_text``."""

    figure: str
    measure: str
    unit: str
    farm: float | None = None
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None  # None: no target, or not measured
    farm_text: str = ""
    baseline_text: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.farm is None or not self.baseline:
            return None
        return self.farm / self.baseline

    def cells(self) -> list[str]:
        ratio = self.ratio
        return [
            self.figure,
            self.measure,
            self.farm_text or _number(self.farm, self.unit),
            (self.baseline_text or _number(self.baseline, self.unit))
            + (f" ({self.baseline_name})" if self.baseline_name else ""),
            f"{ratio:.2f}x" if ratio is not None else "-",
            self.target or "-",
            {True: "yes", False: "NO", None: "-"}[self.met],
        ]


HEADER = ["#", "figure", "farm", "baseline", "ratio", "target", "met?"]


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{digits}f} {unit}".strip()


def text_table(rows: Sequence[Row]) -> str:
    lines = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |"
              for row in rows]
    return "\n".join(lines)


# -- the machine ----------------------------------------------------------------------------
def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
        kib = int(re.search(r"MemTotal:\s+(\d+)", text).group(1))
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _redis_server_version() -> str:
    binary = shutil.which("redis-server")
    if not binary:
        return "not found"
    output = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\S+)", output)
    return match.group(1) if match else output.strip()


def machine() -> dict[str, str]:
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis-py": _version("redis"),
        "hiredis": _version("hiredis"),
        "redis-server": _redis_server_version(),
        "celeryfarm": _git_revision(),
    }


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(  # the report itself does not count
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)BENCHMARKS.md"],
            capture_output=True, text=True, cwd=Path(__file__).parent.parent).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else "unknown"


# -- the report -----------------------------------------------------------------------------
def report(rows: Sequence[Row], info: dict[str, str], command: str, notes: Sequence[str]) -> str:
    """The generated section of BENCHMARKS.md."""
    lines = [
        BEGIN,
        f"Measured {info['date']} with `{command}` ({info['duration']}).",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in info.items()
          if key not in ("date", "duration")),
        "",
        markdown_table(rows),
        "",
        *(f"- {note}" for note in notes),
        END,
    ]
    return "\n".join(lines)


def write_report(path: Path, section: str) -> None:
    """Replace the generated section of ``path`` (or append one), keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    return " ".join(["python", "-m", "benchmarks.run", *sys.argv[1:]])
