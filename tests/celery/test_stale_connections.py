"""A broker connection that died while it waited in kombu's pool (the broker restarted, or the
network closed it after an idle timeout: Redis ``timeout``, a load balancer) costs no message:
the publish that finds it dead is made again on a new connection, and publishing goes on. Only
a broker that is really down fails the round, once, and makes the next rounds skip the broker.

The process's connections go through a TCP relay whose open connections can be reset, closed or
forgotten (reset when the client next writes) while the broker itself stays up; we count the
messages on the broker, not through the relay.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
import uuid
from urllib.parse import urlparse

import pytest
from django.test import override_settings

from batchframework import BatchOperation, enqueue
from batchframework_celery.poller import poll_once
from batchframework_celery.publish import bounded_publishing
from tests.celery_app import app as celery_app

from .conftest import CELERY_DISPATCHER, NO_DISPATCH
from .helpers import use_broker, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

#: Seconds; long enough that rounds skipped after a failure (for a poll interval) stay skipped
#: for the rest of a test.
POLL_INTERVAL = 30


class BrokerRelay:
    """A TCP relay to a broker, whose open connections can be ended while the broker stays up
    and new connections work (:meth:`cut`), or which refuses new connections (:meth:`refuse`)
    as a broker that is down does."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket, threading.Event, threading.Thread]]
        self._open = []
        threading.Thread(target=self._accept, name="broker-relay", daemon=True).start()

    def cut(self, how: str) -> int:
        """End the connections open now; returns how many. ``"reset"``: at once, with a reset
        (a broker that restarted or crashed). ``"close"``: at once, with a close (Redis's idle
        ``timeout``, a proxy's). ``"forget"``: nothing now, but the first packet the client
        sends is answered with a reset, as by a load balancer or NAT that dropped the idle
        connection from its table."""
        with self._lock:
            pairs, self._open = self._open, []
        for _, _, stop, thread in pairs:
            stop.set()
            # Closed while its thread waits in select() on it, a socket would stay open until
            # the wait ends: the client could still write to it, and we want it gone first.
            thread.join(timeout=5)
        for client, server, _, _ in pairs:
            if how == "forget":
                threading.Thread(
                    target=_reset_when_readable, args=(client, server), daemon=True
                ).start()
            else:
                _end(client, reset=how == "reset")
                _end(server, reset=how == "reset")
        return len(pairs)

    def refuse(self) -> None:
        """Refuse new connections (nothing listens on the port any more)."""
        with contextlib.suppress(OSError):
            # Closing alone would leave it listening while the accepting thread waits on it.
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def close(self) -> None:
        self.refuse()
        self.cut("close")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            stop = threading.Event()
            thread = threading.Thread(target=self._forward, args=(client, server, stop))
            thread.daemon = True
            with self._lock:
                self._open.append((client, server, stop, thread))
            thread.start()

    @staticmethod
    def _forward(client: socket.socket, server: socket.socket, stop: threading.Event) -> None:
        other = {client: server, server: client}
        try:
            while not stop.is_set():
                readable, _, _ = select.select([client, server], [], [], 0.02)
                for end in readable:
                    data = end.recv(65536)
                    if not data:  # one side closed: close the other
                        stop.set()
                        other[end].close()
                        end.close()
                        return
                    other[end].sendall(data)
        except OSError:
            return


def _end(end: socket.socket, *, reset: bool) -> None:
    with contextlib.suppress(OSError):
        if reset:  # an RST, not a FIN
            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        end.close()


def _reset_when_readable(client: socket.socket, server: socket.socket) -> None:
    with contextlib.suppress(OSError, ValueError):
        select.select([client], [], [], 30)
    _end(client, reset=True)
    _end(server, reset=True)


@pytest.fixture
def relay(broker):
    """The tests' Celery app publishing to ``broker`` through a :class:`BrokerRelay`."""
    parsed = urlparse(broker.url)
    default_port = 6379 if broker.is_redis else 5672
    relay = BrokerRelay((parsed.hostname or "127.0.0.1", parsed.port or default_port))
    credentials = parsed.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{relay.port}" if credentials else f"127.0.0.1:{relay.port}"
    settings = {**CELERY_DISPATCHER, "POLL_INTERVAL": POLL_INTERVAL}
    relayed = parsed._replace(netloc=netloc).geturl()
    bounded_publishing.reset()
    try:
        with use_broker(celery_app, relayed), override_settings(BATCHFRAMEWORK=settings):
            yield relay
    finally:
        relay.close()
        bounded_publishing.reset()


@pytest.fixture
def new_queue(broker):
    """Names a queue of the test's own (RabbitMQ is shared); they are deleted afterwards."""
    queues: list[str] = []

    def new() -> str:
        queues.append(f"bf-stale-{uuid.uuid4().hex[:12]}")
        return queues[-1]

    yield new
    if broker.is_redis:
        broker.purge()  # the tests' own Redis database
        return
    from kombu import Connection

    with Connection(broker.url, connect_timeout=2) as connection:
        for queue in queues:
            connection.default_channel.queue_delete(queue)
            # Celery declared an exchange of the same name with the queue.
            connection.default_channel.exchange_delete(queue)


