"""The ``celeryfarm`` command: run a farm on this machine, and drive and watch any farm.

Every command goes through the farm core, :class:`~celeryfarm.farm.Farm`, as the Katana
plug-in does: a submission is a render context (folder, copied files, environment) and argv
lists. Without ``CELERYFARM_BROKER_URL`` the commands use the farm
that ``celeryfarm up`` runs from the data folder. Errors are one line on stderr and a
non-zero exit status; heavy modules are imported only by the commands that need them, so
``--help`` and configuration errors are quick.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .config import PREFIX, SECRETS, Settings, names_farm_redis, redact
from .errors import FarmError
from .jobs import RENDER_TYPES, JobRecord, describe_frames, parse_command
from .progress import describe as describe_progress
from .progress import frame_count, seconds_left
from .records.keys import short_id
from .records.states import JobState
from .retries import bad_nodes, try_label
from .sentinel import uses_sentinel
from .session import Session, make_local_farm
from .terminal import styled_state, table, when

if TYPE_CHECKING:
    import redis

    from .farm import Farm
    from .localfarm import FarmState, LocalFarm

#: Exit status of ``submit --wait`` and ``demo`` when a job did not end as it should.
EXIT_JOB_FAILED = 1


class FarmGroup(click.Group):
    """Turns the farm's errors into one line on stderr and exit status 1, and lists the
    commands in the order they are defined (running a farm first, then jobs)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        import redis
        from kombu.exceptions import OperationalError

        try:
            return super().invoke(ctx)
        except FarmError as error:
            raise click.ClickException(_one_line(error)) from None
        except redis.exceptions.NoPermissionError as error:
            raise click.ClickException(f"not allowed to this farm user (an admin's or another "
                                       f"artist's?): {_one_line(error)}") from None
        except (redis.RedisError, OperationalError) as error:
            raise click.ClickException(f"cannot reach the farm: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


pass_session = click.make_pass_decorator(Session)


def _set_allow_root(ctx: click.Context, _param: Any, value: bool) -> None:
    if value:
        ctx.find_object(Session).environ[PREFIX + "ALLOW_ROOT"] = "1"


#: The option of the commands that start render nodes, which refuse to run as root without it.
allow_root_option = click.option(
    "--allow-root", is_flag=True, expose_value=False, callback=_set_allow_root,
    help=f"Let render nodes run as root (they refuse to otherwise; {PREFIX}ALLOW_ROOT=1).")


@click.group(cls=FarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="The local farm's data folder (default: $CELERYFARM_DATA_DIR or "
                   "~/.celeryfarm).")
@click.version_option(package_name="celeryfarm")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None) -> None:
    """celeryfarm: a render farm for Katana on Celery and Redis.

    Start a farm on this machine with `celeryfarm up`, try it with `celeryfarm demo`. The
    other commands use the farm named by CELERYFARM_BROKER_URL and CELERYFARM_SHARED_ROOT,
    or else the one `celeryfarm up` runs from the data folder.
    """
    ctx.obj = Session(data_dir)


# -- running a farm ---------------------------------------------------------------------------
@cli.command()
@click.option("--workers", "-w", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Render-node workers to run.")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Render steps each worker runs at once.")
@click.option("--queues", "-Q", default="", metavar="POOLS",
              help="Pools (queues) the workers take jobs from, comma-separated "
                   "(default: $CELERYFARM_DEFAULT_QUEUE or 'renders').")
@click.option("--flower/--no-flower", default=True, show_default=True,
              help="Run Flower, the web monitor.")
@click.option("--flower-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Flower's port (default: $CELERYFARM_FLOWER_PORT, else 5555 if free).")
@click.option("--replicas", default=0, show_default=True, type=click.IntRange(0, 8),
              help="Run Redis as a primary with this many replicas and three sentinels, "
                   "which promote a replica when the primary dies.")
