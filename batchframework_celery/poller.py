"""The poller's logic, run by the ``batchframework.poll`` task on every beat tick.

1. Recover operations whose lease expired (their worker died).
2. For each queue with due operations, publish ``drain`` messages: workers then claim batches
   with ``SKIP LOCKED``. The database, not the broker, says what is due, so operations whose
   message was never sent, or was lost with the broker's state, run anyway.
   Messages already waiting in a queue count against its drains, except that a queue whose
   oldest due operation has waited over two ticks gets one drain anyway (see
   :data:`MAX_WAITING_FOR_A_STARVED_DRAIN`).
3. Publish operations coming due before the next tick, which were beyond the dispatch horizon
   when they were enqueued (and so have no message), with an ETA, so they are not late by a
   poll interval. A watermark in the database (:class:`~.models.PollerWatermark`) says how far
   ahead earlier ticks published, so each tick starts where the last one ended: a late tick
   leaves no gap, and operations are published once.

Running two pollers at once (two beats) is harmless: claims decide, messages only wake workers.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import F, Q

from batchframework.clock import database_now
from batchframework.conf import get_settings
from batchframework.engine import claims_needed, recover_expired, write_alias
from batchframework.models import BatchOperation
from batchframework.registry import registry

from .dispatcher import publish_operations
from .models import PollerWatermark
from .publish import Publisher

#: Most drain messages one tick publishes per queue.
MAX_DRAINS_PER_QUEUE = 64

#: Below this many waiting messages, a queue whose oldest due operation has waited more than
#: two ticks gets a drain even though messages wait: those wake workers only for the
#: operations they name, and one due without a message (lost, or put back by recovery) would
#: otherwise wait for the queue to empty. Above it, nothing is added: a queue no worker
#: consumes must not fill the broker with one message per tick forever.
MAX_WAITING_FOR_A_STARVED_DRAIN = 1000

#: The watermark row of the scheduling window (one per database).
WATERMARK_NAME = "scheduled"


def polled_databases() -> list[str]:
    """The databases a poll task without ``using`` (as beat sends it) polls: ``POLL_DATABASES``,
    or else the router's write database for operations."""
    return list(get_settings().POLL_DATABASES) or [write_alias()]


def poll_once(
    *, using: str | None = None, waiting: dict[str, int | None] | None = None
) -> dict[str, int]:
    """One poller tick on ``using`` (default: the router's write database for operations).
    Returns counts of what it did (for logs and tests).

    ``waiting``, shared by the ticks of several databases, keeps each queue's count of waiting
    messages as the first of them found it: the drains an earlier database just published
    would otherwise count as waiting for this one's operations, which they don't claim."""
    from .tasks import drain

    settings = get_settings()
    # None means where operations are written (the router's choice), as for enqueue and the
    # tasks: beat's PeriodicTask has no kwargs.
    alias = write_alias(using)
    recovered = recover_expired(using=alias)
    types = registry.operationtypes()
    due_by_queue = claims_needed(operationtypes=types, batch_size=settings.BATCH_SIZE, using=alias)
    kwargs = {"using": alias}  # always: the worker's router need not agree with ours
    expires = settings.POLL_INTERVAL.total_seconds() * 2
    with Publisher() as publisher:
        for queue, (_, claims) in due_by_queue.items():
            wanted = min(MAX_DRAINS_PER_QUEUE, claims)  # one claim_due per drain
            # Messages still waiting in the queue will wake workers anyway; more would only
            # pile up while no worker consumes it (Redis keeps expired messages until one
            # does). A queue the broker can't count gets them all.
            if waiting is not None and queue in waiting:
                in_queue = waiting[queue]
            else:
                in_queue = publisher.waiting(drain, queue)
                if waiting is not None:
                    waiting[queue] = in_queue
            count = wanted if in_queue is None else max(0, wanted - in_queue)
            starved = (
                not count
                and in_queue is not None
                and in_queue < MAX_WAITING_FOR_A_STARVED_DRAIN
                and _starving(alias, queue, types)
            )
            if starved:
                # Behind the waiting messages: it must not expire before it reaches a worker
                # (the cap bounds how many such drains can pile up).
                publisher.publish(drain, [queue], queue=queue, kwargs=kwargs)
            for _ in range(count):
                # A drain that waited longer than two ticks is stale (a later tick sent fresh
                # ones): workers discard it unrun.
                publisher.publish(drain, [queue], queue=queue, kwargs=kwargs, expires=expires)
    drains = publisher.published
    soon = _take_window(alias)
    # Judged on the clock the window was measured on: a process clock behind the database's
    # would leave the window's end taken but unpublished.
    scheduled = (
        publish_operations(
            soon, using=alias, horizon=settings.POLL_INTERVAL * 2, now=database_now(alias)
        ).published
        if soon
        else 0
    )
    return {
        "recovered": recovered,
        "due": sum(due for due, _ in due_by_queue.values()),
        "drain_messages": drains,
        "scheduled": len(soon),
        "scheduled_messages": scheduled,
        "publish_failures": publisher.failed,
    }