def _events(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]


#: A connection that died in the pool and is not found by the client library as it takes it:
#: on RabbitMQ one the broker reset or closed (the publish, a write, would seem to succeed); on
#: Redis one the network forgot (redis-py finds one closed or reset already, by itself).
DIED_UNSEEN = pytest.mark.parametrize(
    ("broker", "how"),
    [("redis", "forget"), ("rabbitmq", "reset"), ("rabbitmq", "close")],
    indirect=["broker"],
)


@DIED_UNSEEN
def test_a_pooled_connection_that_died_is_replaced_once_and_a_broker_down_still_fails_at_once(
    broker, relay, new_queue, how, caplog
):
    """The first enqueue after the broker's connections ended publishes on a new connection
    (``publish_reconnect``), and so do the next ones: nothing is counted as failed or left to
    the poller. Without that, on RabbitMQ the publish on the dead connection would seem to
    succeed and be lost; on Redis it would fail, and enqueues would skip the broker for a poll
    interval.

    A broker that is really down is not hidden by the reconnect: the round still fails at once
    (``publish_failed``), and the next enqueue skips the broker."""
    caplog.set_level(logging.INFO, logger="batchframework")
    queue = new_queue()
    enqueue("test-noop", queue=queue)  # this process now holds an open pooled connection
    assert wait_for(lambda: broker.waiting(queue) == 1, timeout=5)

    assert relay.cut(how) >= 1
    for _ in range(3):
        enqueue("test-noop", queue=queue)
    assert wait_for(lambda: broker.waiting(queue) == 4, timeout=5), broker.waiting(queue)
    assert not _events(caplog, "publish_failed") and not _events(caplog, "publish_skipped")
    assert len(_events(caplog, "publish_reconnect")) == 1, caplog.text

    relay.refuse()
    assert relay.cut("reset") >= 1
    started = time.monotonic()
    left = [enqueue("test-noop", queue=queue).pk for _ in range(2)]
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"enqueues took {elapsed:.2f}s on a broker that is down"
    failures = _events(caplog, "publish_failed")
    assert len(failures) == 1 and "count=1" in failures[0], caplog.text
    skips = _events(caplog, "publish_skipped")
    assert len(skips) == 1 and "reason=broker_recently_down" in skips[0], caplog.text
    assert broker.waiting(queue) == 4
    assert BatchOperation.objects.filter(pk__in=left).unprocessed().count() == 2


@DIED_UNSEEN
def test_a_poller_tick_on_a_pooled_connection_that_died_publishes_its_drains(
    broker, relay, new_queue, how, caplog
):
    """The poller's tick asks the broker how many messages wait, then publishes its drains, on
    a connection it takes from the pool: when that died, the tick still publishes them."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    enqueue("test-noop", queue=new_queue())  # a pooled connection (its message: no drain)
    queue = new_queue()
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "POLL_INTERVAL": POLL_INTERVAL}):
        enqueue("test-noop", queue=queue)  # no message: the poller's to publish a drain for
    assert relay.cut(how) >= 1

    counts = poll_once()
    assert counts["drain_messages"] == 1 and counts["publish_failures"] == 0, counts
    assert wait_for(lambda: broker.waiting(queue) == 1, timeout=5)
    assert not _events(caplog, "publish_failed"), caplog.text


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_with_publisher_confirms_a_connection_the_network_forgot_loses_no_message(
    broker, relay, new_queue, caplog
):
    """Without publisher confirms, an AMQP publish on a connection that a load balancer or NAT
    dropped from its table is lost: the reset answers the write, after it seemed to succeed.
    With kombu's ``confirm_publish`` the publish waits for the broker's answer, so it fails,
    and it is made again on a new connection."""
    caplog.set_level(logging.INFO, logger="batchframework")
    queue = new_queue()
    options = celery_app.conf.broker_transport_options
    # Read when the app's connection pool is made, at the first publish below (the relay
    # fixture drops that pool afterwards).
    celery_app.conf.broker_transport_options = {**options, "confirm_publish": True}
    try:
        enqueue("test-noop", queue=queue)
        assert wait_for(lambda: broker.waiting(queue) == 1, timeout=5)
        assert relay.cut("forget") >= 1
        for _ in range(2):
            enqueue("test-noop", queue=queue)
    finally:
        celery_app.conf.broker_transport_options = options
    assert wait_for(lambda: broker.waiting(queue) == 3, timeout=5), broker.waiting(queue)
    assert not _events(caplog, "publish_failed") and not _events(caplog, "publish_skipped")
    assert len(_events(caplog, "publish_reconnect")) == 1, caplog.text
