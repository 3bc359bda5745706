"""The render-node image and docker-compose.yml, with real containers.

Jobs are submitted from this host through the Katana plug-in, exactly as Katana would, and run
in containers of ``celeryfarm-worker`` that see this test's shared folder at ``/shared``:

* pytest-celery's Docker API (``celery_setup``) runs two render nodes from our image with
  Redis containers (from our local Redis image) as broker and result backend, and kills one
  mid-render;
* the real docker-compose.yml runs Redis, Flower and two or three render nodes under a
  compose project name of the test's own, and stops one mid-render.

The images are (re)built first with worker_image/build.sh (seconds when nothing changed), so
the containers run this checkout's code. Without a Docker engine these tests are skipped, or
fail when ``CI`` is set (CI must not pass by skipping them): in CI the engine is installed and
started with .ci/docker-engine.sh first.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis
from pytest_celery import (
    CeleryBackendCluster,
    CeleryBrokerCluster,
    CeleryTestSetup,
    CeleryTestWorker,
    CeleryWorkerCluster,
)
from pytest_celery.vendors.worker.container import CeleryWorkerContainer
from pytest_docker_tools import container, fxtr

from celeryfarm.config import Settings
from celeryfarm.errors import FarmError
from celeryfarm.farm import Farm
from celeryfarm.farmapi import Job
from celeryfarm.localfarm import check_redis
from celeryfarm.plugin import CeleryFarmPlugin
from celeryfarm.tls import Tls

from .helpers import (
    FINISHED,
    KatanaJobRequest,
    command_line,
    http_status,
    wait_for_state,
    wait_until,
)
from .test_secrets import HUNT, report

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

State = Job.State
REPO = Path(__file__).resolve().parents[1]
WORKER_IMAGE = os.environ.get("CELERYFARM_WORKER_IMAGE", "celeryfarm-worker:latest")
REDIS_IMAGE = os.environ.get("CELERYFARM_REDIS_IMAGE", "redis:7-bookworm")
#: The uid/gid render nodes run as. As root, the image's own non-root user, sharing a group
#: with this process (setgid shared folder, umask 002), as a studio would set it up. As
#: another user, that user, so its files and the nodes' files have one owner.
RENDER_UID, RENDER_GID = (1000, 1000) if os.getuid() == 0 else (os.getuid(), os.getgid())
#: Short timings so stops resolve quickly and a lost node's step moves on within seconds.
NODE_ENV = {
    "CELERYFARM_POLL_SECONDS": "0.1",
    "CELERYFARM_STOP_GRACE_SECONDS": "1",
    "CELERYFARM_LEASE_SECONDS": "5",
    "CELERYFARM_REAP_SECONDS": "0.5",
}
#: The image's node command (``celeryfarm worker``, node name ``render@<container>``).
NODE_COMMAND = ["celeryfarm", "worker", "--queues=renders", "--concurrency=1"]


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: a CI run must not go green by skipping these tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=REPO, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        pytest.fail(f"{' '.join(argv)} exited with {result.returncode}:\n{output}",
                    pytrace=False)
    return result


def engine_answers() -> str:
    """"" if the Docker engine answers, else why not."""
    try:
        docker.from_env().ping()
    except Exception as error:
        return str(error)
    return ""


@pytest.fixture(scope="session", autouse=True)
def images() -> None:
    """A running engine and current images, before any container fixture touches Docker."""
    problem = engine_answers()
    if problem and os.environ.get("CI"):
        run([str(REPO / ".ci/docker-engine.sh")], timeout=600, check=False)
        problem = engine_answers()
    if problem:
        unavailable(f"no Docker engine ({problem}); start one with .ci/docker-engine.sh")
    if os.environ.get("CELERYFARM_TEST_BUILD_IMAGES", "1") != "0":
        run([str(REPO / "worker_image/build.sh")], timeout=900)
    client = docker.from_env()
    for image in (WORKER_IMAGE, REDIS_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            unavailable(f"image {image} is missing; build it with worker_image/build.sh")


def test_pip_in_the_build_container_honours_a_constraints_file_named_by_pip_conf(tmp_path):
    """The image's wheels are made by pip in a container: a constraints file that the host's
    pip configuration names (here in a folder nothing else mounts) must reach that pip. With
    six pinned to 1.16.0, an unpinned download would get a newer release."""
    pins = tmp_path / "site-pip"
    pins.mkdir()
    (pins / "constraints.txt").write_text("six==1.16.0\n")
    (pins / "pip.conf").write_text(f"[global]\nconstraint = {pins}/constraints.txt\n")
    env = {**os.environ, "PIP_CONFIG_FILE": str(pins / "pip.conf")}
    result = run([str(REPO / "worker_image/pip-in-base.sh"),
                  "$PIP download --no-deps --dest /tmp/got six; ls /tmp/got"],
                 timeout=300, env=env)
    assert result.stdout.split()[-1] == "six-1.16.0-py2.py3-none-any.whl", result.stdout


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """The farm's shared folder, writable by the nodes; this process writes group-writable
    files into it while the test runs (as Katana hosts sharing a group with nodes would)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if os.getuid() == 0:
        os.chown(shared, RENDER_UID, RENDER_GID)
    shared.chmod(0o2775)
    previous = os.umask(0o002)
    try:
        yield shared
    finally:
        os.umask(previous)


