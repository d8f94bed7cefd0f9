"""The Celery tasks: thin wrappers that ask the engine to claim and run.

Messages carry only primary keys (or a queue name) and an optional database alias; a handler is
found only by looking up the claimed row's ``operationtype`` in the registry. A message for an
operation that was deleted, cancelled, claimed elsewhere, finished or is not yet due does
nothing but log (invariants 1 and 8), except that a message arriving a moment before its
operations are due waits for them (see :data:`EARLY_WAIT`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings as django_settings
from django.db import InterfaceError, OperationalError, connections

from batchframework.clock import NOISE, database_now, now_expression
from batchframework.conf import is_queue_name
from batchframework.engine import BatchRunner, claim_due, write_alias
from batchframework.engine._common import claimer_name
from batchframework.engine.claim import claims_of
from batchframework.models import BatchOperation
from batchframework.registry import registry
from batchframework.signals import log_event

from .names import DRAIN_TASK, POLL_TASK, RUN_OPERATIONS_TASK
from .shutdown import worker_shutting_down

T = TypeVar("T")

#: Most ids one message may name; larger messages are refused as malformed, so the dispatcher
#: never sends more in one, whatever ``BATCH_SIZE`` says.
MAX_IDS_PER_MESSAGE = 10_000

#: The largest id an operation can have (``BigAutoField``: a signed 64-bit integer on every
#: supported database). A larger one would fail the claim's query (SQLite: ``OverflowError``),
#: and with it the valid ids of its message.
MAX_ID = 2**63 - 1

#: How long a ``run_operations`` message waits for operations it names that are not due yet.
#: Celery fires an ETA by the worker's clock, and the claim judges "due" by the database's: a
#: worker whose clock runs a few milliseconds ahead (ordinary NTP error between hosts) gets
#: every ETA message that much early. Without the wait those operations would wait for the
#: poller's next drain, up to a poll interval late. Operations due later than this are left to
#: their own message or the poller.
EARLY_WAIT = timedelta(seconds=1)


def _valid_alias(using: Any) -> str | None:
    if using is None:
        return None
    if isinstance(using, str) and using in django_settings.DATABASES:
        return using
    raise ValueError(f"unknown database alias {using!r}")


def _valid_ids(ids: Any) -> list[int]:
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_IDS_PER_MESSAGE:
        raise ValueError(f"ids must be a non-empty list of at most {MAX_IDS_PER_MESSAGE} integers")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in ids):
        raise ValueError(f"ids must be integers from 1 to {MAX_ID}")
    return ids


def reconnecting(
    using: str | None, first_use: Callable[[], T], again: Callable[[], T] | None = None
) -> T:
    """Run a task's first database work, on a working connection even after a database restart.

    Celery's Django fix-up replaces broken connections only every ``2 * CELERY_DB_REUSE_MAX``
    tasks when that is set (as recommended), so a session lost to a restart or failover would
    fail every task until then. A connection Django saw fail is checked (and closed if broken)
    before the task uses it; checking every time would cost a round trip per task, so one that
    broke unseen is found by the first use failing, which is then run once more on a new
    connection: ``again`` if given, else ``first_use``, which must then be safe to repeat
    (see :func:`claiming` for a claim).
    """
    connection = connections[write_alias(using)]
    if connection.errors_occurred and not connection.in_atomic_block:
        # Never inside the caller's transaction (an eager task in a test's atomic block):
        # Django would close the connection under it.
        connection.close_if_unusable_or_obsolete()
    session = connection.connection  # None: the first use connects afresh
    try:
        return first_use()
    except (OperationalError, InterfaceError) as exc:
        # A failure inside ``atomic`` drops the session and the block's exit reconnects, so
        # "lost" is: not the session we started with, or one that no longer answers.
        lost = session is not None and (
            connection.connection is not session or not connection.is_usable()
        )
        if connection.in_atomic_block or not lost:
            raise  # a fresh session failed, or the caller's transaction: not ours to redo
        log_event(logging.WARNING, "database_reconnect", alias=connection.alias, error=repr(exc))
        connection.close()
        return (again or first_use)()


def claiming(
    using: str | None, claim: Callable[[str], list[BatchOperation]]
) -> list[BatchOperation]:
    """``claim(worker)`` through :func:`reconnecting`, under a worker name of its own.

    When the session is lost, the claim may have committed all the same (only its answer was
    lost): its operations are then found by that name and run here. Claimed again instead,
    they would be found running, wait for their leases to expire, and be counted as a lost
    worker's attempt (failed, with ``max_attempts=1``) without having run.
    """
    worker = claimer_name()
    return reconnecting(
        using,
        lambda: claim(worker),
        again=lambda: claims_of(worker, using=using) or claim(worker),
    )


#: A task's soft time limit (``task_soft_time_limit``, ``--soft-time-limit``) bounds a whole
#: message, up to ``BATCH_SIZE`` operations: raised inside a handler, it is not that handler's
#: failure. It ends the batch (the rest is given back, the interrupted one recovered at the
#: next poll), and Celery logs the task as failed.
INTERRUPTIONS: tuple[type[BaseException], ...] = (SoftTimeLimitExceeded,)


def run_claimed_batch(operations: list[Any], using: str | None) -> int:
    """Run a claimed batch; it ends after the handler in hand once the worker begins to shut
    down, giving the rest back (see :mod:`.shutdown`)."""
    with BatchRunner(using=using, interruptions=INTERRUPTIONS) as runner:
        return runner.run_batch(operations, stop=worker_shutting_down)


@shared_task(name=RUN_OPERATIONS_TASK, ignore_result=True)
def run_operations(ids: Any, using: Any = None) -> int:
    """Claim the named operations that are due (one statement per chunk) and run them."""
    try:
        ids = _valid_ids(ids)
        using = _valid_alias(using)
    except ValueError as exc:
        log_event(logging.ERROR, "message_rejected", task=RUN_OPERATIONS_TASK, reason=str(exc))
        return 0
    if _stopping(RUN_OPERATIONS_TASK):
        return 0
    claimed = claiming(
        using, lambda worker: claim_due(ids=ids, limit=len(ids), worker=worker, using=using)
    )
    won = {op.pk for op in claimed}
    # Looked for before the batch runs: a long batch must not let them fall due unnoticed
    # (a due operation no longer counts as early, and would wait for the poller's drain).
    early = (
        _due_soon([i for i in ids if i not in won], using)
        if len(won) < len(ids) and not worker_shutting_down()
        else None
    )
    ran = run_claimed_batch(claimed, using) if claimed else 0
    if early is not None:
        late_claimed = _claim_when_due(early, using)
        ran += run_claimed_batch(late_claimed, using) if late_claimed else 0
        won.update(op.pk for op in late_claimed)
    if len(won) < len(ids):
        if not worker_shutting_down():
            _warn_of_unhandled([i for i in ids if i not in won], using)
        log_event(
            logging.INFO,
            "message_noop",
            task=RUN_OPERATIONS_TASK,
            named=len(ids),
            claimed=len(won),
            ids=",".join(str(i) for i in ids if i not in won)[:500],
            reason="worker shutting down: left for the poller's drain"
            if worker_shutting_down()
            else "gone, cancelled, claimed elsewhere, finished or not yet due",
        )
    return ran


def _warn_of_unhandled(ids: list[int], using: str | None) -> None:
    """Warn of those of ``ids`` that wait, unprocessed, for a handler this worker lacks: the
    message's sender had one (a worker started before the handler was added, or one of a
    release without it, during a deploy). Claims skip them, and only a worker that has the
    handler runs them."""
    types = sorted(
        set(
            BatchOperation.objects.using(write_alias(using))
            .unprocessed()
            .filter(pk__in=ids)
            .exclude(operationtype__in=registry.operationtypes())
            .order_by()  # the model's ordering would make DISTINCT keep duplicates
            .values_list("operationtype", flat=True)
            .distinct()
        )
    )
    if types:
        log_event(
            logging.WARNING,
            "no_handler",
            task=RUN_OPERATIONS_TASK,
            operationtypes=",".join(types)[:500],
            hint="this worker has no handler registered for them: restart it after adding a "
            "handler, and check that it imports the app's batch_handlers module",
        )


class _DueSoon(NamedTuple):
    ids: list[int]
    due_by: float  # time.monotonic() at which all of them are due by the database's clock


def _due_soon(ids: list[int], using: str | None) -> _DueSoon | None:
    """Those of ``ids`` that are still unprocessed and come due within :data:`EARLY_WAIT` (by
    the database's clock), and when they will all be due."""
    alias = write_alias(using)
    due_times = list(
        BatchOperation.objects.using(alias)
        .unprocessed()
        .filter(pk__in=ids, run_after__gt=now_expression())
        .filter(run_after__lte=database_now(alias) + EARLY_WAIT)
        .values_list("pk", "run_after")
    )
    if not due_times:
        return None
    # The offset to the database's clock is known only beyond NOISE: wait that much longer.
    wait = (max(due for _, due in due_times) - database_now(alias) + NOISE).total_seconds()
    wait = min(max(wait, 0.0), (EARLY_WAIT + NOISE).total_seconds())
    log_event(
        logging.INFO,
        "message_early",
        task=RUN_OPERATIONS_TASK,
        ids=",".join(str(pk) for pk, _ in due_times)[:500],
        wait=f"{wait * 1000:.0f}ms",
    )
    return _DueSoon([pk for pk, _ in due_times], time.monotonic() + wait)


def _claim_when_due(due_soon: _DueSoon, using: str | None) -> list[Any]:
    # A worker shutting down leaves them for the poller's drain (to a worker that is not
    # stopping); checked again after the wait, in which the shutdown may have begun.
    if worker_shutting_down():
        return []
    time.sleep(max(due_soon.due_by - time.monotonic(), 0.0))
    if worker_shutting_down():
        return []
    return claim_due(ids=due_soon.ids, limit=len(due_soon.ids), using=using)


def _stopping(task: str) -> bool:
    """A task that starts once its worker is shutting down claims nothing: what it would have
    claimed it would give back at once (see :mod:`.shutdown`)."""
    if not worker_shutting_down():
        return False
    log_event(
        logging.INFO,
        "message_noop",
        task=task,
        reason="worker shutting down: left for the poller's drain",
    )
    return True


@shared_task(name=DRAIN_TASK, ignore_result=True)
def drain(queue: Any, using: Any = None) -> int:
    """Claim one batch of due operations of ``queue`` and run them."""
    if not is_queue_name(queue):  # as enqueue checks it: a NUL would fail PostgreSQL's query
        log_event(logging.ERROR, "message_rejected", task=DRAIN_TASK, reason="bad queue name")
        return 0
    try:
        using = _valid_alias(using)
    except ValueError as exc:
        log_event(logging.ERROR, "message_rejected", task=DRAIN_TASK, reason=str(exc))
        return 0
    if _stopping(DRAIN_TASK):
        return 0
    claimed = claiming(using, lambda worker: claim_due(queues=[queue], worker=worker, using=using))
    if not claimed:
        log_event(
            logging.INFO,
            "message_noop",
            task=DRAIN_TASK,
            queue=queue,
            reason="nothing due and unclaimed (others claimed it first)",
        )
        return 0
    return run_claimed_batch(claimed, using)


@shared_task(name=POLL_TASK, ignore_result=True)
def poll(using: Any = None) -> dict[str, int]:
    """The beat-driven poller; see :func:`batchframework_celery.poller.poll_once`."""
    from .poller import polled_databases

    try:
        using = _valid_alias(using)
    except ValueError as exc:
        log_event(logging.ERROR, "message_rejected", task=POLL_TASK, reason=str(exc))
        return {}
    # A tick may be repeated: it recovers, wakes workers and takes a window under a row lock.
    if using is not None:
        return _poll_database(using)
    totals: dict[str, int] = {}
    failure: Exception | None = None
    waiting: dict[str, int | None] = {}  # per queue, before this tick published anything
    for alias in polled_databases():
        try:
            counts = _poll_database(alias, waiting)
        except Exception as exc:  # the others are still polled; then the task fails
            log_event(logging.ERROR, "poll_failed", alias=alias, error=repr(exc))
            failure = failure or exc
            continue
        for name, count in counts.items():
            totals[name] = totals.get(name, 0) + count
    if failure is not None:
        raise failure
    return totals


def _poll_database(alias: str, waiting: dict[str, int | None] | None = None) -> dict[str, int]:
    from .poller import poll_once

    return reconnecting(alias, lambda: poll_once(using=alias, waiting=waiting))
