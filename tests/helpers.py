"""Helpers: submitting through the farm core, driving the plug-in the way Katana does (for the
tests about the plug-in), and watching processes."""

from __future__ import annotations

import base64
import shlex
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, TypeVar

import kombu
import psutil

from celeryfarm.farm import Farm
from celeryfarm.farmapi import Job
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.rescue import UNACKED

T = TypeVar("T")
FINISHED = (Job.State.kCompleted, Job.State.kFailed, Job.State.kCancelled)


def http_status(url: str, auth: tuple[str, str] | None = None, method: str = "GET",
                headers: dict[str, str] | None = None, timeout: float = 10) -> int:
    """The HTTP status of a request (basic auth with ``auth``); 0 if nothing answers."""
    request = urllib.request.Request(url, method=method, headers=headers or {},
                                     data=b"" if method == "POST" else None)
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0  # not listening (yet)


def renderboot(*args: object) -> list[str]:
    """argv of the stand-in renderboot."""
    return [sys.executable, "-m", "celeryfarm.testing.renderboot", *map(str, args)]


def wait_until(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_for_state(plugin: CeleryFarmPlugin, job_id: str, states=FINISHED, timeout=60.0) -> str:
    states = (states,) if isinstance(states, str) else states
    return wait_until(
        lambda: (state := plugin.getJobState(job_id)) in states and state,
        timeout, f"job {job_id} to be {'/'.join(states)}",
    )


def submit(
    farm: Farm,
    commands: list,
    name: str = "Render",
    render_type: str = "Disk",
    settings: dict | None = None,
    frames: Iterable[int] = range(1, 4),
) -> tuple[str, str]:
    """Submit argv lists through the farm core, as the command line does; return (job id,
    the render's folder on this host)."""
    context = farm.create_context()
    job_id = farm.submit_commands(commands, context=context.name, name=name, frames=frames,
                                  render_type=render_type, settings=settings).job_id
    return job_id, str(context.folder)


class KatanaJobRequest:
    """A job request shaped as Katana 5's ``FarmPluginManager.JobRequest``, and nothing more:
    the plug-in must read Katana's own objects, not our stand-in's."""

    def __init__(self, nodeName, renderContextName, frames, commands, environment, tempDir):
        self.nodeName, self.renderContextName, self.frames = nodeName, renderContextName, frames
        self.commands, self.environment, self.tempDir = commands, environment, tempDir


def submit_like_katana(
    plugin: CeleryFarmPlugin,
    commands: list[str],
    node_name: str = "Render",
    frames: Iterable[int] = range(1, 4),
    scene: Path | None = None,
    environment: dict | None = None,
) -> tuple[str, str]:
    """Go through the plug-in in Katana's order with command-line strings; return (job id,
    the temp folder createTemporaryDirectory returned)."""
    context = str(uuid.uuid4())
    temp_dir = plugin.createTemporaryDirectory(context)
    if scene is not None:
        copied = plugin.copyRenderFiles([str(scene)], context)
        assert Path(copied[str(scene)]).read_bytes() == scene.read_bytes()
    metadata = plugin.getRemoteInstallationMetadata()
    assert metadata.katanaRoot
    job_environment = {**plugin.getEnvironmentForJob(context), **(environment or {})}
    request = KatanaJobRequest(node_name, context, list(frames), commands, job_environment,
                               temp_dir)
    return plugin.submitJob(request), temp_dir


def command_line(argv: list) -> str:
    """One command-line string, as Katana's requests carry commands."""
    return shlex.join(map(str, argv))


def read_log(plugin: CeleryFarmPlugin, job_id: str) -> bytes:
    return Path(plugin.getRenderLogFilename(job_id)).read_bytes()


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose command line carries ``tag``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if tag in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def assert_never_two_current(events: list[dict]) -> None:
    """Check a job's execution history: no step ever had two current executions.

    Events come in the order Redis applied them; an execution is current from its ``start``
    until its ``end`` or ``lost``.
    """
    current: dict[tuple[int, int], str] = {}
    for event in events:
        key = (event["attempt"], event["step"])
        if event["event"] == "start":
            assert key not in current, (
                f"attempt {key[0]} step {key[1]} started as {event['owner']} while "
                f"{current.get(key)} was current: {events}")
            current[key] = event["owner"]
        elif current.get(key) == event["owner"]:
            del current[key]


def pids_of(procs: list) -> set[int]:
    return {proc.pid for proc in procs}


def all_gone(pids: set[int]) -> bool:
    """Whether none of ``pids`` is a live (non-zombie) process any more."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def closing_a_channel_let_go(farm: Farm) -> None:
    """Seen in CI's failover test: a node's consumer let its broker connection go, then
    closed its channel with a delivery unacknowledged; kombu's restore of it failed with an
    AttributeError, which Celery takes for an unrecoverable error, and the node stopped for
    good. The close must not raise, and the delivery stays set aside in Redis (kombu's
    unacked hash), where the reapers find it."""
    queue = f"closing-{uuid.uuid4().hex[:8]}"
    with farm.app.connection_for_write() as connection:
        channel = connection.channel()
        kombu.Producer(channel).publish({"step": 1}, routing_key=queue,
                                        declare=[kombu.Queue(queue)])
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None
        transport = channel.connection
        kept, transport.client = transport.client, None  # the connection let go first
        try:
            channel.close()  # raised AttributeError: 'NoneType' ... 'hostname'
            # Its step ends afterwards (a render the pool ran on): the acknowledgement raised
            # AttributeError: 'NoneType' ... 'client' (CI's failover test, later).
            message.ack()
        finally:
            transport.client = kept
    unacked = farm.settings.broker_key_prefix + UNACKED
    assert farm.store.redis.hexists(unacked, message.delivery_tag)