def host_plugin(broker_url: str, backend_url: str, shared: Path,
                tls: Tls | None = None, sentinel_password: str = "") -> CeleryFarmPlugin:
    """The plug-in as a Katana host builds it: the farm's URLs as this host reaches them
    (with its TLS files for rediss://, the sentinels' password for sentinel://), and the
    shared folder as this host and as the nodes see it."""
    farm = Settings(broker_url=broker_url, result_backend=backend_url, shared_root=shared,
                    remote_shared_root=Path("/shared"), tls=tls or Tls(),
                    sentinel_password=sentinel_password)
    env = {**farm.client_environment(), "CELERYFARM_USER": f"artist-{uuid.uuid4().hex[:8]}",
           **NODE_ENV}
    return CeleryFarmPlugin(Farm(Settings.from_env(env)))


def submit(plugin: CeleryFarmPlugin, context: str, *renderboot_args: object,
           steps: int = 1) -> str:
    """Submit a job through the farm core in render context ``context``; its renders write
    frames to <context>/img."""
    render = plugin.farm.create_context(name=context)
    assert render.node_folder == f"/shared/{context}"  # the context folder as the nodes see it
    command = ["python", "-m", "celeryfarm.testing.renderboot", "--frames", "1-3",
               "--output", f"{render.node_folder}/img", *map(str, renderboot_args)]
    return plugin.farm.submit_commands([command] * steps, context=context, name=context,
                                       frames=range(1, 4)).job_id


def render_log(plugin: CeleryFarmPlugin, job_id: str) -> str:
    return Path(plugin.getRenderLogFilename(job_id)).read_text(errors="replace")


def finished(plugin: CeleryFarmPlugin, job_id: str, timeout: float = 120.0) -> str:
    try:
        return wait_for_state(plugin, job_id, FINISHED, timeout)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- render log ---\n{render_log(plugin, job_id)}") \
            from None


def assert_frames(shared: Path, context: str) -> None:
    frames = sorted((shared / context / "img").glob("frame.*.ppm"))
    assert [f.name for f in frames] == [f"frame.000{n}.ppm" for n in (1, 2, 3)]
    for frame in frames:
        assert frame.read_bytes().startswith(b"P6 64 64 255\n")
        assert frame.stat().st_uid == RENDER_UID  # written by the node, read by this host


# -- (a) pytest-celery: two render nodes from our image --------------------------------------


class RenderNodeContainer(CeleryWorkerContainer):
    """pytest-celery's worker container, for the celeryfarm-worker image and its app."""

    @classmethod
    def command(cls, *args: str, **kwargs: object) -> list[str]:
        return [*NODE_COMMAND, *args]

    @classmethod
    def worker_name(cls) -> str:
        return "render"

    @classmethod
    def worker_queue(cls) -> str:
        return "renders"


