"""docker-compose.sentinel.yml with real containers: a primary, two replicas and three
sentinels in Docker, render nodes inside Docker and this test process outside it (a Katana
host), all reaching Redis through the sentinels at one address: the Docker host's.

The address is the default bridge's gateway, an address of this host that the containers
reach too (a studio gives the host's LAN name): every server and sentinel announces it with
its published port, so what the sentinels say is reachable from both sides.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.error
from pathlib import Path

import docker
import kombu.exceptions
import pytest
import redis

from celeryfarm.farmapi import Job

from . import test_docker
from .helpers import wait_until
from .test_docker import (
    ComposeFarm,
    assert_frames,
    finished,
    free_port,
    host_plugin,
    nodes_ready,
    render_log,
    submit,
)
from .test_tls import _get

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

State = Job.State
MASTER = "celeryfarm"
REPLICAS = ("redis-replica-1", "redis-replica-2")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
#: test_docker's fixtures: current images (session, autouse) and the shared folder.
images = test_docker.images
shared_dir = test_docker.shared_dir


def docker_host_address() -> str:
    """An address of this host that containers reach: the default bridge's gateway."""
    bridge = docker.from_env().networks.get("bridge")
    return bridge.attrs["IPAM"]["Config"][0]["Gateway"]


class SentinelComposeFarm(ComposeFarm):
    """The compose project with the Sentinel override, on ports of its own, published on
    (and announced as) the Docker host's address."""

    def __init__(self, tmp_path: Path, shared: Path, **settings: object) -> None:
        self.host = docker_host_address()
        self.server_ports = {"redis": free_port(), **{name: free_port() for name in REPLICAS}}
        self.sentinel_ports = {name: free_port() for name in SENTINELS}
        self.sentinel_password = secrets.token_hex(16)
        super().__init__(tmp_path, shared, files=("docker-compose.sentinel.yml",), **{
            "CELERYFARM_REDIS_HOST": self.host, "CELERYFARM_REDIS_BIND": self.host,
            "CELERYFARM_REDIS_REPLICA_PASSWORD": secrets.token_hex(16),
            "CELERYFARM_REDIS_SENTINEL_PASSWORD": secrets.token_hex(16),
            "CELERYFARM_SENTINEL_PASSWORD": self.sentinel_password,
            # The default (5 s), not a shorter one: at a full restart the sentinels run
            # before the servers, and with 1 s they sometimes declared the primary down
            # while it was still starting and promoted a replica that had not yet synced.
            "CELERYFARM_SENTINEL_DOWN_AFTER_MS": 5000,
            "CELERYFARM_REDIS_REPLICA_1_PORT": self.server_ports["redis-replica-1"],
            "CELERYFARM_REDIS_REPLICA_2_PORT": self.server_ports["redis-replica-2"],
            **{f"CELERYFARM_SENTINEL_{n}_PORT": self.sentinel_ports[f"sentinel-{n}"]
               for n in (1, 2, 3)},
            **settings})
        # ComposeFarm chose the first primary's port; it is published on self.host.
        self.server_ports["redis"] = self.redis_port

    @property
    def broker_url(self) -> str:
        """The sentinels' URL with the admin's credential, as this host reaches them."""
        auth = f"admin:{self.passwords['admin']}@"
        return ";".join(f"sentinel://{auth if n == 0 else ''}{self.host}:{port}/0"
                        for n, port in enumerate(self.sentinel_ports.values()))

    def sentinel(self, name: str = "sentinel-2", password: str | None = "") -> redis.Redis:
        """A client of a sentinel with the farm clients' password (or ``password``)."""
        return redis.Redis(self.host, self.sentinel_ports[name], socket_timeout=5,
                           password=self.sentinel_password if password == "" else password,
                           decode_responses=True)

    def primary(self) -> str:
        """The service the sentinels call the primary now."""
        host, port = self.sentinel().sentinel_get_master_addr_by_name(MASTER)
        assert host == self.host  # announced: the address every client reaches
        (service,) = [name for name, known in self.server_ports.items() if known == int(port)]
        return service

    def replicas(self) -> set[str]:
        """The services the sentinels know as healthy replicas."""
        found = self.sentinel().sentinel_slaves(MASTER)
        return {name for name, port in self.server_ports.items()
                for replica in found if replica["port"] == port
                and replica["ip"] == self.host and "s_down" not in replica["flags"]}


def queue_lengths(farm: SentinelComposeFarm) -> dict[str, int]:
    """Flower's ``/api/queues/length`` as {queue: messages}; {} while it has no primary to
    ask (it answers 500 then)."""
    try:
        answer = _get(f"http://127.0.0.1:{farm.flower_port}/api/queues/length",
                      farm.flower_auth)
    except urllib.error.HTTPError as error:
        if error.code != 500:
            raise
        return {}
    return {queue["name"]: queue["messages"] for queue in json.loads(answer)["active_queues"]}


def nodes_answering(plugin) -> set[str]:
    """The nodes that answer a ping (none while the client's broker connection is being
    made again: kombu does not retry collecting replies)."""
    try:
        replies = plugin.farm.app.control.ping(timeout=1)
    except (redis.ConnectionError, kombu.exceptions.OperationalError):
        return set()
    return {name for reply in replies for name in reply}


