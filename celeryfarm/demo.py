"""``celeryfarm demo``: real jobs, submitted through the farm core, watched to the end.

The demo submits as Katana's plug-in does (a render context: its folder on the shared mount,
the copied scene file, the job environment; then the commands), with the stand-in
renderboot as the renderer: a disk render writing frames, a preview
render, and a render that fails on purpose. It shows a progress bar per job, read from the
job records and from the progress lines in the render logs, then each job's final state,
log and frames. It uses the farm that runs already, or starts one and stops it afterwards.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import names_farm_redis, redact
from .errors import FarmError
from .records.keys import short_id
from .records.states import FINISHED, JobState
from .terminal import rich_state

if TYPE_CHECKING:
    from .farm import Farm
    from .session import Session

RENDERBOOT = [sys.executable, "-m", "celeryfarm.testing.renderboot"]
_STEP = re.compile(rb"==== celeryfarm \| step (\d+)/(\d+) \|")
_PROGRESS = re.compile(rb"progress (\d+)%")


@dataclasses.dataclass
class DemoJob:
    """One job of the demo and how it is meant to end."""

    name: str
    render_type: str
    steps: list[list[str]]  # renderboot arguments of each step; {out} is the frames folder
    expected: JobState
    frames: range = range(0)
    writes_frames: bool = True
    job_id: str = ""
    local_dir: Path = Path()
    log_path: Path = Path()
    state: JobState = JobState.WAITING
    reason: str = ""
    fraction: float = 0.0
    log_offset: int = 0
    status: str = ""
    step: int = 0  # the step the log shows running, 1-based

    def read_progress(self) -> None:
        """Advance ``fraction`` from the log lines written since the last call."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                data = log.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # only whole lines
        self.log_offset += end
        for line in data[:end].splitlines():
            step = _STEP.search(line)
            if step:
                self.step = int(step.group(1))
            progress = _PROGRESS.search(line)
            if step or (progress and self.step):
                done = self.step - 1 + (int(progress.group(1)) / 100 if progress else 0)
                self.fraction = max(self.fraction, done / len(self.steps))


def demo_jobs() -> list[DemoJob]:
    """A disk render in three chunks of frames, a preview, and one that fails in step 2."""
    return [
        DemoJob(
            "shot010 beauty (disk render)", "Disk", frames=range(1, 13),
            expected=JobState.COMPLETED,
            steps=[["--frames", f"{a}-{a + 3}", "--seconds", "3", "--output", "{out}"]
                   for a in (1, 5, 9)],
        ),
        DemoJob(
            "shot010 preview (preview render)", "Preview", frames=range(1, 2),
            expected=JobState.COMPLETED, writes_frames=False,
            steps=[["--frames", "1-1", "--seconds", "1"],
                   ["--frames", "1-1", "--seconds", "3", "--children", "1"]],
        ),
        DemoJob(
            "shot020 lighting (fails on purpose)", "Disk", frames=range(1, 13),
            expected=JobState.FAILED,
            steps=[["--frames", "1-4", "--seconds", "2", "--output", "{out}"],
                   ["--frames", "5-8", "--seconds", "2", "--output", "{out}",
                    "--fail-at-frame", "7"],
                   ["--frames", "9-12", "--seconds", "2", "--output", "{out}"]],
        ),
    ]


def submit(farm: Farm, job: DemoJob, scene: Path) -> None:
    """Submit ``job`` in a render context of its own, with a copy of ``scene``."""
    context = farm.create_context([str(scene)])
    job.local_dir = context.folder
    out = f"{context.node_folder}/frames"
    commands = [
        [*RENDERBOOT, *(arg.replace("{out}", out) for arg in args),
         "--scene", context.copies[str(scene)], "--tag", "celeryfarm-demo"]
        for args in job.steps
    ]
    job.job_id = farm.submit_commands(
        commands, context=context.name, name=job.name, frames=job.frames,
        render_type=job.render_type,
    ).job_id
    job.log_path = farm.log_file(job.job_id) or Path()