@pytest.fixture
def default_redis_broker_image() -> str:
    return REDIS_IMAGE


@pytest.fixture
def default_redis_backend_image() -> str:
    return REDIS_IMAGE


@pytest.fixture
def default_redis_broker_ports() -> dict:
    return {"6379/tcp": ("127.0.0.1",)}  # a free port, on loopback only


@pytest.fixture
def default_redis_backend_ports() -> dict:
    return {"6379/tcp": ("127.0.0.1",)}


@pytest.fixture
def celery_broker_cluster(celery_redis_broker) -> Iterator[CeleryBrokerCluster]:
    cluster = CeleryBrokerCluster(celery_redis_broker)
    yield cluster
    cluster.teardown()


@pytest.fixture
def celery_backend_cluster(celery_redis_backend) -> Iterator[CeleryBackendCluster]:
    cluster = CeleryBackendCluster(celery_redis_backend)
    yield cluster
    cluster.teardown()


@pytest.fixture
def node_losses() -> int:
    """CELERYFARM_MAX_NODE_LOSSES of the nodes (a test may parametrize it)."""
    return 3


@pytest.fixture
def render_node_env(celery_worker_cluster_config: dict, node_losses: int) -> dict[str, str]:
    """What the node needs at run time: the broker and backend as containers reach them."""
    broker = celery_worker_cluster_config["celery_broker_cluster_config"]["urls"][0]
    backend = celery_worker_cluster_config["celery_backend_cluster_config"]["urls"][0]
    return {"CELERYFARM_BROKER_URL": broker, "CELERYFARM_RESULT_BACKEND": backend,
            "CELERYFARM_MAX_NODE_LOSSES": str(node_losses), **NODE_ENV}


@pytest.fixture
def render_node_volumes(shared_dir: Path) -> dict:
    return {str(shared_dir): {"bind": "/shared", "mode": "rw"}}


NODE_CONTAINER = {
    "image": WORKER_IMAGE,
    "environment": fxtr("render_node_env"),
    "network": "{default_pytest_celery_network.name}",
    "volumes": fxtr("render_node_volumes"),
    "user": f"{RENDER_UID}:{RENDER_GID}",
    "wrapper_class": RenderNodeContainer,
    "timeout": 90,
    "command": NODE_COMMAND,
}
# Replaces pytest-celery's default worker container (its own image and app) with ours, and
# adds a second node: a lost node's step needs another node to move to.
default_worker_container = container(**NODE_CONTAINER)
second_worker_container = container(**NODE_CONTAINER)


@pytest.fixture
def second_worker(second_worker_container, default_worker_app) -> Iterator[CeleryTestWorker]:
    worker = CeleryTestWorker(container=second_worker_container, app=default_worker_app)
    yield worker
    worker.teardown()


@pytest.fixture
def celery_worker_cluster(celery_setup_worker, second_worker) -> Iterator[CeleryWorkerCluster]:
    cluster = CeleryWorkerCluster(celery_setup_worker, second_worker)
    yield cluster
    cluster.teardown()


def node_names(setup: CeleryTestSetup) -> set[str]:
    return {worker.hostname() for worker in setup.worker_cluster}


def published_url(node) -> str:
    """The Redis URL of a pytest-celery Redis node as this host reaches it: its published
    loopback port. (Not ``config()["host_url"]``: pytest-docker-tools thinks it runs inside a
    container when /.dockerenv exists, as on CI machines made from an image, and then
    reports the container port instead of the published one.)"""
    node.container.reload()
    return f"redis://127.0.0.1:{node.container.ports['6379/tcp'][0]}/0"


@pytest.fixture
def setup_plugin(celery_setup: CeleryTestSetup, shared_dir: Path) -> CeleryFarmPlugin:
    return host_plugin(published_url(celery_setup.broker), published_url(celery_setup.backend),
                       shared_dir)