def add_artist(farm: SentinelComposeFarm, name: str) -> str:
    """``celeryfarm user add NAME`` from this host through the sentinels: the artist's
    broker URL it prints."""
    env = {**farm.env, "CELERYFARM_ADMIN_URL": farm.broker_url,
           "CELERYFARM_SENTINEL_PASSWORD": farm.sentinel_password}
    result = subprocess.run([sys.executable, "-m", "celeryfarm", "user", "add", name],
                            capture_output=True, text=True, env=env, timeout=60, check=True)
    assert f"export CELERYFARM_SENTINEL_PASSWORD={farm.sentinel_password}" in result.stdout
    (line,) = [line for line in result.stdout.splitlines()
               if line.startswith("export CELERYFARM_BROKER_URL=")]
    return line.partition("=")[2].strip("'")


def test_compose_sentinel_farm_follows_the_primary_s_death(tmp_path: Path, shared_dir: Path):
    """A job from this host renders on a node in Docker; the primary's container is killed;
    the sentinels promote a replica, announced at the Docker host's address; a job submitted
    after that by an artist (a user made on every server before the failover) renders on the
    same nodes, which followed by themselves; the whole farm, stopped and started again
    with the dead primary, keeps every job, the dead primary now a replica; Flower reads
    the queues through the sentinels."""
    farm = SentinelComposeFarm(tmp_path, shared_dir)
    try:
        farm.compose("up", "-d", "--no-build", "--scale", "worker=2")
        plugin = host_plugin(farm.broker_url, farm.broker_url, farm.shared,
                             sentinel_password=farm.sentinel_password)
        nodes = nodes_ready(farm, plugin, 2)
        assert farm.primary() == "redis"
        # On the published ports (the studio LAN): no answer without the password, and
        # with the clients' password no reconfiguring.
        for name in SENTINELS:
            with pytest.raises(redis.AuthenticationError):
                farm.sentinel(name, password=None).sentinel_masters()
            with pytest.raises(redis.exceptions.NoPermissionError):
                farm.sentinel(name).execute_command("SENTINEL", "SET", MASTER, "auth-pass",
                                                    "stolen")
        wait_until(lambda: farm.replicas() == set(REPLICAS), timeout=60,
                   what="both replicas to be known to the sentinels at the host's address")
        artist_url = add_artist(farm, "ann")
        assert artist_url.startswith("sentinel://ann:") and artist_url.count("sentinel://") == 3

        before = submit(plugin, "before", "--seconds", 0.5)
        assert finished(plugin, before) == State.kCompleted
        assert plugin.farm.get(before).node in nodes
        assert_frames(farm.shared, "before")

        (primary,) = farm.containers("redis")
        primary.kill()
        promoted = wait_until(lambda: farm.primary() != "redis" and farm.primary(),
                              timeout=120, what="the sentinels to promote a replica")
        assert promoted in REPLICAS

        artist = host_plugin(artist_url, artist_url, farm.shared,
                             sentinel_password=farm.sentinel_password)
        after = submit(artist, "after", "--seconds", 0.5)
        assert finished(artist, after, timeout=180) == State.kCompleted, \
            render_log(artist, after)
        assert artist.farm.get(after).node in nodes
        assert artist.farm.get(after).spec.user == "ann"
        assert_frames(farm.shared, "after")
        # The job from before the failover is still there, on the new primary.
        assert plugin.getJobState(before) == State.kCompleted

        # The whole farm stopped and started again, the dead primary with it: each server
        # asks the sentinels which is the primary and starts as it or as its replica, so
        # the first primary, with data older than the failover, comes back as a replica
        # and no server copies its data over the newer; every job is still there.
        farm.compose("stop", "--timeout", "10")
        farm.compose("up", "-d", "--no-build", "--scale", "worker=2")
        wait_until(lambda: farm.replicas() == set(farm.server_ports) - {farm.primary()}, 120,
                   what="one primary and two replicas again")
        assert farm.primary() != "redis"
        wait_until(lambda: nodes_answering(plugin) >= nodes, 120,
                   what="the nodes to answer through the primary")
        assert artist.getJobState(after) == State.kCompleted
        assert plugin.getJobState(before) == State.kCompleted
        again = submit(artist, "again", "--seconds", 0.5)
        assert finished(artist, again, timeout=180) == State.kCompleted
        assert wait_until(lambda: farm.flower_status(farm.flower_auth) == 200, timeout=60,
                          what="Flower to answer through the sentinels")
        # Its broker page's queue lengths, read through the sentinels from the new primary.
        assert wait_until(lambda: "renders" in queue_lengths(farm), timeout=60,
                          what="Flower to list the farm's queue")
    finally:
        farm.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
    assert farm.leftovers() == []


@pytest.mark.parametrize(("setting", "value"), [("CELERYFARM_REDIS_BIND", "127.0.0.1"),
                                                 ("CELERYFARM_REDIS_HOST", "localhost")])
def test_compose_sentinel_refuses_loopback_addresses(tmp_path: Path, shared_dir: Path,
                                                     setting: str, value: str):
    """The nodes reach Redis at the announced address through the published ports: a
    loopback one of either would leave them with no Redis, so the preflight refuses it and
    nothing else starts."""
    farm = SentinelComposeFarm(tmp_path, shared_dir, **{setting: value})
    try:
        started = farm.compose("up", "-d", "--no-build", "--scale", "worker=1", check=False)
        assert started.returncode != 0
        (preflight,) = farm.containers("preflight")
        log = preflight.logs().decode()
        assert f"{setting}={value}: with Sentinel" in log and "loopback" in log, log
        assert not farm.containers("redis") or farm.containers("redis")[0].status != "running"
        assert farm.containers("worker") == []
    finally:
        farm.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