@allow_root_option
@pass_session
def up(session: Session, workers: int, concurrency: int, queues: str, flower: bool,
       flower_port: int | None, replicas: int) -> None:
    """Run a whole farm on this machine until Ctrl-C.

    Starts a private redis-server (loopback only, generated password, append-only data in
    the data folder) unless CELERYFARM_BROKER_URL names a Redis, the render-node workers
    (a worker that dies is started again), and Flower with a login. Ctrl-C or SIGTERM stops
    them all; a later `up` on the same data folder finds the earlier jobs.
    """
    from .localfarm import supervised

    started = time.monotonic()
    farm = make_local_farm(session, workers=workers, concurrency=concurrency, queues=queues,
                           flower=flower, flower_port=flower_port, replicas=replicas)
    click.echo(f"starting a farm from {farm.data_dir} ...")
    try:
        with supervised(farm) as state:
            _print_farm(state, farm, time.monotonic() - started)
            while True:  # until a signal interrupts us
                signal.pause()
    except KeyboardInterrupt:
        click.echo("farm stopped")


def _print_farm(state: FarmState, farm: LocalFarm, seconds: float) -> None:
    nodes = ", ".join(state.nodes)
    rows = [
        ("broker", redact(state.broker_url) + (
            f" (embedded: a primary, {farm.replicas} replicas, 3 sentinels)" if farm.replicas
            else " (embedded redis-server)" if state.embedded_redis else "")),
        ("shared root", state.shared_root),
        ("render nodes", f"{nodes}; pools {farm.queues}, {farm.concurrency} slot(s) each"),
    ]
    if state.flower_url:
        rows.append(("flower", f"{state.flower_url}  login {state.flower_user} / "
                               f"{farm.flower_password}"))
    rows.append(("logs", str(farm.log_dir)))
    click.echo(click.style(f"celeryfarm is up ({seconds:.1f} s)", fg="green", bold=True))
    for label, value in rows:
        click.echo(f"  {label:<13}{value}")
    click.echo("To use this farm from a Katana session or another shell on this machine:")
    for name in state.env:
        click.echo(f"  export {name}=...")
    click.echo('  (eval "$(celeryfarm env)" sets them; the broker URL holds the password)')
    click.echo("Press Ctrl-C to stop the farm.")


@cli.command()
@pass_session
def env(session: Session) -> None:
    """Print the environment that joins a Katana session or a shell to the farm.

    Meant for `eval "$(celeryfarm env)"`: the output holds the Redis password, unless this
    environment gives it in a file (CELERYFARM_BROKER_URL_FILE...): then it names the file.
    """
    from .localfarm import running_farm
    from .plugin import KATANA_RESOURCES

    if names_farm_redis(session.environ):
        values = session.local_settings.client_environment()
        for name in SECRETS:  # a credential kept in a file stays there
            kept_in = session.environ.get(f"{PREFIX}{name}_FILE", "")
            if kept_in and not session.environ.get(PREFIX + name):
                values.pop(PREFIX + name, None)
                values[f"{PREFIX}{name}_FILE"] = kept_in
    else:
        state = running_farm(session.local_settings.data_dir)
        if state is None:
            raise FarmError(f"no farm is running from {session.local_settings.data_dir}: "
                            f"start one with `celeryfarm up`, or set {PREFIX}BROKER_URL")
        values = state.env
    values["KATANA_RESOURCES"] = (
        str(KATANA_RESOURCES) + os.pathsep + session.environ.get("KATANA_RESOURCES", "")
    ).rstrip(os.pathsep)
    for name, value in values.items():
        click.echo(f"export {name}={shlex.quote(value)}")


@cli.command()
@click.option("--queues", "-Q", default="", metavar="POOLS",
              help="Pools (queues) to take jobs from, comma-separated (default: "
                   "$CELERYFARM_DEFAULT_QUEUE or 'renders').")
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Render steps this node runs at once.")
@click.option("--name", "-n", default="render", show_default=True,
              help="Node name (the host name is added); unique per machine.")
@allow_root_option
@click.option("--check", is_flag=True,
              help="Do not run a node: exit 0 if this host's node of this name answers a "
                   "ping, else 1 (a container's health check).")
@pass_session
def worker(session: Session, queues: str, concurrency: int, name: str, check: bool) -> None:
    """Run this machine as a render node of the farm, in the foreground.

    The one node command: `celeryfarm up`'s nodes, the worker image, docker-compose.yml
    and the tests all run it. The farm is the one CELERYFARM_BROKER_URL names (with
    CELERYFARM_SHARED_ROOT: where this machine mounts the shared folder), or the one
    `celeryfarm up` runs here.
    """
    from .localfarm import check_redis
    from .renderenv import root_problem
    from .worker import node_answers, node_name, run_node

    settings = session.node_settings
    if not check and root_problem(settings):  # a health check runs nothing
        raise FarmError(root_problem(settings))
    check_redis(settings.broker_url, settings.tls, settings.sentinel_master,
                settings.sentinel_password)
    if check:
        from .celery import create_app

        if not node_answers(create_app(settings), name):
            raise FarmError(f"render node {node_name(name)} does not answer")
        return
    click.echo(f"joining the farm at {redact(settings.broker_url)} as {node_name(name)}, "
               f"shared root {settings.shared_root}", err=True)
    sys.exit(run_node(settings, name, concurrency, queues or settings.default_queue))