def test_jobs_submitted_from_the_host_render_in_the_worker_containers(
    celery_setup: CeleryTestSetup, setup_plugin: CeleryFarmPlugin, shared_dir: Path
):
    nodes = node_names(celery_setup)  # render@<container hostname>, one per container
    assert len(nodes) == 2
    wait_until(lambda: nodes <= {name for reply in setup_plugin.farm.app.control.ping(timeout=1)
                                 for name in reply}, timeout=60, what="both nodes to answer")
    jobs = {
        "shot010": submit(setup_plugin, "shot010", "--seconds", 1, steps=2),
        "shot020": submit(setup_plugin, "shot020", "--seconds", 0.5, "--children", 2),
        "shot030": submit(setup_plugin, "shot030", "--seconds", 0.5, "--exit-code", 3),
    }
    states = {context: finished(setup_plugin, job_id) for context, job_id in jobs.items()}
    assert states == {"shot010": State.kCompleted, "shot020": State.kCompleted,
                      "shot030": State.kFailed}
    for context in ("shot010", "shot020"):
        assert_frames(shared_dir, context)
    log = render_log(setup_plugin, jobs["shot010"])
    ran_on = [node for node in nodes for _ in range(log.count(f"node {node}"))]
    assert len(ran_on) == 2, log  # both steps, each on one of the containers' nodes
    assert "step 2/2 | exit status 0" in log
    assert "exit status 3" in render_log(setup_plugin, jobs["shot030"])
    assert "exit status 3" in setup_plugin.farm.get(jobs["shot030"]).reason


def kill_node_running(setup: CeleryTestSetup, plugin: CeleryFarmPlugin, job_id: str) -> str:
    """Wait until the job's render runs, then SIGKILL that node's whole container (a lost
    node: no celery process of it survives to report anything). Returns its nodename."""
    wait_until(lambda: "rendering frames" in render_log(plugin, job_id), timeout=60,
               what="the render to start in a container")
    victim = plugin.farm.get(job_id).node
    (worker,) = [w for w in setup.worker_cluster if w.hostname() == victim]
    worker.container.kill()
    return victim


def test_a_killed_worker_container_s_step_completes_on_the_other_node(
    celery_setup: CeleryTestSetup, setup_plugin: CeleryFarmPlugin, shared_dir: Path
):
    job_id = submit(setup_plugin, "shot040", "--seconds", 4, "--children", 1)
    victim = kill_node_running(celery_setup, setup_plugin, job_id)
    assert finished(setup_plugin, job_id, timeout=90) == State.kCompleted
    (survivor,) = node_names(celery_setup) - {victim}
    assert setup_plugin.farm.get(job_id).node == survivor
    log = render_log(setup_plugin, job_id)
    assert f"node {victim} lost while running step 1/1" in log, log
    assert "step 1/1 re-dispatched" in log and f"node {survivor}" in log
    assert_frames(shared_dir, "shot040")


@pytest.mark.parametrize("node_losses", [1])
def test_a_killed_worker_container_fails_the_job_when_no_loss_is_allowed(
    celery_setup: CeleryTestSetup, setup_plugin: CeleryFarmPlugin, node_losses: int
):
    job_id = submit(setup_plugin, "shot060", "--seconds", 300)
    victim = kill_node_running(celery_setup, setup_plugin, job_id)
    assert finished(setup_plugin, job_id, timeout=90) == State.kFailed
    reason = setup_plugin.farm.get(job_id).reason
    assert "lost on 1 node" in reason, reason
    log = render_log(setup_plugin, job_id)
    assert f"node {victim} lost while running step 1/1" in log
    assert f"job failed: {reason}" in log


