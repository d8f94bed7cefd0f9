"""The relay: a thread in each Celery worker that publishes what ``enqueue`` announced.

With :class:`~batchframework_celery.dispatcher.RelayDispatcher`, ``enqueue`` on PostgreSQL does
not publish from the web process: its INSERT sends ``NOTIFY batchframework_enqueued, '<id>'``,
which PostgreSQL delivers when (and only if) the transaction commits. Here, in the worker's
main process, one thread LISTENs on that channel and publishes the announced operations like
the Celery dispatcher would (due now: one chunk message; due within the horizon: with an ETA).

Every worker starts a relay, but only the one that holds a PostgreSQL advisory lock listens,
so each operation is published once; the others retry the lock every ``POLL_INTERVAL`` and one
takes over when the holder's connection ends (its worker stopped or died). Notifications sent
while no relay listens are lost by design: the beat poller still finds every due operation in
the database (invariant 6), at most a poll interval later.

A listening session sends nothing, so one the network dropped silently (a failover, a NAT's
idle timeout) or whose server stopped answering would leave the relay waiting on a dead socket
for as long as TCP allows, hours by default. So a relay that has heard nothing for a poll
interval asks its session for a ``SELECT 1``, and cuts a session that does not answer in time
(:func:`probe_timeout`): the query fails, and the relay starts again on a new session. The
server must let go of the old session's lock too, although it may never hear of the cut: the
relay's session settings (:func:`session_settings`) end a session the relay stopped talking to,
and fail a query the server can't finish in time before the relay has to cut it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, connections

from batchframework.conf import get_settings
from batchframework.dispatch import get_dispatcher
from batchframework.engine import write_alias
from batchframework.models import BatchOperation
from batchframework.signals import log_event

#: The PostgreSQL channel ``enqueue`` announces new operations on.
CHANNEL = "batchframework_enqueued"
#: The advisory lock (any constant bigint) whose holder is the one relay that listens.
LOCK_KEY = 0x62665F72656C6179  # b"bf_relay"
#: How long a wait for notifications lasts before the thread checks whether to stop.
WAIT_SECONDS = 1.0
#: Most notifications turned into messages at once (one SELECT and its chunk messages).
MAX_BURST = 1000
#: The shortest wait for a probe's answer: a busy but healthy server must not look dead.
MIN_PROBE_TIMEOUT = timedelta(seconds=5)


def probe_timeout() -> timedelta:
    """How long a quiet relay's ``SELECT 1`` may take before its session is cut: two poll
    intervals, and at least :data:`MIN_PROBE_TIMEOUT`."""
    return max(get_settings().POLL_INTERVAL * 2, MIN_PROBE_TIMEOUT)


def session_settings(server_version: int) -> dict[str, int]:
    """What the relay sets on its session, so that the server ends it on its own when the
    relay can no longer reach it, and with it the lock every other relay waits for:

    - ``idle_session_timeout`` (PostgreSQL 14+): the relay speaks at least every poll interval
      (a probe, a lock attempt, or a burst's query) unless a broker publish holds it up, and
      that has ``PUBLISH_TIMEOUT`` to connect; a session silent three probe timeouts longer
      than that has most likely lost its relay (if a frozen broker held it up instead, the
      relay starts again on a new session once the publish returns);
    - TCP keepalives, and ``tcp_user_timeout`` (PostgreSQL 12+) for when notifications wait
      unacknowledged (Linux sends no keepalives then): a client host or network gone silent
      is noticed within about twice the probe timeout (the only way before PostgreSQL 14);
    - ``statement_timeout``: a query stuck on the server (behind a lock) fails cleanly at half
      the probe timeout, before the relay would cut a session the server still holds on to.
    """
    settings = get_settings()
    probe = probe_timeout().total_seconds()
    values = {
        "statement_timeout": int(probe * 1000 / 2),
        "tcp_keepalives_idle": max(1, round(probe)),
        "tcp_keepalives_interval": max(1, round(probe / 3)),
        "tcp_keepalives_count": 3,
    }
    if server_version >= 120000:
        values["tcp_user_timeout"] = int(probe * 2 * 1000)
    if server_version >= 140000:
        quiet = (
            settings.POLL_INTERVAL.total_seconds()
            + WAIT_SECONDS
            + settings.PUBLISH_TIMEOUT.total_seconds()
        )
        values["idle_session_timeout"] = int((quiet + 3 * probe) * 1000)
    return values


class Relay(threading.Thread):
    """Listens for announced operations on the operations' database and publishes them."""

    def __init__(self) -> None:
        super().__init__(name="batchframework-relay", daemon=True)
        self.alias = write_alias()
        self._stopping = threading.Event()
        self._set: list[str] = []  # the session settings in force, reset before closing
        self._watchdog = _Watchdog(self.alias)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._serve()
                except Exception as exc:  # database gone or restarted: the lock went with it
                    retry_in = get_settings().POLL_INTERVAL.total_seconds()
                    log_event(
                        logging.WARNING, "relay_error", error=repr(exc), retry_in=f"{retry_in:g}s"
                    )
                    self._close()
                    self._stopping.wait(retry_in)
        finally:
            self._close()
            self._watchdog.close()

    def _close(self) -> None:
        connection = connections[self.alias]
        # With Django's connection pool (``OPTIONS["pool"]``), close() hands the session back
        # to the pool, still holding the lock and listening: the relay's next session could
        # never take the lock, nor could another worker's. So let go of both first. (The
        # connection may be broken already; closing it must not end the thread.)
        # The session settings go too: the pool's next user must not inherit them.
        with contextlib.suppress(Exception):
            if connection.connection is not None:
                with self._answer_in_time(connection):
                    if connection.is_usable():
                        with connection.cursor() as cursor:
                            cursor.execute("UNLISTEN *")
                            cursor.execute("SELECT pg_advisory_unlock_all()")
                            for name in self._set:
                                cursor.execute(f"RESET {name}")
        self._set = []
        with contextlib.suppress(Exception):
            connection.close()
        self._watchdog.forget()

    def _serve(self) -> None:
        connection = connections[self.alias]
        self._close()  # start from a fresh session: an advisory lock lives as long as it
        connection.ensure_connection()
        self._watchdog.watch(connection.connection.fileno())
        self._apply_session_settings(connection)
        if not self._wait_for_lock(connection):
            return
        with self._answer_in_time(connection), connection.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANNEL}")
        log_event(logging.INFO, "relay_started", alias=self.alias, channel=CHANNEL)
        raw = connection.connection
        quiet_for = get_settings().POLL_INTERVAL.total_seconds()
        # When the relay last sent the server a query. Hearing notifications is not enough:
        # the server's idle_session_timeout counts from the client's last command, and a
        # stream of notifications that name no operation makes the relay send none.
        spoke_at = time.monotonic()
        while not self._stopping.is_set():
            # One read returns every notification that has arrived: a burst becomes one round.
            payloads = [n.payload for n in raw.notifies(timeout=WAIT_SECONDS, stop_after=1)]
            for start in range(0, len(payloads), MAX_BURST):
                if self._publish(connection, payloads[start : start + MAX_BURST]):
                    spoke_at = time.monotonic()
            if time.monotonic() - spoke_at >= quiet_for:
                # Notifications arriving meanwhile wait in psycopg's backlog for the next read.
                with self._answer_in_time(connection), connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                spoke_at = time.monotonic()

    def _apply_session_settings(self, connection: Any) -> None:
        """Set :func:`session_settings` one by one: one the server refuses (a PostgreSQL
        look-alike without it) is logged and done without, not a reason to stop relaying."""
        for name, value in session_settings(_server_version(connection)).items():
            try:
                with self._answer_in_time(connection), connection.cursor() as cursor:
                    cursor.execute(f"SET {name} = {int(value)}")
            except DatabaseError as exc:
                log_event(logging.WARNING, "relay_setting_refused", name=name, error=repr(exc))
            else:
                self._set.append(name)

    def _answer_in_time(self, connection: Any) -> contextlib.AbstractContextManager[None]:
        """Bound a query of the relay's: a session that does not answer within
        :func:`probe_timeout` is cut, which fails the query (and so this :meth:`_serve`)."""
        return self._watchdog.bound(probe_timeout().total_seconds())

    def _wait_for_lock(self, connection: Any) -> bool:
        """Hold the lock (``True``), or wait for it until told to stop (``False``)."""
        announced = False
        while not self._stopping.is_set():
            with self._answer_in_time(connection), connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
                if cursor.fetchone()[0]:
                    return True
            if not announced:
                log_event(logging.INFO, "relay_standby", alias=self.alias)
                announced = True
            self._stopping.wait(get_settings().POLL_INTERVAL.total_seconds())
        return False

    def _publish(self, connection: Any, payloads: list[str]) -> bool:
        """Publish the operations ``payloads`` announce; whether that took a query (none when
        no payload names an operation: anyone may NOTIFY on the channel)."""
        from .dispatcher import publish_operations

        ids = {int(payload) for payload in payloads if _is_id(payload)}
        if not ids:
            return False
        # Only those still unprocessed: some may have been cancelled or run meanwhile. (Only
        # the query is bounded: a slow broker is the publisher's to bound, not a dead session.)
        with self._answer_in_time(connection):
            operations = list(
                BatchOperation.objects.using(self.alias)
                .unprocessed()
                .filter(pk__in=ids)
                .only("pk", "run_after", "queue", "claimed_by")
            )
        publisher = publish_operations(operations, using=self.alias)
        log_event(
            logging.DEBUG,
            "relay_published",
            announced=len(ids),
            published_messages=publisher.published,
            failed_messages=publisher.failed,
        )
        return True