@cli.command()
@pass_session
def doctor(session: Session) -> None:
    """Check this node's set-up, one line each: the shared mount, the Katana root, the
    Redis connection and the node's user. Exits 1 if anything is wrong."""
    from .doctor import checks

    healthy = True
    for what, finding, ok in checks(session.settings):
        healthy = healthy and ok
        verdict = click.style("ok" if ok else "PROBLEM", fg="green" if ok else "red")
        click.echo(f"{what + ':':<14}{verdict} {finding}")
    sys.exit(0 if healthy else 1)


@cli.command()
@click.option("--workers", "-w", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Workers of the farm the demo starts (when none runs).")
@click.option("--timeout", default=300, show_default=True, type=click.IntRange(10),
              help="Seconds to wait for the jobs before giving up.")
@allow_root_option
@pass_session
def demo(session: Session, workers: int, timeout: int) -> None:
    """Submit a few real render jobs and watch them run.

    Uses the farm `celeryfarm up` runs (or CELERYFARM_BROKER_URL's); without one, starts a
    farm on this machine for the demo and stops it afterwards. Exits 0 when every job ended
    as intended (one of them fails on purpose).
    """
    from . import demo as demo_module

    ok = demo_module.run(session, workers=workers, timeout=timeout)
    sys.exit(0 if ok else EXIT_JOB_FAILED)


# -- jobs ----------------------------------------------------------------------------------
def _parse_env(_ctx: Any, _param: Any, items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}")
        env[name] = value
    return env


#: The farm setting (as on Katana's Render node) of each ``submit`` option that sets one.
SETTING_OF_OPTION = {"retry_delay": "retryDelaySeconds", "licence_pattern": "licencePattern",
                     "fatal_pattern": "fatalPattern"}

#: Most frames one ``--frames`` may name.
MAX_FRAMES = 1_000_000


def _parse_frames(_ctx: Any, _param: Any, text: str | None) -> list[int]:
    """``1-100`` or ``1-10,20``: every frame number, as Katana's request lists them."""
    frames: list[int] = []
    for part in filter(None, (text or "").replace(" ", "").split(",")):
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise click.BadParameter(f"expected FIRST-LAST[,FRAME...], got {text!r}")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first or len(frames) + last - first >= MAX_FRAMES:
            raise click.BadParameter(f"{part!r}: ranges go up, at most {MAX_FRAMES} frames")
        frames.extend(range(first, last + 1))
    return frames


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--cmd", "commands", multiple=True, metavar="'CMD ARGS'",
              help="A step's command line (repeat for more steps; run in order).")
@click.option("--name", help="Job name (default: the first command's program).")
@click.option("--pool", help="Pool (queue) to run in (default: $CELERYFARM_DEFAULT_QUEUE).")
@click.option("--priority", type=click.IntRange(0, 100), help="0..100, higher first; 50.")
@click.option("--frames", callback=_parse_frames, metavar="FRAMES",
              help="Frames the job renders: 1-100, or 1-10,20.")
@click.option("--render-type", type=click.Choice(RENDER_TYPES), default="Disk",
              show_default=True)
@click.option("--env", "environment", multiple=True, callback=_parse_env,
              metavar="NAME=VALUE", help="Environment variable for the job (repeatable).")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A local file to copy to the job's folder on the shared mount.")
@click.option("--retries", type=click.IntRange(0), help="Run a step that exits non-zero again, "
              "up to this many times (0).")
@click.option("--retry-delay", "retry_delay", type=click.IntRange(0), metavar="SECONDS",
              help="Wait this long before a failed step runs again (0).")
@click.option("--licence-pattern", metavar="REGEX", help="A failed step with an output line "
              "matching this found no licence: it backs off, no retry used.")
@click.option("--fatal-pattern", metavar="REGEX",
              help="A failed step with an output line matching this is never retried.")