# -- (b) the real docker-compose.yml ---------------------------------------------------------


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    unavailable("neither docker-compose nor the docker compose plug-in is installed")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComposeFarm:
    """One docker-compose project of the real docker-compose.yml, with its own name, ports,
    passwords and shared folder."""

    def __init__(self, tmp_path: Path, shared: Path, files: tuple[str, ...] = (),
                 **settings: object) -> None:
        self.project = f"cfarmtest{uuid.uuid4().hex[:10]}"
        self.shared = shared
        self.redis_port, self.flower_port = free_port(), free_port()
        self.passwords = {role: secrets.token_hex(16) for role in ("admin", "node", "flower")}
        self.flower_auth = ("admin", secrets.token_hex(12))
        katana = tmp_path / "katana"
        katana.mkdir()
        values = {
            **{f"CELERYFARM_REDIS_{role.upper()}_PASSWORD": password
               for role, password in self.passwords.items()},
            "CELERYFARM_FLOWER_USER": self.flower_auth[0],
            "CELERYFARM_FLOWER_PASSWORD": self.flower_auth[1],
            "CELERYFARM_REDIS_PORT": self.redis_port,
            "CELERYFARM_FLOWER_PORT": self.flower_port,
            "CELERYFARM_HOST_SHARED_ROOT": shared,
            "CELERYFARM_HOST_KATANA_ROOT": katana,
            "CELERYFARM_RENDER_UID": RENDER_UID,
            "CELERYFARM_RENDER_GID": RENDER_GID,
            "CELERYFARM_WORKER_IMAGE": WORKER_IMAGE,
            "CELERYFARM_REDIS_IMAGE": REDIS_IMAGE,
            "CELERYFARM_WORKER_STOP_GRACE_PERIOD": "10s",
            # These tests' renders are Python (the stand-in renderboot, and probes).
            "CELERYFARM_ALLOWED_PROGRAMS": "/opt/celeryfarm/bin/python*",
            **NODE_ENV,
            **settings,
        }
        env_file = tmp_path / "compose.env"
        env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
        self.tls = "docker-compose.tls.yml" in files
        self.base = [*compose_command(), "--project-name", self.project,
                     "--file", str(REPO / "docker-compose.yml"),
                     *[arg for name in files for arg in ("--file", str(REPO / name))],
                     "--env-file", str(env_file)]
        # Only the env file configures the project, not this shell's CELERYFARM_* or COMPOSE_*.
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith(("CELERYFARM_", "COMPOSE_"))}
        self.docker = docker.from_env()

    def compose(self, *args: str, timeout: float = 300, check: bool = True):
        return run([*self.base, *args], timeout=timeout, env=self.env, check=check)

    @property
    def broker_url(self) -> str:
        """The host's URL of the farm's Redis, as its admin (who may ping the nodes)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://admin:{self.passwords['admin']}@127.0.0.1:{self.redis_port}/0"

    def containers(self, service: str = "") -> list:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.docker.containers.list(all=True, filters={"label": labels})

    def flower_status(self, auth: tuple[str, str] | None) -> int:
        return http_status(f"http://127.0.0.1:{self.flower_port}/", auth, timeout=5)

    def health(self) -> dict[str, str]:
        found = {}
        for box in self.containers():
            box.reload()
            if box.labels.get("com.docker.compose.service") == "preflight":
                # The one-shot password check: healthy means it ran and passed.
                state = box.attrs["State"]
                passed = state["Status"] == "exited" and state["ExitCode"] == 0
                found[box.name] = "healthy" if passed else f"preflight {state['Status']}"
            else:
                found[box.name] = box.attrs["State"].get("Health", {}).get("Status", "none")
        return found

    def leftovers(self) -> list[str]:
        label = {"label": f"com.docker.compose.project={self.project}"}
        return ([f"container {c.name}" for c in self.containers()]
                + [f"volume {v.name}" for v in self.docker.volumes.list(filters=label)]
                + [f"network {n.name}" for n in self.docker.networks.list(filters=label)])


@pytest.fixture
def compose_up(tmp_path: Path, shared_dir: Path) -> Iterator:
    """Start a compose project: ``compose_up(workers, **settings)``; always taken down."""
    farms: list[ComposeFarm] = []

    def up(workers: int, **settings: object) -> ComposeFarm:
        farm = ComposeFarm(tmp_path, shared_dir, **settings)
        farms.append(farm)
        farm.compose("up", "-d", "--no-build", "--scale", f"worker={workers}")
        return farm

    try:
        yield up
    finally:
        for farm in farms:
            farm.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)


def nodes_ready(farm: ComposeFarm, plugin: CeleryFarmPlugin, count: int) -> set[str]:
    """The worker containers' nodenames, once every one answers a ping from this host."""
    workers = farm.containers("worker")
    assert len(workers) == count
    nodes = {f"render@{box.attrs['Config']['Hostname']}" for box in workers}
    wait_until(lambda: nodes <= {name for reply in plugin.farm.app.control.ping(timeout=1)
                                 for name in reply},
               timeout=120, what=f"{sorted(nodes)} to answer a ping through the published port")
    return nodes