class _Watchdog:
    """Shuts the relay's session socket down when a query on it does not end in time.

    A query on a session whose server or network went silent waits forever: the server's
    kernel (or nobody at all) has acknowledged it, and no answer comes. Shutting the socket
    down makes that wait end at once with the driver's "connection closed" error. One thread
    for the relay's life, not a timer thread per query: it sleeps until the query in hand is
    due to end, and is woken only when it has nothing to wait for.
    """

    def __init__(self, alias: str) -> None:
        self._alias = alias
        self._condition = threading.Condition()
        # A socket of our own on the session's connection, for as long as the session lasts:
        # if the driver closed its descriptor, the number could be reused by another
        # connection, which a shutdown by number would cut.
        self._socket: socket.socket | None = None
        self._deadline: float | None = None  # time.monotonic() when the query in hand is late
        self._seconds = 0.0
        # When the thread wakes up next by itself (time.monotonic()); None: only when woken.
        self._wakes_at: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, fileno: int) -> None:
        """Watch the session on socket ``fileno`` (a new session: the last one is forgotten)."""
        with self._condition:
            self._forget()
            self._socket = socket.socket(fileno=os.dup(fileno))

    def forget(self) -> None:
        """The session is closed: nothing to cut any more."""
        with self._condition:
            self._forget()

    def _forget(self) -> None:
        self._deadline = None
        if self._socket is not None:
            self._socket.close()  # closes our duplicate only
            self._socket = None

    def close(self) -> None:
        """End the thread (the relay stops)."""
        with self._condition:
            self._forget()
            self._closed = True
            self._condition.notify()

    @contextlib.contextmanager
    def bound(self, seconds: float) -> Iterator[None]:
        """Cut the session if the block has not ended within ``seconds``."""
        with self._condition:
            if self._socket is not None:
                self._deadline = time.monotonic() + seconds
                self._seconds = seconds
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="batchframework-relay-watchdog", daemon=True
                    )
                    self._thread.start()
                elif self._wakes_at is None or self._deadline < self._wakes_at:
                    self._condition.notify()
        try:
            yield
        finally:
            with self._condition:  # no cut from here on: the session answered
                self._deadline = None

    def _run(self) -> None:
        with self._condition:
            while not self._closed:
                if self._deadline is None:
                    self._wakes_at = None
                    self._condition.wait()
                    continue
                # Asleep until the deadline of the query it saw: a query ending meanwhile needs
                # no wake-up, and the next one's deadline is later (unless the timeout shrank).
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._wakes_at = self._deadline
                    self._condition.wait(left)
                    continue
                self._deadline = None
                # The thread must live on: without it, no query of the relay's is bounded.
                with contextlib.suppress(Exception):
                    self._cut()

    def _cut(self) -> None:
        if self._socket is not None:  # first: nothing may stand between a late query and this
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        log_event(
            logging.WARNING,
            "relay_unresponsive",
            alias=self._alias,
            timeout=f"{self._seconds:g}s",
            action="closing the session and starting again",
        )