@click.option("--limit", "limits", multiple=True, metavar="NAME",
              help="A limit (licence) each step holds one unit of while it runs (repeatable).")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit 1 unless Completed.")
@pass_session
def submit(session: Session, command: tuple[str, ...], commands: tuple[str, ...],
           name: str | None, pool: str | None, priority: int | None,
           frames: list[int], render_type: str, environment: dict[str, str],
           files: tuple[str, ...], wait: bool, **farm_settings: Any) -> None:
    """Submit a job: `celeryfarm submit [OPTIONS] -- CMD ARGS...` or `--cmd` steps.

    Like a Katana render, the job gets a render context: a folder on the shared mount (its
    working directory, in $KATANA_TMPDIR) with the copied files. Prints the job id.
    """
    steps = [parse_command(text) for text in commands]
    if command:
        steps.append(list(command))
    if not steps:
        raise click.UsageError("nothing to run: give `-- CMD ARGS...` or --cmd")
    farm = session.farm
    context = farm.create_context(files)
    farm_settings.update(pool=pool, priority=priority, limits=farm_settings["limits"] or None)
    settings = {SETTING_OF_OPTION.get(k, k): v for k, v in farm_settings.items()
                if v is not None}
    job_id = farm.submit_commands(
        steps, context=context.name, name=name or Path(steps[0][0]).name,
        environment=environment, frames=frames, render_type=render_type, settings=settings,
    ).job_id
    click.echo(job_id)
    for local, remote in context.copies.items():
        click.echo(f"copied {local} -> {remote}", err=True)
    if wait:
        record = _wait_for(session.farm, job_id)
        click.echo(f"job {short_id(job_id)} {styled_state(record.state)}"
                   + (f": {record.reason}" if record.reason else ""), err=True)
        if record.state != JobState.COMPLETED:
            sys.exit(EXIT_JOB_FAILED)


def _wait_for(farm: Farm, job_id: str, poll_seconds: float = 0.5) -> JobRecord:
    while True:
        record = farm.get(job_id)
        if record.finished:
            return record
        time.sleep(poll_seconds)


def _seconds_left(record: JobRecord) -> float | None:
    """The estimated time left of a running job, from its pace so far (or None)."""
    running_ms = (int(time.time() * 1000) - record.start_ms
                  if record.start_ms and not record.finished else None)
    return seconds_left(record.frames_done, frame_count(record.spec.frames), running_ms)


def _progress(record: JobRecord) -> str:
    return describe_progress(record.frames_done, frame_count(record.spec.frames),
                             _seconds_left(record))


def _as_json(session: Session, record: JobRecord) -> dict[str, Any]:
    spec = record.spec
    return {
        "id": record.job_id, "name": spec.name, "state": record.state,
        "user": spec.user, "host": spec.host, "session": spec.session,
        "render_type": spec.render_type, "pool": spec.queue, "priority": spec.priority,
        "frames": describe_frames(spec.frames),
        "attempt": record.attempt,
        "try": record.failures + 1, "retries": spec.retries,
        "licence_waits": record.licence_waits, "node_losses": record.lost,
        "bad_nodes": bad_nodes(record.bad_nodes),
        "frames_done": record.frames_done, "frames_total": frame_count(spec.frames),
        "seconds_left": _seconds_left(record),
        "steps": len(spec.commands) or None,  # None in listings, which skip the commands
        "step": None if record.step is None else record.step + 1, "node": record.node,
        "submitted": record.submitted_ms, "started": record.start_ms,
        "finished": record.end_ms, "reason": record.reason,
        "log": session.farm.log_path(record),
    }


@cli.command()
@click.option("--state", "states", multiple=True,
              type=click.Choice([state.value for state in JobState]),
              help="Only jobs in this state (repeatable).")
@click.option("--user", help="Only this user's jobs.")
@click.option("--mine", is_flag=True, help="Only your jobs (the Redis user you sign in as; "
              "on a farm without ACL users, $CELERYFARM_USER or your login).")