#: Node settings the README documents (farm-wide or "on a node") that the compose file's own
#: nodes do not take from .env, and why.
NOT_FROM_ENV = {
    "CELERYFARM_BROKER_URL": "each service's own credential, made from its password",
    "CELERYFARM_RESULT_BACKEND": "one Redis: the broker's",
    "CELERYFARM_STORE_URL": "one Redis: the broker's",
    "CELERYFARM_SENTINEL_MASTER": "docker-compose.sentinel.yml's",
    "CELERYFARM_SENTINEL_PASSWORD": "docker-compose.sentinel.yml's",
    "CELERYFARM_TLS_CA_FILE": "docker-compose.tls.yml's",
    "CELERYFARM_KATANA_ROOT": "where CELERYFARM_HOST_KATANA_ROOT is mounted",
    "CELERYFARM_RENDER_USER": "the image's `render` user",
    "CELERYFARM_ALLOW_ROOT": "compose nodes never run as root",
}


def test_every_node_setting_the_readme_documents_reaches_the_compose_nodes(
    tmp_path: Path, shared_dir: Path
):
    """Each setting the README's table says a node reads (farm-wide or "on a node"), set in
    .env, is in the worker containers' environment as compose renders it; a setting left out
    of the compose file would silently take its default on the compose nodes."""
    table = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("| `CELERYFARM_")]
    documented = {re.match(r"\| `(CELERYFARM_\w+)`", line).group(1) for line in table
                  if "*farm-wide*" in line or "on a node" in line}
    assert {"CELERYFARM_KEEP_DAYS", "CELERYFARM_RENDER_ENV"} <= documented  # the table parsed
    wanted = sorted(documented - set(NOT_FROM_ENV))
    markers = {name: f"marker-{name.lower()}" for name in wanted}
    farm = ComposeFarm(tmp_path, shared_dir, **markers)
    rendered = farm.compose("config", timeout=60).stdout
    worker = re.search(r"^  worker:\n(.*?)(?=^  \S|^\S)", rendered, re.M | re.S).group(1)
    missing = [name for name, marker in markers.items()
               if not re.search(rf"^\s+{name}: '?{marker}'?$", worker, re.M)]
    assert not missing, f"not given to the compose nodes: {missing}"


def test_compose_farm_runs_jobs_from_the_host_on_three_nodes(compose_up):
    farm = compose_up(3)
    plugin = host_plugin(farm.broker_url, farm.broker_url, farm.shared)
    nodes = nodes_ready(farm, plugin, 3)

    # Six 2-second jobs at once on three single-slot nodes: every node takes some.
    contexts = [f"seq{n:02d}" for n in range(6)]
    jobs = {context: submit(plugin, context, "--seconds", 2) for context in contexts}
    states = {context: finished(plugin, job_id) for context, job_id in jobs.items()}
    assert set(states.values()) == {State.kCompleted}, states
    used = set()
    for context, job_id in jobs.items():
        assert_frames(farm.shared, context)
        log = render_log(plugin, job_id)
        node = plugin.farm.get(job_id).node
        assert node in nodes and f"node {node}" in log, log
        used.add(node)
    assert used == nodes, f"jobs ran on {sorted(used)} of {sorted(nodes)}"
    # The host's view of the farm agrees.
    listed = {job.jobId: job for job in plugin.getJobs(None)}
    assert {job_id: listed[job_id].state for job_id in jobs.values()} == \
        {job_id: State.kCompleted for job_id in jobs.values()}

    assert farm.flower_status(None) == 401
    assert farm.flower_status(("admin", "wrong")) == 401
    assert wait_until(lambda: farm.flower_status(farm.flower_auth) == 200, timeout=60,
                      what="Flower to answer with basic auth")
    wait_until(lambda: set(farm.health().values()) == {"healthy"}, timeout=180,
               what="redis, flower and the three workers to be healthy")

    farm.compose("down", "-v", "--remove-orphans", "--timeout", "10")
    assert farm.leftovers() == []


