"""Publishing messages to Celery, bounded in time and never raising into the caller.

Celery retries a failed publish by default, which can block a web request for seconds while
the broker is down. Here every publish is made with ``retry=False``; the first connection
failure stops the rest of the round (the poller will find those operations), so a dead broker
costs the caller at most one failed connection attempt.

``retry=False`` alone is not enough: kombu connects a producer's connection with its own retry
loop (sleeping 2 s, 4 s, ... until ``broker_connection_timeout``, 4 s by default), whatever the
publish's ``retry`` says. So the connection is established here first, with one immediate retry
and a deadline of ``PUBLISH_TIMEOUT``.

A connection taken open from kombu's pool may have died while it waited there: the broker
restarted, or the network closed it after an idle timeout (Redis ``timeout``, a load balancer).
kombu does not know until it is used. So a round whose pooled connection fails replaces it once
(``publish_reconnect``) and sends again what it had not yet sent, before it counts the broker as
down; a message sent twice only finds its operation claimed. On AMQP a publish is a write that
nobody answers (without publisher confirms), and the first one on a connection the broker
closed seems to succeed: what has arrived on such a connection is read first, without waiting,
which finds the close in microseconds. What that cannot find is a close that comes only after
the write (a load balancer or NAT that forgot the connection answers its next packet with a
reset) or never (a network that drops it silently): that message is the poller's, unless
publisher confirms (kombu's ``confirm_publish``) make the publish answered by a reset fail, and
so be made again.

A round's messages share that one producer, and on Redis one pipelined write at the round's
end (kombu's ``Producer.batch``, kombu 5.7+) instead of one Redis client and round trip
each: what a chunk message still costs is mostly Celery's own work building it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, suppress
from datetime import datetime
from queue import SimpleQueue
from typing import Any, NamedTuple, TypeVar

from amqp.exceptions import NotFound
from celery import Task
from celery.exceptions import QueueNotFound
from kombu.exceptions import ChannelError, KombuError, OperationalError

from batchframework.conf import get_settings
from batchframework.signals import log_event

#: What a passive declare of a queue that does not exist raises: py-amqp's ``NotFound``
#: (RabbitMQ), kombu's ``ChannelError`` (virtual transports such as Redis, for an empty queue).
_NO_SUCH_QUEUE: tuple[type[BaseException], ...] = (NotFound, ChannelError)

_T = TypeVar("_T")

# Errors that mean "the broker can't be reached now": stop publishing this round.
BROKER_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    KombuError,
    OSError,
    TimeoutError,
)


class _Message(NamedTuple):
    """A message as the round was asked to publish it, kept until it is known to be sent: it is
    given to the producer again if the round's connection has to be replaced."""

    task: Task
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]