@click.option("--limit", type=click.IntRange(1), help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one job per line.")
@pass_session
def jobs(session: Session, states: tuple[str, ...], user: str | None, mine: bool,
         limit: int | None, as_json: bool) -> None:
    """List the farm's jobs, newest first: those that finished within the last
    CELERYFARM_KEEP_DAYS days, and every job still waiting or running."""
    filters: list[dict[str, Any]] = []
    if states:
        filters.append({"state": list(states)})
    if user or mine:
        filters.append({"user": user or session.farm.user})
    records = session.farm.jobs(filters)[:limit]
    if as_json:
        for record in records:
            click.echo(json.dumps(_as_json(session, record)))
        return
    rows = [
        [short_id(r.job_id), r.spec.name, r.state, describe_frames(r.spec.frames), _progress(r),
         when(r.submitted_ms, True), when(r.end_ms, True), r.node or "-",
         session.farm.log_path(r) or "-"]
        for r in records
    ]
    table(["ID", "NAME", "STATE", "FRAMES", "PROGRESS", "SUBMITTED", "FINISHED", "NODE", "LOG"],
          rows, state_col=2)
    click.echo(f"History: jobs that finished in the last {session.settings.keep_days:g} days "
               f"(CELERYFARM_KEEP_DAYS); older ones have left the farm's records, their "
               f"render logs stay on the shared mount.", err=True)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_session
def status(session: Session, job_id: str, as_json: bool) -> None:
    """Show one job: state, current step, node, times, log. JOB_ID may be a prefix."""
    record = session.record(job_id)
    info = _as_json(session, record)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    step = f"{info['step'] or '-'}/{info['steps']}"
    lines = [
        ("id", record.job_id), ("name", record.spec.name), ("state", styled_state(record.state)),
        ("frames", describe_frames(record.spec.frames)),
        ("progress", _progress(record)),
        ("step", step), ("node", record.node or "-"),
        ("attempt", str(record.attempt)),
        ("try", _tries(record)),
        ("bad nodes", ", ".join(f"{node} ({record.bad_nodes[node]} failed tries)"
                                for node in bad_nodes(record.bad_nodes)) or "-"),
        ("submitted", f"{when(record.submitted_ms)} by {record.spec.user}@{record.spec.host}"),
        ("started", when(record.start_ms)), ("finished", when(record.end_ms)),
        ("pool", f"{record.spec.queue}, priority {record.spec.priority}"),
        ("render type", record.spec.render_type), ("log", info["log"] or "-"),
    ]
    if record.reason:
        lines.append(("reason", record.reason))
    for label, value in lines:
        click.echo(f"{label + ':':<13}{value}")


def _tries(record: JobRecord) -> str:
    """``try 2 of 4, 1 licence wait, 1 node lost`` for the current step."""
    parts = [try_label(record.failures, record.spec.retries)]
    for count, one, many in ((record.licence_waits, "licence wait", "licence waits"),
                             (record.lost, "node lost", "nodes lost")):
        if count:
            parts.append(f"{count} {one if count == 1 else many}")
    return ", ".join(parts)


@cli.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing as the log grows, until the job ends.")
@pass_session
def log(session: Session, job_id: str, follow: bool) -> None:
    """Print a job's render log. JOB_ID may be a prefix."""
    from .renderlog import follow as follow_log

    full_id = session.resolve(job_id)
    path = session.farm.log_file(full_id)
    if path is None:
        raise FarmError(f"the shared root {session.settings.shared_root} is not reachable "
                        f"from this host (set {PREFIX}SHARED_ROOT)")
    out = click.get_binary_stream("stdout")
    if not follow:
        try:
            out.write(Path(path).read_bytes())
        except FileNotFoundError:
            raise FarmError(f"the render log {path} does not exist (yet)") from None
        return
    with _quiet_interrupt():
        follow_log(Path(path), out, finished=lambda: session.farm.get(full_id).finished)


@contextmanager
def _quiet_interrupt() -> Iterator[None]:
    """Ctrl-C ends a follow quietly, as it ends ``tail -f``."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)


# -- limits ----------------------------------------------------------------------------------
@cli.group()
def user() -> None:
    """Artists' Redis users, on a farm with ACL users (an admin's commands)."""


@user.command(name="add")
@click.argument("name")
@click.option("--wrangler", is_flag=True,
              help="Let the artist also stop and restart every other artist's job.")
@pass_session
def user_add(session: Session, name: str, wrangler: bool) -> None:
    """Make artist NAME's Redis user (again, with a new password, if it exists), and
    print the settings to hand to that artist's workstation: they hold the password.

    A job's user is the Redis user its workstation authenticated as; the artist reads
    every job and may stop or restart only their own (all, with --wrangler).
    """
    from . import acl

    admin_url = session.admin_url()
    settings = session.local_settings
    # The sentinels' password: this environment's, or that of the farm `up` runs here.
    sentinel_password = session.settings.sentinel_password
    artist = acl.artist_user(acl.check_name(name), settings, wrangler)
    for admin in _every_server_as_admin(session):
        acl.set_user(admin, artist)
    click.echo(f"# {name}'s settings{' (a wrangler)' if wrangler else ''}: hand them to "
               f"that workstation only; they hold {name}'s password.")
    values = {PREFIX + "BROKER_URL": artist.url(admin_url)}
    if settings.key_prefix != Settings().key_prefix:
        values[PREFIX + "KEY_PREFIX"] = settings.key_prefix
    if uses_sentinel(admin_url):
        if settings.sentinel_master != Settings().sentinel_master:
            values[PREFIX + "SENTINEL_MASTER"] = settings.sentinel_master
        if sentinel_password:
            values[PREFIX + "SENTINEL_PASSWORD"] = sentinel_password
    for variable, value in values.items():
        click.echo(f"export {variable}={shlex.quote(value)}")
    click.echo(f"# and {PREFIX}SHARED_ROOT: where that workstation mounts the shared folder")


@user.command(name="remove")
@click.argument("name")
@pass_session
def user_remove(session: Session, name: str) -> None:
    """Remove artist NAME's Redis user: their workstation can no longer reach the farm
    (Redis closes its connections at once). Their jobs stay, as history."""
    from . import acl

    removed = [acl.delete_user(admin, name) for admin in _every_server_as_admin(session)]
    if not any(removed):
        raise FarmError(f"no user {name!r} on the farm's Redis")
    click.echo(f"removed {name}")


@user.command(name="refresh")
@pass_session
def user_refresh(session: Session) -> None:
    """Give every artist's Redis user the rules this version of celeryfarm makes (after
    an upgrade), keeping their passwords and whether each is a wrangler."""
    from . import acl

    settings = session.local_settings
    refreshed: dict[str, bool] = {}
    for admin in _every_server_as_admin(session):
        for name, wrangler in acl.artists(admin, settings):
            acl.refresh_user(admin, name, acl.artist_rules(name, settings, wrangler))
            refreshed[name] = wrangler
    if not refreshed:
        raise FarmError(f"no artist's user of the key prefix {settings.key_prefix!r} on the "
                        f"farm's Redis (is {PREFIX}KEY_PREFIX the farm's?)")
    for name, wrangler in sorted(refreshed.items()):
        click.echo(f"refreshed {name}{'  (wrangler)' if wrangler else ''}")


@user.command(name="list")
@pass_session
def user_list(session: Session) -> None:
    """The artists' Redis users (the farm's roles left out); wranglers are marked."""
    from . import acl

    for admin in _every_server_as_admin(session):  # the primary's users, as every server's
        for name, wrangler in acl.artists(admin, session.local_settings):
            click.echo(f"{name}{'  (wrangler)' if wrangler else ''}")
        break


def _every_server_as_admin(session: Session) -> Iterator[redis.Redis]:
    """Clients of every server of the farm's Redis as its admin (users are not replicated:
    each replica has its own), each closed after use."""
    from . import redisclient

    settings = session.local_settings
    for admin in redisclient.every_server(
            session.admin_url(), settings.tls, settings.sentinel_master,
            session.settings.sentinel_password, socket_connect_timeout=5, socket_timeout=10):
        try:
            yield admin
        finally:
            admin.close()


@cli.group()
def limit() -> None:
    """Limits: how many running steps may hold a unit (a licence) at once."""


@limit.command(name="set")
@click.argument("name")
@click.argument("units", type=click.IntRange(0))
@pass_session
def limit_set(session: Session, name: str, units: int) -> None:
    """Let at most UNITS running steps hold limit NAME (jobs ask with --limit NAME)."""
    from .jobs import limit_names

    (name,) = limit_names([name])
    session.admin_farm.store.set_limit(name, units)
    click.echo(f"limit {name}: {units} unit(s)")


@limit.command(name="list")
@pass_session
def limit_list(session: Session) -> None:
    """List the limits: units, and units held by running steps now."""
    limits = session.farm.store.limits()
    if not limits:
        click.echo("(no limits)")
        return
    width = max(len(name) for name in limits)
    click.echo(f"{'NAME':<{width}}  UNITS  IN USE")
    for name, (units, held) in limits.items():
        click.echo(f"{name:<{width}}  {units:<5}  {held}")


# -- metrics -----------------------------------------------------------------------------------
@cli.command()
@click.option("--port", "-p", default=9808, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: loopback unless told (the metrics need no login).")
@pass_session
def metrics(session: Session, port: int, host: str) -> None:
    """Serve the farm's Prometheus metrics on http://HOST:PORT/metrics until Ctrl-C."""
    from .metrics import serve

    try:
        serve(session.farm, session.settings.lease_seconds, port, host)
    except OSError as error:
        raise FarmError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    click.echo(f"serving the farm's metrics on http://{host}:{port}/metrics", err=True)
    with _quiet_interrupt():
        while True:
            signal.pause()