_relay: Relay | None = None
_relay_lock = threading.Lock()


def start_relay(**kwargs: Any) -> None:
    """``worker_ready`` receiver: start this worker's relay if the dispatcher wants one."""
    global _relay
    from .dispatcher import RelayDispatcher

    if not isinstance(get_dispatcher(), RelayDispatcher):
        return
    if connections[write_alias()].vendor != "postgresql":
        return  # nothing announces there: RelayDispatcher publishes after commit instead
    with _relay_lock:
        if _relay is None or not _relay.is_alive():
            _relay = Relay()
            _relay.start()


def stop_relay(**kwargs: Any) -> None:
    """``worker_shutdown`` receiver: stop the relay (its lock ends with its connection)."""
    global _relay
    with _relay_lock:
        relay, _relay = _relay, None
    if relay is not None:
        relay.stop(timeout=WAIT_SECONDS * 5)


def _server_version(connection: Any) -> int:
    """The server's version number (150002 for 15.2), as psycopg's session knows it."""
    return int(connection.connection.info.server_version)


def _is_id(payload: str) -> bool:
    """Whether a notification's payload can be an operation's id. Anyone may NOTIFY on the
    channel: ``"²".isdigit()`` is true but ``int()`` refuses it, and an integer beyond the
    column's range would fail the query, either way ending the relay's session."""
    return payload.isascii() and payload.isdigit() and len(payload) <= 18