class Publisher:
    """Publishes a round of messages; after the first broker failure it publishes no more.

    Used as a context manager, the round's messages share one producer and, where kombu can
    batch (kombu 5.7+ on Redis), one pipelined round trip sent when the block ends: a round of
    many chunk messages then costs the broker one exchange instead of one each. The counts are
    final once the block has ended.
    """

    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.broker_down = False
        self._round: ExitStack | None = None
        self._producer: Any = None
        self._batch: Any = None
        #: Messages given to the batch, not yet known to be sent (it sends when the round ends).
        self._unsent: list[_Message] = []
        #: Whether the round's connection came open from the pool and has not been replaced:
        #: then a failure may only mean that it died there, not that the broker is down.
        self._pooled = False
        self._failure: BaseException | None = None
        self._declared: set[str] = set()
        self._always_eager: bool | None = None

    def __enter__(self) -> Publisher:
        self._round = ExitStack()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._round is not None
        try:
            if self._batch is not None:
                error = exc_info[1] if isinstance(exc_info[1], BaseException) else self._failure
                if error is None:
                    self._send_batch()
                else:  # discards what it buffered
                    self.failed += len(self._unsent)
                    self._unsent.clear()
                    self._close_batch(error)
        finally:
            round_, self._round = self._round, None
            self._batch = self._producer = None
            round_.close()  # the producer goes back to the pool

    def publish(
        self,
        task: Task,
        args: Iterable[Any],
        *,
        queue: str,
        eta: datetime | None = None,
        kwargs: dict[str, Any] | None = None,
        expires: float | None = None,
    ) -> bool:
        if self.broker_down:
            self.failed += 1
            return False
        args = tuple(args)
        kwargs = kwargs or {}
        options: dict[str, Any] = {
            "queue": queue,
            "eta": eta,
            "retry": False,
            # Celery would build these with saferepr, a fifth of a publish for a chunk's ids.
            "argsrepr": _short_repr(args, task.app.amqp.argsrepr_maxsize),
            "kwargsrepr": _short_repr(kwargs, task.app.amqp.kwargsrepr_maxsize),
        }
        if expires is not None:
            options["expires"] = expires
        message = _Message(task, args, kwargs, options)
        try:
            if self._eager(task):  # runs locally: no broker to connect to
                task.apply_async(args=args, kwargs=kwargs, **options)
            else:
                self._on_pooled_connection(lambda: self._send(message))
                if self._batch is not None:
                    self._unsent.append(message)  # counted as published once the batch is sent
                    return True
        except QueueNotFound as exc:
            # A configuration error about this queue only (``task_create_missing_queues`` off
            # and the queue not in ``task_queues``): the broker is fine, and the round's other
            # queues are published. Its operations wait, in the database, for the queue.
            self.failed += 1
            log_event(
                logging.ERROR,
                "publish_unroutable",
                task=task.name,
                queue=queue,
                error=repr(exc),
                hint="add the queue to CELERY_TASK_QUEUES",
            )
            return False
        except BROKER_DOWN_ERRORS as exc:
            # A batch that failed (flushing early when full) lost its buffered messages too.
            self._broker_failed(exc, 1, task=task.name, queue=queue)
            return False
        self.published += 1
        return True

    def waiting(self, task: Task, queue: str) -> int | None:
        """How many messages wait in ``queue`` on the broker (not yet delivered to a worker),
        or ``None`` when that is not known (eager mode, the broker down or unable to say)."""
        if self.broker_down or self._eager(task):
            return None
        try:
            return self._on_pooled_connection(lambda: self._message_count(task, queue))
        except BROKER_DOWN_ERRORS as exc:
            self._broker_failed(exc, 0, task=task.name, queue=queue)  # the round publishes no more
            return None
        except Exception as exc:
            log_event(logging.DEBUG, "queue_size_unknown", queue=queue, error=repr(exc))
            return None

    def _message_count(self, task: Task, queue: str) -> int:
        connection = self._round_producer(task).connection
        # A channel of its own: AMQP closes a channel whose passive declare fails.
        channel = connection.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except _NO_SUCH_QUEUE:
            return 0  # never declared, or (Redis) emptied: nothing waits in it
        finally:
            with suppress(Exception):
                channel.close()

    def _eager(self, task: Task) -> bool:
        # Read once per round: a lookup in Celery's configuration costs tens of microseconds.
        if self._always_eager is None:
            self._always_eager = bool(task.app.conf.task_always_eager)
        return self._always_eager

    def _send(self, message: _Message) -> None:
        """Give ``message`` to the round's producer (in a batch: sent when the round ends)."""
        task, queue = message.task, message.options["queue"]
        options = {**message.options, "producer": self._round_producer(task)}
        if queue in self._declared:
            # Declared by this round's first message to it: kombu would copy and bind the
            # queue again per message just to find it in its declaration cache.
            options["declare"] = []
        task.apply_async(args=message.args, kwargs=message.kwargs, **options)
        self._declared.add(queue)

    def _on_pooled_connection(self, action: Callable[[], _T]) -> _T:
        """Run ``action``; when it fails on a connection that came open from the pool, which
        may have died there, replace the connection, give the producer again what it has not
        sent (a failed batch lost it), and run ``action`` once more. A message that did get
        through before the failure is then sent twice, which is harmless (claims are atomic);
        one lost to a stale connection would cost its operation a poll interval."""
        try:
            return action()
        except BROKER_DOWN_ERRORS as exc:
            if not self._pooled:
                raise  # a connection made by this round: the broker is down
            log_event(
                logging.INFO,
                "publish_reconnect",
                reason="failed on a pooled connection",
                error=repr(exc),
                unsent=len(self._unsent),
            )
            self._replace_connection()
            for message in self._unsent:
                self._send(message)
            return action()

    def _round_producer(self, task: Task) -> Any:
        """The round's producer (connected), inside a kombu publish batch where supported."""
        if self._round is None:
            raise RuntimeError("Publish inside `with Publisher() as publisher:`.")
        if self._producer is None:
            self._producer = self._round.enter_context(task.app.producer_or_acquire())
            connection = self._producer.connection
            self._pooled = bool(connection.connected)
            if self._pooled and _closed_while_pooled(connection):
                log_event(logging.INFO, "publish_reconnect", reason="closed while pooled")
                self._replace_connection()
            else:
                _connect(connection)
                self._start_batch()
        return self._producer

    def _replace_connection(self) -> None:
        """Give up the round's connection and connect afresh; its batch (if any) is discarded.
        Once per round: a new connection that fails means the broker is down."""
        self._pooled = False
        self._close_batch(ConnectionError("the round's connection is replaced"))
        connection = self._producer.connection
        connection.collect()  # drop its sockets without a word to the broker, as kombu's ensure()
        _connect(connection)
        self._producer.revive(connection)
        self._declared.clear()  # the new connection has declared nothing
        self._start_batch()

    def _start_batch(self) -> None:
        if getattr(self._producer, "supports_batch_publish", False):
            batch = self._producer.batch()
            batch.__enter__()
            self._batch = batch

    def _close_batch(self, error: BaseException | None) -> None:
        """Leave the round's batch: send what it buffered or, given an ``error``, discard it."""
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.__exit__(type(error) if error else None, error, None)

    def _send_batch(self) -> None:
        try:
            self._on_pooled_connection(lambda: self._close_batch(None))
        except BROKER_DOWN_ERRORS as exc:
            self._broker_failed(exc, 0, task=None, queue=None)
        else:
            self.published += len(self._unsent)
            self._unsent.clear()

    def _broker_failed(
        self, exc: BaseException, in_hand: int, *, task: str | None, queue: str | None
    ) -> None:
        # Messages buffered in a failed batch may or may not have reached the broker; a
        # duplicate is harmless (claims are atomic) and a lost one is the poller's.
        count, self._unsent = in_hand + len(self._unsent), []
        self.broker_down = True
        self._failure = exc
        self.failed += count
        log_event(
            logging.WARNING,
            "publish_failed",
            task=task,
            queue=queue,
            count=count,
            error=repr(exc),
            fallback="poller",
        )


