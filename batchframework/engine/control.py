"""Changing a pending operation from outside: cancel, postpone; and progress from inside.

Cancel and postpone act only on unprocessed rows, with a conditional write, so they can't race
a claim silently (invariant 3): either they win and the operation never runs early or at all,
or they report that it is too late.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, router, transaction
from django.db.models import ProtectedError, RestrictedError

from ..errors import storable_text
from ..models import BatchOperation
from ..registry import registry
from ..signals import log_event, operation_cancelled
from ._common import (
    claim_alias,
    read_committed_next,
    retrying_deadlocks,
    supports_skip_locked,
    time_after,
    write_alias,
)


class CancelOutcome(enum.Enum):
    """The answer of :func:`cancel`. Truthy only for :attr:`CANCELLED`."""

    CANCELLED = "cancelled"  #: it was pending and now never runs
    TOO_LATE_RUNNING = "too_late_running"  #: a worker already runs it; nothing changed
    TOO_LATE_FINISHED = "too_late_finished"  #: it already finished; nothing changed
    NOT_FOUND = "not_found"  #: no such operation (already cancelled or deleted)

    def __bool__(self) -> bool:
        return self is CancelOutcome.CANCELLED


def _pk(operation: BatchOperation | Any) -> Any:
    return operation.pk if isinstance(operation, BatchOperation) else operation


def _alias(operation: BatchOperation | Any, using: str | None) -> str:
    """Where to write: ``using``, else what the router says for this instance, as ``save()``
    asks it (an instance read from a replica is written to the primary; without a router, to
    the database it came from)."""
    if using:
        return using
    if isinstance(operation, BatchOperation):
        return router.db_for_write(BatchOperation, instance=operation)
    return write_alias()


def cancel(operation: BatchOperation | Any, *, using: str | None = None) -> CancelOutcome:
    """Make sure a pending operation never runs, by deleting it, atomically.

    The conditional UPDATE locks the row only if it is still unprocessed; the delete follows
    in the same transaction (cascading to rows that reference it, as ``delete()`` does).
    Inside a caller's transaction the cancel is final when that commits, and
    :data:`~batchframework.signals.operation_cancelled` is sent then, not if it rolls back.
    """
    pk = _pk(operation)
    alias = _alias(operation, using)
    manager = BatchOperation.objects.db_manager(alias)
    with transaction.atomic(using=alias):
        pending = manager.filter(pk=pk, status=BatchOperation.STATUS_UNPROCESSED)
        if pending.update(status=BatchOperation.STATUS_UNPROCESSED):
            manager.filter(pk=pk).delete()
            outcome = CancelOutcome.CANCELLED
        else:
            status = manager.filter(pk=pk).values_list("status", flat=True).first()
            outcome = {
                None: CancelOutcome.NOT_FOUND,
                BatchOperation.STATUS_RUNNING: CancelOutcome.TOO_LATE_RUNNING,
                BatchOperation.STATUS_FINISHED: CancelOutcome.TOO_LATE_FINISHED,
            }[status]
    if outcome is CancelOutcome.CANCELLED:
        # Once the cancel is final: in a caller's transaction that rolls back, it never was.
        _on_commit_announce(
            lambda: operation_cancelled.send(sender=BatchOperation, operation_id=pk), alias
        )
    else:
        log_event(logging.INFO, "cancel_refused", id=pk, reason=outcome.value)
    return outcome


#: How many operations :func:`cancel_many` cancels per transaction, so that it holds its row
#: locks (and SQLite's write lock) briefly, and stays within every database's parameter limit.
CANCEL_CHUNK = 500
#: How many times :func:`cancel_many` tries pending operations it found locked by others,
#: pausing this long (seconds) in between.
SKIPPED_PASSES = 5
SKIPPED_PAUSE = 0.02


def cancel_many(
    operations: Iterable[BatchOperation | Any], *, using: str | None = None
) -> list[Any]:
    """Cancel every one of ``operations`` (instances or primary keys) that is still pending,
    as :func:`cancel` cancels one; return the primary keys of those cancelled, in the order
    given (once each). The others are left as they are: running, finished or gone; protected
    by a row that references them (``on_delete=PROTECT``, which makes :func:`cancel` raise);
    or locked at that moment by someone else (being claimed, replaced, postponed or cancelled).

    :data:`CANCEL_CHUNK` operations per transaction, each chunk a locking SELECT of its pending
    rows that skips locked ones (on SQLite, which has no row locks, an UPDATE first takes the
    write lock), and their DELETE, cascading as Django's ``delete()`` does. Inside a caller's
    transaction the cancels are final when it commits, and
    :data:`~batchframework.signals.operation_cancelled` is sent for each then: for every one,
    even when a receiver raises (outside a transaction the first such error is raised once all
    were sent; inside one, Django logs it at the commit, whose other callbacks still run). A
    database error ends it, and the chunks before it stay cancelled.
    """
    if isinstance(operations, str | bytes | BatchOperation):
        raise TypeError(
            f"cancel_many() takes an iterable of operations or primary keys, not {operations!r}"
        )
    # Each operation's database and key, once each, in the order given: the same key on two
    # databases names two operations. Converted before anything is written, so that a value
    # that is no key (Django's ValueError) cancels nothing.
    given: dict[tuple[str, Any], None] = {}
    for operation in operations:
        pk = _pk(operation)
        if pk is None:  # an instance already deleted (or never saved): nothing to cancel
            continue
        key = _prepared_key(pk)
        if key is not None:
            given[(_alias(operation, using), key)] = None
    by_alias: dict[str, list[Any]] = defaultdict(list)
    for alias, key in given:
        by_alias[alias].append(key)
    cancelled: dict[str, list[Any]] = {}
    try:
        for alias, keys in by_alias.items():
            cancelled[alias] = []
            protected: list[Any] = []
            left = keys
            for _ in range(SKIPPED_PASSES):
                for start in range(0, len(left), CANCEL_CHUNK):
                    deleted, kept = _cancel_chunk(left[start : start + CANCEL_CHUNK], alias)
                    cancelled[alias] += deleted
                    protected += kept
                # A pending row skipped because it was locked may have been locked only for
                # a moment: a claim's scan (MySQL/MariaDB lock the rows they scan past), a
                # replace. Those still pending are tried again.
                left = _still_pending(keys, [*cancelled[alias], *protected], alias)
                if not left:
                    break
                time.sleep(SKIPPED_PAUSE)
    finally:
        # After every chunk (or the one that raised): a receiver's error must neither stop the
        # cancel half-way nor cost the others their signals.
        receiver_error = _announce_when_final(cancelled)
    done = {(alias, pk) for alias, pks in cancelled.items() for pk in pks}
    if len(given) > len(done):
        log_event(
            logging.INFO, "cancel_refused", count=len(given) - len(done), reason="not_pending"
        )
    if receiver_error is not None:
        raise receiver_error
    return [pk for alias, pk in given if (alias, pk) in done]


def _announce_when_final(cancelled: dict[str, list[Any]]) -> Exception | None:
    """Have ``operation_cancelled`` sent for each cancelled operation once its cancel is final:
    at once outside a transaction (then a receiver's error is returned), else when the
    caller's commits."""
    first_error: Exception | None = None
    for alias, pks in cancelled.items():
        if pks:
            try:
                _on_commit_announce(_announcing(pks), alias)
            except Exception as exc:
                first_error = first_error or exc
    return first_error


def _still_pending(keys: list[Any], tried: list[Any], alias: str) -> list[Any]:
    """Those of ``keys`` not ``tried`` (cancelled, or protected) that are pending (read without
    a lock), in order: none where pending rows are never skipped (SQLite waits for its write
    lock instead)."""
    done = set(tried)
    left = [key for key in keys if key not in done]
    if not left or not supports_skip_locked(alias):
        return []
    manager = BatchOperation.objects.db_manager(alias)
    pending: set[Any] = set()
    for start in range(0, len(left), CANCEL_CHUNK):
        pending.update(
            manager.filter(
                pk__in=left[start : start + CANCEL_CHUNK], status=BatchOperation.STATUS_UNPROCESSED
            ).values_list("pk", flat=True)
        )
    return [key for key in left if key in pending]


def _prepared_key(pk: Any) -> Any:
    """``pk`` as the database compares it (Django's ValueError for one that is no key), or
    ``None`` for an integer no row can have: SQLite can't even take it as a parameter."""
    field = BatchOperation._meta.pk
    assert field is not None
    key = field.get_prep_value(pk)
    if isinstance(key, int) and not -(2**63) <= key < 2**63:
        return None
    return key


def _cancel_chunk(keys: list[Any], alias: str) -> tuple[list[Any], list[Any]]:
    """Cancel the pending ones of ``keys`` in one transaction; return their keys, and those of
    the pending ones rows protect."""
    return retrying_deadlocks(
        alias, lambda: _cancel_pending(keys, alias), event="cancel_retried", count=len(keys)
    )


def _cancel_pending(keys: list[Any], alias: str) -> tuple[list[Any], list[Any]]:
    manager = BatchOperation.objects.db_manager(alias)
    read_committed_next(alias)  # MySQL/MariaDB: no gap locks for claims to deadlock with
    with transaction.atomic(using=alias):
        rows = manager.filter(pk__in=keys, status=BatchOperation.STATUS_UNPROCESSED)
        if supports_skip_locked(alias):
            # A row locked now is being claimed, run by an atomic handler, or changed by
            # someone else (a replace, a postpone, another cancel): left as it is, and not
            # reported cancelled, rather than waited for (an atomic handler may hold its row
            # for minutes; on MariaDB, waiting in this order deadlocks with claims).
            rows = rows.select_for_update(skip_locked=True)
        else:
            # SQLite: a read first would take a lock it can't upgrade to write later ("database
            # is locked" at once); a write first takes the write lock, waiting its turn.
            rows.update(status=BatchOperation.STATUS_UNPROCESSED)
        pending = list(rows.order_by("pk").values_list("pk", flat=True))
        if not pending:
            return [], []
        return _delete_unless_protected(manager, pending)


def _delete_unless_protected(manager: Any, pks: list[Any]) -> tuple[list[Any], list[Any]]:
    """Delete the operations ``pks``, except those that rows protect (``ProtectedError``,
    ``RestrictedError``: raised while Django collects what a delete cascades to, before it
    deletes anything); returns the keys deleted and those protected. Halves a refused set
    until it finds them: a few collects per protected operation, not one per operation."""
    try:
        manager.filter(pk__in=pks).delete()
    except (ProtectedError, RestrictedError) as exc:
        if len(pks) == 1:
            log_event(
                logging.INFO, "cancel_refused", id=pks[0], reason="protected", error=repr(exc)
            )
            return [], pks
        half = len(pks) // 2
        first, first_protected = _delete_unless_protected(manager, pks[:half])
        second, second_protected = _delete_unless_protected(manager, pks[half:])
        return first + second, first_protected + second_protected
    return pks, []


def _on_commit_announce(announce: Callable[[], Any], alias: str) -> None:
    """Run ``announce`` once the cancel is final. In a caller's transaction, a receiver's
    error is logged by Django rather than raised from the commit, where it would keep the
    commit's later callbacks (the dispatch of what the caller enqueued) from running."""
    in_transaction = connections[alias].in_atomic_block
    transaction.on_commit(announce, using=alias, robust=in_transaction)


def _announcing(pks: list[Any]) -> Callable[[], None]:
    # A function of its own, not a partial: Django names a robust callback by its qualname.
    def announce() -> None:
        _announce_cancelled(pks)

    return announce


def _announce_cancelled(pks: list[Any]) -> None:
    """Send ``operation_cancelled`` for each of ``pks``; a receiver's error is logged, and the
    first one raised once every signal was sent."""
    first_error: Exception | None = None
    for pk in pks:
        try:
            operation_cancelled.send(sender=BatchOperation, operation_id=pk)
        except Exception as exc:
            log_event(logging.ERROR, "report_failed", id=pk, error=repr(exc))
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def postpone(
    operation: BatchOperation | Any,
    delay: timedelta | float | None = None,
    *,
    run_after: datetime | None = None,
    using: str | None = None,
) -> bool:
    """Move a pending operation's due time to ``now + delay`` (or ``run_after``), and dispatch
    it again once the transaction commits.

    Returns ``False`` and changes nothing when the operation is no longer pending. The
    conditional UPDATE, and a read of the row when there is a dispatcher to hand it to.
    """
    from ..dispatch import get_dispatcher
    from .enqueue import dispatch_on_commit, resolve_run_after

    pk = _pk(operation)
    alias = _alias(operation, using)
    due = resolve_run_after(delay, run_after, alias)
    manager = BatchOperation.objects.db_manager(alias)
    with transaction.atomic(using=alias):
        if not manager.filter(pk=pk, status=BatchOperation.STATUS_UNPROCESSED).update(
            run_after=due
        ):
            log_event(logging.INFO, "postpone_refused", id=pk, reason="not_pending")
            return False
        if isinstance(operation, BatchOperation):
            operation.run_after = due
        if get_dispatcher().dispatches_anything:
            # Dispatched as stored, not as the caller's instance says: recovery may have marked
            # it to be claimed alone since the instance was read, and its message must then
            # name it alone. The UPDATE locked the row until the commit.
            dispatch_on_commit([manager.get(pk=pk)], alias)
    log_event(logging.INFO, "postponed", id=pk, run_after=due.isoformat())
    return True


def set_progress(
    operation: BatchOperation,
    done: int,
    total: int | None = None,
    message: str | None = None,
    *,
    using: str | None = None,
) -> bool:
    """Record progress of a running operation durably; renews the claim's lease.

    Returns ``False`` when the operation is no longer running under this claim (its lease was
    lost): a long handler may take that as a signal to stop.
    """
    # Checked before any query: a value the database refuses would raise its error inside the
    # handler's (or caller's) transaction, and break it.
    for name, value in (("done", done), ("total", total)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**63 - 1
        ):
            # 2**63 - 1: the most a PositiveBigIntegerField holds on every supported database.
            raise ValueError(
                f"{name} must be a non-negative integer of at most 2**63 - 1, not {value!r}"
            )
    text = None if message is None else str(message)
    # NUL is refused, as the manager's create methods refuse it in this column (lone
    # surrogates are escaped below).
    if text is not None and "\x00" in text:
        raise ValueError(f"message must not contain NUL characters: {message!r}")
    # A handler's operation is fenced by its claim, which lives where the claim read it; a
    # router may name another database for this model.
    alias = claim_alias(operation, using) if operation.claimed_by else _alias(operation, using)
    changes: dict[str, Any] = {"progress_done": done}
    if total is not None:
        changes["progress_total"] = total
    if text is not None:
        # Lone surrogates (not valid Unicode; the driver can't encode them) are written as
        # escapes, as error messages and abandon reasons are: a progress line is for people
        # to read, not worth failing a handler over. Escaped first, then cut to the column.
        changes["progress_message"] = storable_text(text)[:255]
    rows = BatchOperation.objects.db_manager(alias).filter(
        pk=operation.pk, status=BatchOperation.STATUS_RUNNING
    )
    if operation.claimed_by:
        rows = rows.filter(claimed_by=operation.claimed_by)
        registered = registry.get(operation.operationtype)
        if registered is not None:
            changes["lease_expires_at"] = time_after(registered.resolved_lease())
    updated = bool(rows.update(**changes))
    if updated:
        operation.progress_done = done
        if total is not None:
            operation.progress_total = total
        if message is not None:
            operation.progress_message = changes["progress_message"]
    else:
        log_event(
            logging.WARNING, "progress_refused", id=operation.pk, reason="not_running_under_claim"
        )
    return updated