# -- render nodes ----------------------------------------------------------------------------
def _nodes(session: Session) -> Any:
    from .nodes import Nodes

    farm = session.admin_farm  # draining, enabling and forgetting are an admin's
    return Nodes(farm.store, farm.app, session.settings.lease_seconds)


def _steps(task_ids: Sequence[str]) -> str:
    """``3fa2c1d0 step 2`` for each running step's task id (``JOB-ATTEMPT.DISPATCH-STEP``)."""
    from .dispatch import step_of

    return ", ".join(f"{task_id[:8]} step {step_of(task_id) + 1}" for task_id in task_ids)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one node per line.")
@pass_session
def nodes(session: Session, as_json: bool) -> None:
    """List the render nodes: pools, running steps, last seen, state (up, drained, lost)."""
    found = _nodes(session).list()
    if as_json:
        for node in found:
            click.echo(json.dumps({"name": node.name, "pools": list(node.pools),
                                   "running": list(node.running), "last_seen": node.last_seen_ms,
                                   "state": node.state}))
        return
    if not found:
        click.echo("(no render nodes)")
        return
    table(["NAME", "POOLS", "RUNNING", "LAST SEEN", "STATE"],
          [[n.name, ",".join(n.pools), _steps(n.running) or "-", when(n.last_seen_ms, True),
            n.state] for n in found], state_col=4)