def run(session: Session, workers: int = 2, timeout: float = 300.0) -> bool:
    """Run the demo; return whether every job ended as intended."""
    try:
        from rich.console import Console
    except ImportError:
        raise FarmError("the demo needs rich: pip install 'celeryfarm[cli]'") from None
    from .localfarm import running_farm, supervised
    from .session import make_local_farm

    console = Console(highlight=False)
    settings = session.local_settings
    try:
        if names_farm_redis(session.environ) or running_farm(settings.data_dir):
            console.print(f"using the running farm at "
                          f"[bold]{redact(session.settings.broker_url)}[/]")
            return _show(session, console, timeout)
        console.print(f"starting a farm with {workers} render node(s) from "
                      f"{settings.data_dir} ...")
        started = time.monotonic()
        farm = make_local_farm(session, workers=workers, flower=False, echo=console.print)
        with supervised(farm) as state:
            session.point_at(state.env)
            console.print(f"farm up in {time.monotonic() - started:.1f} s "
                          f"(broker {redact(state.broker_url)})")
            return _show(session, console, timeout)
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted[/]")
        return False


def _show(session: Session, console: Any, timeout: float) -> bool:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    jobs = demo_jobs()
    with tempfile.TemporaryDirectory(prefix="celeryfarm-demo-") as local:
        scene = Path(local) / "scene.optree"
        scene.write_text("<!-- a stand-in for Katana's serialised Op Tree -->\n")
        for job in jobs:
            submit(session.farm, job, scene)
            console.print(f"submitted [bold]{short_id(job.job_id)}[/] {job.name} "
                          f"({len(job.steps)} steps)")
    columns = [TextColumn("{task.fields[id]}"), TextColumn("{task.description}"),
               BarColumn(bar_width=24), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console) as progress:
        bars = {job.job_id: progress.add_task(job.name, total=1.0, id=short_id(job.job_id),
                                              status="") for job in jobs}
        while not all(job.state in FINISHED for job in jobs):
            if time.monotonic() > deadline:
                console.print(f"[red]the jobs did not finish within {timeout:g} s[/]")
                break
            time.sleep(0.25)
            for job in jobs:
                status = _update(session, job)
                if status and not console.is_terminal:  # a log, not a screen: print changes
                    console.print(f"{short_id(job.job_id)} {job.name}: {status} "
                                  f"({job.fraction:.0%})")
                progress.update(bars[job.job_id], completed=job.fraction, status=job.status)
    for job in jobs:
        _report(console, job)
    ok = all(job.state == job.expected for job in jobs)
    console.print("[green]every job ended as intended[/]" if ok
                  else "[red]some jobs did not end as intended[/]")
    return ok


def _update(session: Session, job: DemoJob) -> str:
    """Refresh ``job`` from its record and log; return its new status if it changed."""
    record = session.farm.get(job.job_id)
    job.state, job.reason = record.state, record.reason
    job.read_progress()
    if job.state == JobState.COMPLETED:
        job.fraction = 1.0
    step = "" if record.step is None else f" step {record.step + 1}/{len(job.steps)}"
    node = f" on {record.node.split('@')[0]}" if record.node and not record.finished else ""
    status = f"{rich_state(job.state)}{step}{node}"
    changed, job.status = status != job.status, status
    return status if changed else ""


def _report(console: Any, job: DemoJob) -> None:
    """A job's outcome, its log and its frames, one path per line (paths are long)."""
    ok = job.state == job.expected
    mark = "[green]ok[/]" if ok else "[red]NOT AS INTENDED[/]"
    intent = "as intended" if ok else f"expected {job.expected}"
    reason = f": {job.reason}" if job.reason else ""
    console.print(f"{mark} [bold]{short_id(job.job_id)}[/] {job.name}: "
                  f"{rich_state(job.state)} ({intent}){reason}", soft_wrap=True)
    console.print(f"     render log  {job.log_path}", soft_wrap=True)
    if job.writes_frames:
        frames_dir = job.local_dir / "frames"
        count = len(list(frames_dir.glob("*.ppm")))
        console.print(f"     frames      {frames_dir}  ({count} images)", soft_wrap=True)
    else:
        console.print("     frames      none: a preview's pixels go to Katana's monitor")
