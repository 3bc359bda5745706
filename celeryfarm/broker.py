"""The farm's kombu transports, one for ``redis://`` and ``rediss://``, one for
``sentinel://`` (:func:`transport` names the one ``broker_transport`` takes).

They are kombu's own with three changes. A message can be captured rather than sent
(:mod:`celeryfarm.capture`: the record store pushes it with the record). A channel closed
after its connection was let go leaves its deliveries set aside for the reapers rather
than stopping the node (:class:`SetAsideQoS`). Through Sentinel, acknowledgements ride out
a failover (:class:`PatientQoS`) and every connection asks the sentinels for the primary
(:class:`~celeryfarm.redisclient.FollowingConnection`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from .capture import CapturingPut
from .redisclient import FollowingConnection, FollowingSSLConnection
from .sentinel import uses_sentinel

logger = logging.getLogger(__name__)


def transport(broker_url: str) -> str:
    """What Celery's ``broker_transport`` is for ``broker_url``."""
    return f"{__name__}:{'SentinelTransport' if uses_sentinel(broker_url) else 'Transport'}"


class SetAsideQoS(kombu_redis.QoS):
    """kombu's deliveries, except for a channel closed after its connection was let go
    (seen in a failover: the consumer's connection dropped, then its channel closed): kombu
    would fail to connect to restore them, or to acknowledge a step that ends afterwards,
    with an ``AttributeError`` that Celery takes for an unrecoverable error, and the node
    would stop. Here they stay set aside in Redis, where the reapers find them
    (:mod:`celeryfarm.rescue`: a message whose step has ended is dropped)."""

    def restore_unacked(self, client: Any = None) -> None:
        if client is None and self._let_go():
            logger.warning("a broker channel closed after its connection: %d unacknowledged "
                           "message(s) left set aside for the reapers", len(self._delivered))
            self._delivered.clear()
            return
        super().restore_unacked(client)

    def ack(self, delivery_tag: str) -> None:
        if self._let_go():
            self._leave_set_aside(delivery_tag)
            return
        self._acknowledge(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._let_go():
            self._leave_set_aside(delivery_tag)
            return
        self._reject(delivery_tag, requeue)

    def _acknowledge(self, delivery_tag: str) -> None:
        kombu_redis.QoS.ack(self, delivery_tag)

    def _reject(self, delivery_tag: str, requeue: bool) -> None:
        kombu_redis.QoS.reject(self, delivery_tag, requeue=requeue)

    def _let_go(self) -> bool:
        """Whether this channel's connection was let go (the channel closed after it)."""
        connection = self.channel.connection
        return connection is None or connection.client is None

    def _leave_set_aside(self, delivery_tag: str) -> None:
        """Forget a delivery here and leave its message set aside in Redis."""
        logger.warning("message %s ended after its broker channel closed: left set aside "
                       "for the reapers", delivery_tag)
        virtual.QoS.ack(self, delivery_tag)


class Channel(CapturingPut, kombu_redis.Channel):
    """kombu's Redis channel with :class:`CapturingPut` and :class:`SetAsideQoS`."""

    QoS = SetAsideQoS


class Transport(kombu_redis.Transport):
    """kombu's ``redis://`` transport with :class:`Channel`."""

    Channel = Channel


class PatientQoS(SetAsideQoS):
    """kombu's acknowledgements, tried again through a failover. kombu forgets a delivery
    only once its ack has reached Redis: an ack that fails (the primary gone, or refusing
    writes until its replicas are back) left it counted against the prefetch limit, and the
    node took no more work (measured: four minutes after a double failover). Here the ack
    is tried for up to about 15 s; if it still fails, the delivery is forgotten anyway and
    its message left set aside in Redis, where the reapers drop it (its step has ended:
    the record says so). A channel closed after its connection sets its deliveries aside
    (:class:`SetAsideQoS`)."""

    def _acknowledge(self, delivery_tag: str) -> None:
        self._remove_patiently(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def _reject(self, delivery_tag: str, requeue: bool) -> None:
        if requeue:
            super()._reject(delivery_tag, requeue)
            return
        self._acknowledge(delivery_tag)

    def _remove_patiently(self, delivery_tag: str) -> None:
        for pause in (*ACK_PAUSES, None):
            try:
                self._remove_from_indices(delivery_tag).execute()
                return
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if pause is None:
                    logger.warning("could not acknowledge message %s (%s); it stays set "
                                   "aside until a reaper drops it", delivery_tag, error)
                    return
                time.sleep(pause)


#: Pauses between the tries of an acknowledgement (see :class:`PatientQoS`).
ACK_PAUSES = (0.25, 0.5, 1, 2, 4, 4, 4)


class SentinelChannel(CapturingPut, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with :class:`CapturingPut`, :class:`PatientQoS` and
    :class:`~celeryfarm.redisclient.FollowingConnection`."""

    QoS = PatientQoS
    connection_class = FollowingConnection
    connection_class_ssl = FollowingSSLConnection


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's ``sentinel://`` transport with :class:`SentinelChannel`: a node whose
    primary froze finds the new one."""

    Channel = SentinelChannel