def _node_control(name: str, done: str, help_text: str) -> click.Command:
    """``drain`` and ``enable``: change a node's drained state, then say what became of it."""

    @cli.command(name=name, help=help_text)
    @click.argument("node")
    @pass_session
    def command(session: Session, node: str) -> None:
        info, answered = getattr(_nodes(session), name)(node)
        click.echo(f"{info.name} {done}" + ("" if answered else
                   " (it did not answer: it applies this when it next starts)"))

    return command


drain = _node_control("drain", "drained: it finishes what it runs and takes nothing new",
                      "Drain a render node (NAME or NAME@HOST): it finishes its running steps "
                      "and takes no new ones, also after a restart, until `enable`.")
enable = _node_control("enable", "enabled: it takes steps again",
                       "Let a drained render node take steps again.")


@cli.command()
@click.argument("node")
@pass_session
def forget(session: Session, node: str) -> None:
    """Forget a render node that is gone (NAME or NAME@HOST): a retired machine, or a
    container made again under a new name. It must have been silent for a lease period."""
    info = _nodes(session).forget(node)
    click.echo(f"{info.name} forgotten")


def _job_control(name: str, method: str, help_text: str) -> click.Command:
    """A command that calls the farm's ``method`` (stop, start) on one job, as Katana's
    buttons do through the plug-in, then says the job's state."""

    @cli.command(name=name, help=help_text)
    @click.argument("job_id")
    @pass_session
    def command(session: Session, job_id: str) -> None:
        _report(getattr(session.farm, method)(session.resolve(job_id)))

    return command


stop = _job_control("stop", "stop",
                    "Stop a waiting or running job (its render processes are killed).")
start = _job_control("start", "start",
                     "Start a finished, failed or stopped job again (a new attempt, same id).")


def _report(record: JobRecord) -> None:
    click.echo(f"job {short_id(record.job_id)} '{record.spec.name}': {styled_state(record.state)}"
               + (f" (attempt {record.attempt})" if record.attempt > 1 else ""))


def main() -> None:
    cli(prog_name="celeryfarm")


if __name__ == "__main__":
    main()