@pytest.mark.parametrize(("stop_signal", "grace"), [("SIGQUIT", "30s"), ("SIGTERM", "3s")])
def test_compose_worker_stopped_mid_render_hands_its_step_to_another_node(
    compose_up, stop_signal: str, grace: str
):
    """`docker stop` on a node mid-render, with each CELERYFARM_WORKER_STOP_SIGNAL choice
    and a render longer than the stop grace period. SIGQUIT (cold shutdown): the render is
    stopped at once, the log says so and the step goes straight back to the queue. SIGTERM
    (warm shutdown): celery waits for the render, docker kills the container when the grace
    period ends, and the other node's reaper re-dispatches the step when its lease expires.
    Either way the other node renders it to completion."""
    farm = compose_up(2, CELERYFARM_WORKER_STOP_SIGNAL=stop_signal,
                      CELERYFARM_WORKER_STOP_GRACE_PERIOD=grace)
    plugin = host_plugin(farm.broker_url, farm.broker_url, farm.shared)
    nodes = nodes_ready(farm, plugin, 2)
    context = f"stop-{stop_signal.lower()}"
    job_id = submit(plugin, context, "--seconds", 8, "--children", 1)
    wait_until(lambda: "rendering frames" in render_log(plugin, job_id), timeout=60,
               what="the render to start")
    first = plugin.farm.get(job_id).node
    (box,) = [b for b in farm.containers("worker")
              if f"render@{b.attrs['Config']['Hostname']}" == first]
    stopping = time.monotonic()
    box.stop()  # the container's own stop signal and grace period, as docker-compose stop
    stop_seconds = time.monotonic() - stopping
    box.reload()
    killed = box.attrs["State"]["ExitCode"] == 137
    assert finished(plugin, job_id) == State.kCompleted
    log = render_log(plugin, job_id)
    (second,) = nodes - {first}
    assert plugin.farm.get(job_id).node == second and f"node {second}" in log
    if stop_signal == "SIGQUIT":
        assert not killed, f"the worker was killed after {stop_seconds:.1f} s ({grace} grace)"
        assert "stopped: the worker was told to terminate the step" in log
    else:
        assert killed, "the warm shutdown ended before the render could have"
        assert f"node {first} lost while running step 1/1" in log, log
    assert_frames(farm.shared, context)


