"""The Celery dispatcher: after commit, publish what is due within the horizon.

Operations due within ``DISPATCH_HORIZON`` are published to their queue with an ETA equal to
their ``run_after``, carrying only ids. Operations further out are not published: the poller
hands them to Celery as they come due, because Celery keeps ETA messages in worker memory and
re-delivers them when they outlive the broker's visibility timeout.

What publishing needs of an operation is copied from its instance (:class:`Publishable`) in the
caller's thread, before the round is handed to the background publisher: the caller owns the
instance and may change it meanwhile (a cancel by ``delete()`` sets its ``pk`` to ``None``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from django.utils import timezone

from batchframework.clock import known_clock_offset
from batchframework.conf import get_settings
from batchframework.dispatch import Dispatcher
from batchframework.engine import must_be_claimed_alone, write_alias
from batchframework.models import BatchOperation
from batchframework.signals import log_event

from .publish import Publisher, bounded_publishing

#: Operations whose due times lie within this span share one chunk message (ETA = the latest),
#: so an operation may start up to this much late in exchange for fewer messages. Operations
#: enqueued together with the same delay share chunks anyway.
CHUNK_SPREAD = timedelta(milliseconds=1)


class Publishable(NamedTuple):
    """What publishing needs of an operation, read from its instance once (a tuple: cheap to
    make for each of an ``enqueue_many``'s operations)."""

    pk: int
    run_after: datetime
    queue: str
    #: Whether it gets a message of its own (see ``must_be_claimed_alone``).
    alone: bool


def publishable(operations: Iterable[BatchOperation | Publishable]) -> list[Publishable]:
    """What publishing needs of ``operations``, without those deleted already (``pk`` is
    ``None``: a cancel in the enqueuing transaction): a ``None`` among a message's ids would
    make the worker reject the whole message, and with it the other operations it names."""
    return [
        op
        if isinstance(op, Publishable)
        else Publishable(op.pk, op.run_after, op.queue, must_be_claimed_alone(op))
        for op in operations
        if op.pk is not None
    ]


def chunk_by_due_time(
    operations: Sequence[Publishable], size: int
) -> list[tuple[datetime, list[int]]]:
    """Group operations (one queue) into chunks of at most ``size`` ids whose due times lie
    within :data:`CHUNK_SPREAD`; each chunk's ETA is its latest due time, so none runs early."""
    chunks: list[tuple[datetime, list[int]]] = []
    first_due: datetime | None = None
    for operation in sorted(operations, key=lambda op: op.run_after):
        due = operation.run_after
        if (
            chunks
            and first_due is not None
            and len(chunks[-1][1]) < size
            and due - first_due <= CHUNK_SPREAD
        ):
            chunks[-1] = (due, [*chunks[-1][1], operation.pk])
        else:
            chunks.append((due, [operation.pk]))
            first_due = due
    return chunks


class CeleryDispatcher(Dispatcher):
    """Publishes ``batchframework.run_operations`` messages for operations due soon."""

    @property  # a class attribute in Dispatcher; here it depends on Celery's configuration
    def dispatches_retries(self) -> bool:  # type: ignore[override]
        """Not in eager mode, which would run a retry inside the failed attempt's finish, so
        that the attempts of a handler that keeps failing nest (as ``ImmediateDispatcher``)."""
        from .tasks import run_operations

        return not run_operations.app.conf.task_always_eager

    def dispatch(self, operations: Sequence[BatchOperation], *, using: str) -> None:
        from .tasks import run_operations

        if using not in _warned_unpolled:
            _warn_if_unpolled(using)
        if run_operations.app.conf.task_always_eager:
            # Eager mode runs the tasks here, in the caller's thread and transaction context.
            publish_operations(operations, using=using)
            return
        # Read here, in the caller's thread: the publishing thread may run after the caller
        # has changed the instances (deleted one, say), and must not read them then.
        copies = publishable(operations)
        if copies:
            bounded_publishing.run(copies, using=using, publish=_publish)


class RelayDispatcher(CeleryDispatcher):
    """On PostgreSQL, ``enqueue`` announces operations with NOTIFY and the workers publish.

    The web process then never talks to the broker for a single ``enqueue``: its INSERT
    carries a ``pg_notify`` (delivered on commit) and the relay thread of one Celery worker
    (``batchframework_celery.relay``) publishes the messages. That saves the caller a publish
    per operation. Everything else is :class:`CeleryDispatcher`'s: ``enqueue_many`` and
    ``replace=True`` enqueues, other databases, and eager mode publish after commit.
    """

    def notify_channel(self, using: str) -> str | None:
        from .relay import CHANNEL
        from .tasks import run_operations

        if using != write_alias() or run_operations.app.conf.task_always_eager:
            return None  # no relay listens there; eager mode runs in the caller
        return CHANNEL


#: Databases this process has warned about (once each).
_warned_unpolled: set[str] = set()


def _warn_if_unpolled(using: str) -> None:
    from .poller import polled_databases

    if using not in polled_databases():
        _warned_unpolled.add(using)
        log_event(
            logging.WARNING,
            "database_not_polled",
            alias=using,
            hint="add it to BATCHFRAMEWORK['POLL_DATABASES']: without a poller, its operations "
            "due beyond DISPATCH_HORIZON, or whose message is lost, never run",
        )


def _publish(operations: Sequence[Publishable], using: str) -> Publisher:
    return publish_operations(operations, using=using)


def publish_operations(
    operations: Sequence[BatchOperation | Publishable],
    *,
    using: str | None = None,
    horizon: timedelta | None = None,
    now: datetime | None = None,
) -> Publisher:
    """Publish the operations due within ``horizon`` (default ``DISPATCH_HORIZON``) of ``now``
    (default: this process's clock, or the database's if that is ahead), which are stored in
    ``using`` (default: the router's write database for operations). Instances whose ``pk`` is
    ``None`` (deleted) are left out."""
    from .tasks import MAX_IDS_PER_MESSAGE, run_operations

    settings = get_settings()
    if now is None:
        # The later of this process's clock and the database's: a worker (the relay, a retry)
        # whose clock is behind would judge operations beyond the horizon that the poller's
        # window, judged by the database's and the web process's clocks, counts as published.
        # Publishing one a little early costs only an ETA message.
        now = timezone.now() + max(timedelta(0), known_clock_offset(using))
    limit = now + (horizon if horizon is not None else settings.DISPATCH_HORIZON)
    by_queue: dict[str, list[Publishable]] = defaultdict(list)
    for operation in publishable(operations):
        if operation.run_after <= limit:
            by_queue[operation.queue].append(operation)
    # Always named: a message without it means the worker's router's choice, which need not be
    # the database this operation was written to (``enqueue(using=...)``, or other settings).
    kwargs = {"using": write_alias(using)}
    # A chunk the size of a claim, but never larger than the tasks accept (BATCH_SIZE may be).
    size = min(settings.BATCH_SIZE, MAX_IDS_PER_MESSAGE)
    with Publisher() as publisher:
        for queue, queued in by_queue.items():
            # One to be claimed alone gets a message of its own: a claim stops before it, so in
            # a shared message it and those after it would wait for the poller's drain.
            alone = [op for op in queued if op.alone]
            if alone:
                queued = [op for op in queued if not op.alone]
            # Operations already due need no ETA: they share chunks whatever their due times.
            due_now = [op.pk for op in queued if op.run_after <= now]
            chunks = [(now, due_now[i : i + size]) for i in range(0, len(due_now), size)]
            chunks += chunk_by_due_time([op for op in queued if op.run_after > now], size)
            chunks += [(op.run_after, [op.pk]) for op in alone]
            for due, ids in chunks:
                eta = due if due > now else None
                publisher.publish(run_operations, [ids], queue=queue, eta=eta, kwargs=kwargs)
    return publisher