def _starving(alias: str, queue: str, types: list[str]) -> bool:
    """Whether an operation of ``queue`` has been due for over two poll intervals (a drain
    claims the longest due first)."""
    overdue = database_now(alias) - get_settings().POLL_INTERVAL * 2
    return (
        BatchOperation.objects.db_manager(alias)
        .due()
        .filter(queue=queue, operationtype__in=types, run_after__lt=overdue)
        .exists()
    )


def _take_window(alias: str) -> list[BatchOperation]:
    """The operations nobody has published yet that come due before the tick after next.

    Of every operationtype, also those without a handler here: the watermark is shared, so
    an operation this poller left out would be left out by the next one too, even one that has
    its handler (a newer release's, during a rolling deploy). Its message goes to the queue
    stored on it; a worker without the handler that takes it does nothing, and a drain runs
    the operation once it is due.

    Those were beyond the horizon when enqueued, or when a failed attempt put them back for a
    retry: the worker that recorded the failure publishes a retry due within the horizon
    itself. Its attempt started before it failed, so a retry due later than the horizon after
    that start may have been beyond it (at worst it gets a second, harmless message); one due
    sooner was not. The window runs from the watermark (where the previous tick's ended; now,
    if that has passed) to one and a half intervals ahead, and the watermark moves to its end
    in the same transaction, under a row lock: a concurrent poller waits, then finds the window
    taken. An operation that comes due under the watermark without a message (its publish
    failed) is run by the drain of the tick after it came due.
    """
    settings = get_settings()
    manager = BatchOperation.objects.db_manager(alias)
    marks = PollerWatermark.objects.using(alias)
    for _ in range(2):  # the second time, the mark exists
        with transaction.atomic(using=alias):
            now = database_now(alias)
            end = now + settings.POLL_INTERVAL * 3 / 2
            mark = marks.select_for_update().filter(name=WATERMARK_NAME).first()
            if mark is not None:
                start: datetime = max(now, mark.published_until)
                if start >= end:
                    return []
                mark.published_until = end
                mark.save(update_fields=["published_until"], using=alias)
                return list(
                    manager.unprocessed()
                    .filter(run_after__gt=start, run_after__lte=end)
                    .filter(
                        Q(run_after__gt=F("created_datetime") + settings.DISPATCH_HORIZON)
                        | Q(
                            attempts__gt=0,
                            run_after__gt=F("started_running_datetime") + settings.DISPATCH_HORIZON,
                        )
                    )
                    .only("pk", "run_after", "queue", "claimed_by")
                )
        # The first tick on this database: the mark is created, due now, in a transaction of
        # its own that commits at once, and then taken as above. Created under the lock
        # instead, concurrent first ticks deadlocked on MySQL (each locked the gap where the
        # row would go, or waited on another's uncommitted duplicate, then inserted).
        marks.get_or_create(name=WATERMARK_NAME, defaults={"published_until": now})
    return []