def test_compose_studio_set_up_with_a_submitter_umask_of_022(tmp_path: Path):
    """The README's studio set-up: the shared folder belongs to the farm's group and is
    2775; this host (root, umask 022, as the issue found it failing) submits through the
    plug-in. The worker runs as the image's `node` user and its renders as `render`: they
    read the copied scene, write frames the farm's group shares, and find none of the
    node's secrets."""
    shared = tmp_path / "studio-shared"
    shared.mkdir()
    if os.getuid() == 0:
        os.chown(shared, 0, RENDER_GID)
    shared.chmod(0o2775)
    farm = ComposeFarm(tmp_path, shared)
    previous = os.umask(0o022)
    try:
        farm.compose("up", "-d", "--no-build", "--scale", "worker=1")
        plugin = host_plugin(farm.broker_url, farm.broker_url, shared)
        nodes_ready(farm, plugin, 1)
        context = "studio"
        temp_dir = plugin.createTemporaryDirectory(context)
        scene = tmp_path / "shot010.katana"
        scene.write_text("scene shot010 v3\n")
        (node_scene,) = plugin.copyRenderFiles([str(scene)], context).values()
        plugin.getRemoteInstallationMetadata()
        environment = {**plugin.getEnvironmentForJob(context),
                       "HUNT_ROOTS": "/shared:/home/node:/home/render:/tmp:/opt/celeryfarm"}
        frames = ["python", "-m", "celeryfarm.testing.renderboot", "--frames", "1-3",
                  "--output", f"/shared/{context}/img"]
        who = ["python", "-c", f"import os; print('scene:', open({node_scene!r}).read().strip())"
               "; print('ids', os.getuid(), os.stat(f'/proc/{os.getppid()}').st_uid)"]
        hunt = ["python", "-c", HUNT, farm.passwords["node"][::-1]]
        job_id = plugin.submitJob(KatanaJobRequest(
            "Render", context, [1, 2, 3], [command_line(c) for c in (frames, who, hunt)],
            environment, temp_dir))
        assert finished(plugin, job_id) == State.kCompleted, render_log(plugin, job_id)
        log = render_log(plugin, job_id)
        assert "scene: scene shot010 v3" in log
        renders_as, worker_as = re.search(r"^ids (\d+) (\d+)$", log, re.M).groups()
        assert int(renders_as) == RENDER_UID and int(worker_as) != RENDER_UID
        found = report(log.encode())
        assert found["found"] == [] and found["looked"] > 10
        folder = shared / context
        for path, mode in ((folder, 0o2775), (folder / "render.log", 0o664),
                           (folder / "shot010.katana", 0o664), (folder / "img", 0o2775),
                           (folder / "img" / "frame.0001.ppm", 0o664)):
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_gid) == (mode, RENDER_GID), path
    finally:
        os.umask(previous)
        farm.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)


def test_compose_tls_override_serves_redis_on_tls_only(tmp_path: Path, shared_dir: Path):
    """docker-compose.tls.yml with certificates from worker_image/make-certs.sh, mounted from
    a host folder: a job submitted from this host over rediss:// renders on a node that
    reached Redis over TLS; the published port speaks TLS only and refuses a client that
    does not trust the farm's CA; Flower and every container are healthy."""
    if os.getuid() != 0:
        unavailable("giving the keys to the containers' users (groups 999 and 1001) needs root")
    certs = tmp_path / "tls"
    run([str(REPO / "worker_image/make-certs.sh"), "--dir", str(certs), "--redis-group", "999",
         "--client-group", "1001"], timeout=60)
    farm = ComposeFarm(tmp_path, shared_dir, files=("docker-compose.tls.yml",),
                       CELERYFARM_HOST_TLS_DIR=certs)
    try:
        farm.compose("up", "-d", "--no-build", "--scale", "worker=1")
        client = certs / "client"
        tls = Tls(str(client / "ca.crt"), str(client / "client.crt"), str(client / "client.key"))
        plugin = host_plugin(farm.broker_url, farm.broker_url, farm.shared, tls)
        nodes_ready(farm, plugin, 1)
        job_id = submit(plugin, "tls010", "--seconds", 0.5)
        assert finished(plugin, job_id) == State.kCompleted
        assert_frames(farm.shared, "tls010")

        plain = redis.Redis.from_url(farm.broker_url.replace("rediss://", "redis://"),
                                     socket_timeout=5, socket_connect_timeout=5)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        with pytest.raises(FarmError, match="certificate verify failed"):
            check_redis(farm.broker_url, Tls(cert_file=tls.cert_file, key_file=tls.key_file))
        assert wait_until(lambda: farm.flower_status(farm.flower_auth) == 200, timeout=60,
                          what="Flower to answer with basic auth")
        wait_until(lambda: set(farm.health().values()) == {"healthy"}, timeout=180,
                   what="redis (its TLS health check), flower and the worker to be healthy")
    finally:
        farm.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
