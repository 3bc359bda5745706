"""The Celery application, made by :func:`create_app`: never at import time.

Every process that talks to the broker (render nodes, Flower, the plug-in, the command line)
builds its app here from the same ``CELERYFARM_*`` settings, so they agree on the settings
that must match: the serializer, the visibility timeout and the priority steps. An app run
as a worker is a render node: :class:`celeryfarm.node.RenderNode` is one of its worker's
bootsteps. ``celeryfarm worker`` starts one; ``celery -A celeryfarm ...`` (Flower,
``inspect``) finds an app here through :func:`__getattr__`, made when Celery asks for it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import broker, redisclient
from .config import Settings
from .sentinel import uses_sentinel

#: The one task a render node runs: a step of a job (the client names it, never imports it).
RENDER_STEP = "celeryfarm.render_step"
#: Redis has no native priorities; kombu emulates them with one list per step (0 first).
PRIORITY_STEPS = list(range(10))
#: Between a queue's name and a priority in the name of that priority's list ("renders:3").
PRIORITY_SEP = ":"
#: Broker connections through sentinels: a command unanswered this long fails and the
#: connection is made again through the sentinels; kombu checks its waiting BRPOP and
#: pub/sub connections every ``health_check_interval`` seconds.
SENTINEL_TIMEOUTS = {"socket_timeout": 10, "socket_connect_timeout": 5,
                     "health_check_interval": 5}


def celery_config(settings: Settings) -> dict:
    """Celery settings that keep hours-long renders safe: late acknowledgement, one step
    at a time, a visibility timeout above the longest render, JSON only."""
    transport = {
        # Above the longest render, or the broker hands a running step to a second node.
        "visibility_timeout": settings.visibility_timeout,
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
        "global_keyprefix": settings.broker_key_prefix,
    }
    results_transport = {"visibility_timeout": settings.visibility_timeout}
    config = {
        "broker_url": settings.broker_url,
        "result_backend": settings.results_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": results_transport,
        # A Redis restart must not fail the task writing its state: retry with backoff.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "broker_connection_retry_on_startup": True,
        # JSON only: with pickle, anyone who can write to Redis could run code on every node.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A step is acknowledged when it ends, and a node takes one step at a time.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        # No STARTED states and no extended results: the farm's record already says Running
        # (and which node), and Flower learns of a start from the task-started event.
        # Without a default, unprioritised messages would jump to the top bucket.
        "task_default_priority": 5,
        "task_default_queue": settings.default_queue,
        "task_create_missing_queues": True,
        # No task events unless someone watches: Flower turns them on itself (its
        # enable_events control, sent every few seconds), so a farm without Flower does not
        # publish three events a step that no one reads.
    }
    # The farm's transport (celeryfarm.broker): messages the farm pushes in its own writes.
    config["broker_transport"] = broker.transport(settings.broker_url)
    # rediss:// (or sentinel:// with TLS): the certificate and host name verified, by kombu,
    # the backend and Flower.
    broker_ssl = settings.tls.celery_options(settings.broker_url)
    # sentinel://: kombu and Celery's backend ask the sentinels for this primary, and a
    # primary that froze (a hung host: no connection is reset) is given up within seconds,
    # so every process asks again (Celery issue 6348).
    # With TLS, the sentinels too are reached over TLS (``sentinel_kwargs``: the connections
    # to the sentinels; ``broker_use_ssl`` and ``redis_backend_use_ssl``: to the servers);
    # with CELERYFARM_SENTINEL_PASSWORD, authenticated to them.
    guarded = bool(settings.sentinel_password)
    if uses_sentinel(settings.broker_url):
        transport.update(master_name=settings.sentinel_master, **SENTINEL_TIMEOUTS)
        if guarded or settings.tls.encrypts(settings.broker_url):
            timeouts = {name: value for name, value in SENTINEL_TIMEOUTS.items()
                        if name.startswith("socket_")}
            transport["sentinel_kwargs"] = redisclient.sentinel_kwargs(
                settings.broker_url, settings.tls, settings.sentinel_password, **timeouts)
    if uses_sentinel(settings.results_url):
        results_transport["master_name"] = settings.sentinel_master
        if guarded or settings.tls.encrypts(settings.results_url):
            results_transport["sentinel_kwargs"] = redisclient.sentinel_kwargs(
                settings.results_url, settings.tls, settings.sentinel_password)
        # Celery's Sentinel backend takes its socket timeouts from these, not its options.
        config["redis_socket_timeout"] = SENTINEL_TIMEOUTS["socket_timeout"]
        config["redis_socket_connect_timeout"] = SENTINEL_TIMEOUTS["socket_connect_timeout"]
    if broker_ssl:
        config["broker_use_ssl"] = broker_ssl
        config["redis_backend_use_ssl"] = settings.tls.celery_options(settings.results_url)
    return config


class FarmApp(Celery):
    """A Celery app that knows the farm's settings and, in a worker, its render node."""

    settings: Settings
    #: The worker's :class:`~celeryfarm.node.RenderNode` (None outside a worker).
    node: Any = None


def create_app(settings: Settings | None = None) -> FarmApp:
    """The farm's app, from ``settings`` (default: this process's environment)."""
    settings = settings or Settings.from_env()
    app = FarmApp("celeryfarm")
    app.conf.update(celery_config(settings))
    app.settings = settings
    # By name: clients never import the node's code; a worker loads it as it starts.
    app.steps["worker"].add("celeryfarm.node:RenderNode")
    return app


def __getattr__(name: str) -> Any:
    """``celery -A celeryfarm`` looks for ``celeryfarm.celery.app``: an app made from the
    environment then, so importing this module never reads the environment."""
    if name == "app":
        return create_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
