"""Publishing messages to Celery, bounded in time and never raising into the caller.

Celery retries a failed publish by default, which can block a web request for seconds while
the broker is down. Here every publish is made with ``retry=False``; the first connection
failure stops the rest of the round (the poller will find those operations), so a dead broker
costs the caller at most one failed connection attempt.

``retry=False`` alone is not enough: kombu connects a producer's connection with its own retry
loop (sleeping 2 s, 4 s, ... until ``broker_connection_timeout``, 4 s by default), whatever the
publish's ``retry`` says. So the connection is established here first, with one immediate retry
(for a stale pooled connection) and a deadline of ``PUBLISH_TIMEOUT``.

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
from typing import Any

from amqp.exceptions import NotFound
from celery import Task
from celery.exceptions import QueueNotFound
from kombu.exceptions import ChannelError, KombuError, OperationalError

from batchframework.conf import get_settings
from batchframework.signals import log_event

#: What a passive declare of a queue that does not exist raises: py-amqp's ``NotFound``
#: (RabbitMQ), kombu's ``ChannelError`` (virtual transports such as Redis, for an empty queue).
_NO_SUCH_QUEUE: tuple[type[BaseException], ...] = (NotFound, ChannelError)

# Errors that mean "the broker can't be reached now": stop publishing this round.
BROKER_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    KombuError,
    OSError,
    TimeoutError,
)


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
        self._buffered = 0
        self._failure: BaseException | None = None
        self._declared: set[str] = set()
        self._always_eager: bool | None = None

    def __enter__(self) -> Publisher:
        self._round = ExitStack()
        return self

    def __exit__(self, *exc_info: object) -> None:
        round_, self._round = self._round, None
        batch, self._batch, self._producer = self._batch, None, None
        assert round_ is not None
        try:
            if batch is not None:
                if exc_info[0] is None and self._failure is not None:
                    exc_info = (type(self._failure), self._failure, None)
                try:
                    batch.__exit__(*exc_info)  # sends what it buffered; discards after a failure
                except BROKER_DOWN_ERRORS as exc:
                    self._broker_failed(exc, self._buffered, task=None, queue=None)
                else:
                    self.published += self._buffered
                self._buffered = 0
        finally:
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
        try:
            if self._eager(task):  # runs locally: no broker to connect to
                task.apply_async(args=args, kwargs=kwargs, **options)
            else:
                options["producer"] = self._round_producer(task)
                if queue in self._declared:
                    # Declared by this round's first message to it: kombu would copy and bind
                    # the queue again per message just to find it in its declaration cache.
                    options["declare"] = []
                task.apply_async(args=args, kwargs=kwargs, **options)
                self._declared.add(queue)
                if self._batch is not None:
                    self._buffered += 1  # counted as published once the batch is sent
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
            lost, self._buffered = self._buffered, 0
            self._broker_failed(exc, 1 + lost, task=task.name, queue=queue)
            return False
        self.published += 1
        return True

    def waiting(self, task: Task, queue: str) -> int | None:
        """How many messages wait in ``queue`` on the broker (not yet delivered to a worker),
        or ``None`` when that is not known (eager mode, the broker down or unable to say)."""
        if self.broker_down or self._eager(task):
            return None
        try:
            connection = self._round_producer(task).connection
            # A channel of its own: AMQP closes a channel whose passive declare fails.
            channel = connection.channel()
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            finally:
                with suppress(Exception):
                    channel.close()
        except _NO_SUCH_QUEUE:
            return 0  # never declared, or (Redis) emptied: nothing waits in it
        except BROKER_DOWN_ERRORS as exc:
            self._broker_failed(exc, 0, task=task.name, queue=queue)  # the round publishes no more
            return None
        except Exception as exc:
            log_event(logging.DEBUG, "queue_size_unknown", queue=queue, error=repr(exc))
            return None

    def _eager(self, task: Task) -> bool:
        # Read once per round: a lookup in Celery's configuration costs tens of microseconds.
        if self._always_eager is None:
            self._always_eager = bool(task.app.conf.task_always_eager)
        return self._always_eager

    def _round_producer(self, task: Task) -> Any:
        """The round's producer (connected), inside a kombu publish batch where supported."""
        if self._round is None:
            raise RuntimeError("Publish inside `with Publisher() as publisher:`.")
        if self._producer is None:
            producer = self._round.enter_context(task.app.producer_or_acquire())
            _connect(producer.connection)
            self._producer = producer
            if getattr(producer, "supports_batch_publish", False):
                batch = producer.batch()
                batch.__enter__()
                self._batch = batch
        return self._producer

    def _broker_failed(
        self, exc: BaseException, count: int, *, task: str | None, queue: str | None
    ) -> None:
        # Messages buffered in a failed batch may or may not have reached the broker; a
        # duplicate is harmless (claims are atomic) and a lost one is the poller's.
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
    ``PUBLISH_TIMEOUT``, instead of kombu's default retry loop with sleeps."""
    connection.ensure_connection(
        max_retries=1,
        interval_start=0,
        interval_step=0,
        interval_max=0,
        timeout=get_settings().PUBLISH_TIMEOUT.total_seconds(),
    )


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