def _short_repr(value: Any, maxsize: int) -> str:
    text = repr(value)
    return text if len(text) <= maxsize else text[: maxsize - 3] + "..."


def _connect(connection: Any) -> None:
    """Make sure ``connection`` is up: one attempt and one immediate retry, within
    ``PUBLISH_TIMEOUT``, instead of kombu's default retry loop with sleeps. (A connection kombu
    believes open is taken as it is: see :meth:`Publisher._on_pooled_connection`.)"""
    connection.ensure_connection(
        max_retries=1,
        interval_start=0,
        interval_step=0,
        interval_max=0,
        timeout=get_settings().PUBLISH_TIMEOUT.total_seconds(),
    )


def _closed_while_pooled(connection: Any) -> bool:
    """Whether the broker, or the network, closed this open AMQP connection while it waited
    in the pool.

    An AMQP publish is a write that nobody answers (without publisher confirms): the first
    one on a connection closed meanwhile seems to succeed, and is lost. Reading what has
    arrived, without waiting, finds the close (the broker's ``Connection.Close``, the end of the
    stream, a reset) in microseconds. Other transports (Redis) answer every publish, so a dead
    connection fails the publish itself, which is then made again on a new one.
    """
    if connection.transport.driver_type != "amqp":
        return False
    try:
        connection.drain_events(timeout=0)
    except TimeoutError:  # socket.timeout
        return False  # nothing arrived: open, as far as can be told without a round trip
    except connection.connection_errors + connection.channel_errors:
        return True
    return False  # an event arrived and was handled (such as connection.blocked)


#: A job of the publishing thread: its future, and a function with its arguments.
_Job = tuple[Future[None], Callable[..., None], tuple[Any, ...]]


class BoundedPublishing:
    """Runs publish rounds for callers who must not wait on the broker (web requests).

    Rounds run on one background thread, in order. By default the caller waits for its round,
    at most ``PUBLISH_TIMEOUT``; with ``PUBLISH_IN_BACKGROUND`` it does not wait at all. A
    broker that accepts connections but never answers (frozen, or a black-holed host) costs the
    caller that wait once: while a round has been stuck longer than ``PUBLISH_TIMEOUT``, or
    within ``POLL_INTERVAL`` after a failure, later rounds are skipped at once and left to the
    poller, which finds every due operation in the database.
    """

    #: Most rounds waiting for the background thread; beyond it rounds are left to the poller.
    MAX_PENDING = 1000
    #: How long a background flush waits for more operations to share its messages.
    LINGER_SECONDS = 0.005

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[_Job] = SimpleQueue()
        self._pid = 0
        self._pending: deque[tuple[float, Future[None]]] = deque()
        self._skip_until = 0.0
        self._buffer: dict[str, list[Any]] = {}
        self._flush_scheduled = False
        # A child forked while another thread held the lock would wait for it forever.
        os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Run ``fn(*args)`` on the publishing thread, after the rounds submitted before it.

        The thread is a daemon of our own, not a ``ThreadPoolExecutor``'s: Python joins those
        at exit without a time limit, before ``atexit`` handlers run, so a process that
        published to a frozen broker could never exit. Ours is waited for by :meth:`drain`
        only, at most ``PUBLISH_TIMEOUT``. Call with ``_lock`` held, after :meth:`_own_process`.
        """
        future: Future[None] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _own_process(self) -> None:
        """Start the publishing thread in a new process, and forget what a forked child
        inherited from its parent: the parent's thread does not exist in the child, so its
        pending rounds would never complete (and, judged stuck, skip every later round), and
        its buffered operations are the parent's to publish. Call with ``_lock`` held, before
        looking at any other state."""
        if self._pid == os.getpid():
            return
        self._jobs = SimpleQueue()
        threading.Thread(
            target=_serve, args=(self._jobs,), name="batchframework-publish", daemon=True
        ).start()
        if self._pid == 0:  # once per process: a forked child inherits the registration
            atexit.register(self.drain)
        self._pid = os.getpid()
        self._pending.clear()
        self._buffer, self._flush_scheduled = {}, False
        self._skip_until = 0.0

    def _skip_reason(self, timeout: float) -> str | None:
        while self._pending and self._pending[0][1].done():
            self._pending.popleft()
        if time.monotonic() < self._skip_until:
            return "broker_recently_down"
        if self._pending and time.monotonic() - self._pending[0][0] > timeout:
            return "previous_publish_still_blocked"
        if len(self._pending) + sum(map(len, self._buffer.values())) >= self.MAX_PENDING:
            return "too_many_pending_publishes"
        return None

    def run(
        self,
        operations: Sequence[Any],
        *,
        using: str,
        publish: Callable[[Sequence[Any], str], Publisher],
    ) -> None:
        """Publish ``operations`` with ``publish(operations, using)`` on the background thread.

        Waits for it (at most ``PUBLISH_TIMEOUT``), unless ``PUBLISH_IN_BACKGROUND``: then the
        operations join a buffer that the thread publishes as soon as it is free, so the
        enqueues of a busy process share chunk messages instead of sending one each.
        """
        settings = get_settings()
        timeout = settings.PUBLISH_TIMEOUT.total_seconds()
        count = len(operations)
        with self._lock:
            self._own_process()
            reason = self._skip_reason(timeout)
            if reason is not None:
                log_event(
                    logging.WARNING,
                    "publish_skipped",
                    count=count,
                    reason=reason,
                    fallback="poller",
                )
                return
            if settings.PUBLISH_IN_BACKGROUND:
                self._buffer.setdefault(using, []).extend(operations)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    flush = self._submit(self._flush_buffer, publish)
                    self._pending.append((time.monotonic(), flush))
                return
            future = self._submit(self._publish_round, publish, list(operations), using)
            self._pending.append((time.monotonic(), future))
        try:
            future.result(timeout=timeout)
        except FutureTimeout:
            log_event(
                logging.WARNING, "publish_timeout", count=count, timeout=timeout, fallback="poller"
            )
            self._back_off(settings.POLL_INTERVAL.total_seconds())

    def _flush_buffer(self, publish: Callable[[Sequence[Any], str], Publisher]) -> None:
        # Linger a moment so that the enqueues of a busy process share chunk messages (nobody
        # waits on this thread in background mode; the operations just run that much later).
        time.sleep(self.LINGER_SECONDS)
        with self._lock:
            buffer, self._buffer = self._buffer, {}
            self._flush_scheduled = False
        for using, operations in buffer.items():
            self._publish_round(publish, operations, using)

    def _publish_round(
        self,
        publish: Callable[[Sequence[Any], str], Publisher],
        operations: list[Any],
        using: str,
    ) -> None:
        back_off = get_settings().POLL_INTERVAL.total_seconds()
        try:
            if publish(operations, using).broker_down:
                self._back_off(back_off)
        except Exception as exc:  # a round never raises broker errors; anything else is a bug
            log_event(
                logging.WARNING,
                "publish_failed",
                count=len(operations),
                error=repr(exc),
                fallback="poller",
            )
            self._back_off(back_off)

    def _back_off(self, seconds: float) -> None:
        with self._lock:
            self._skip_until = time.monotonic() + seconds

    def drain(self) -> None:
        """Wait (at most ``PUBLISH_TIMEOUT``) for rounds still pending; runs at exit, and tests
        of ``PUBLISH_IN_BACKGROUND`` call it before looking at the broker."""
        with self._lock:
            futures = [future for _, future in self._pending]
        if futures:
            wait(futures, timeout=get_settings().PUBLISH_TIMEOUT.total_seconds())

    def reset(self) -> None:
        """Forget past failures (tests that bring a broker back call this)."""
        with self._lock:
            self._skip_until = 0.0


def _serve(jobs: SimpleQueue[_Job]) -> None:
    """The publishing thread: run the jobs in order, forever (it dies with the process)."""
    while True:
        future, fn, args = jobs.get()
        try:
            fn(*args)
        except BaseException as exc:  # rounds catch their own errors; this is a bug
            future.set_exception(exc)
        else:
            future.set_result(None)


#: The process-wide instance used by the Celery dispatcher.
bounded_publishing = BoundedPublishing()
