"""Running a claimed operation and recording how it went, fenced by the claim (invariant 2).

A finish, failure or retry is one UPDATE that applies only while the row is still running under
the same claim token; a worker that lost its lease and finishes late changes nothing. Handlers
run outside any transaction of ours, except ``atomic=True`` handlers, whose writes commit
together with the finish so that they happen exactly once.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, transaction

from ..clock import database_now, now_expression
from ..errors import ErrorDetails, describe_exception, format_error
from ..exceptions import HandlerOutputError, HandlerRolledBackError
from ..jsondata import encode_json
from ..models import BatchOperation
from ..registry import Handler, registry
from ..signals import log_event, operation_finished, operation_retry_scheduled, operation_started
from ._common import (
    approximately_now,
    replace_lost_sessions,
    time_after,
    unclaimed_mark,
    write_alias,
)
from .claim import claim
from .keeper import lease_keeper


class RunOutcome(enum.Enum):
    """What happened to one claimed operation."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # attempts spent; finished as failed
    RETRY_SCHEDULED = "retry_scheduled"  # put back as unprocessed with a backoff
    LOST_CLAIM = "lost_claim"  # the lease was lost before the finish: nothing was recorded
    NOT_CLAIMED = "not_claimed"  # someone else has it, or it is gone, or not due


def _fenced(operation: BatchOperation, alias: str) -> Any:
    return BatchOperation.objects.db_manager(alias).filter(
        pk=operation.pk,
        status=BatchOperation.STATUS_RUNNING,
        claimed_by=operation.claimed_by,
    )


def _finish_success(
    operation: BatchOperation,
    output: Any,
    alias: str,
    *,
    announce: bool = True,
    report_loss: bool = True,
) -> RunOutcome:
    if not _fenced(operation, alias).update(
        status=BatchOperation.STATUS_FINISHED,
        result=BatchOperation.RESULT_SUCCESSFUL,
        finished_datetime=now_expression(),
        output_data=output,
        lease_expires_at=None,
    ):
        return _lost(operation) if report_loss else RunOutcome.LOST_CLAIM
    _mark_successful(operation, output, alias)
    if announce:
        _announce_success(operation)
    return RunOutcome.SUCCEEDED


def _mark_successful(operation: BatchOperation, output: Any, alias: str) -> None:
    operation.finished_datetime = approximately_now(alias)
    operation.status = BatchOperation.STATUS_FINISHED
    operation.result = BatchOperation.RESULT_SUCCESSFUL
    operation.output_data = output
    operation.lease_expires_at = None


def _announce_success(operation: BatchOperation) -> None:
    operation_finished.send(sender=BatchOperation, operation=operation, succeeded=True, error=None)


def _finish_failure(
    operation: BatchOperation, registered: Handler, error: ErrorDetails, alias: str
) -> RunOutcome:
    last_error = format_error(error)
    if operation.attempts < registered.resolved_max_attempts():
        backoff = registered.backoff_for(operation.attempts)
        if not _fenced(operation, alias).update(
            status=BatchOperation.STATUS_UNPROCESSED,
            run_after=time_after(backoff),
            last_error=last_error,
            # Claimed alone because it was marked so: it stays marked.
            claimed_by=unclaimed_mark(operation.claimed_by),
            lease_expires_at=None,
        ):
            return _lost(operation)
        operation.status = BatchOperation.STATUS_UNPROCESSED
        operation.last_error = last_error
        operation.run_after = approximately_now(alias) + backoff
        operation_retry_scheduled.send(
            sender=BatchOperation, operation=operation, error=error, attempt=operation.attempts
        )
        _dispatch_retry(operation, backoff, alias)
        return RunOutcome.RETRY_SCHEDULED
    output = {"error": dict(error)}
    if not _fenced(operation, alias).update(
        status=BatchOperation.STATUS_FINISHED,
        result=BatchOperation.RESULT_FAILED,
        finished_datetime=now_expression(),
        output_data=output,
        last_error=last_error,
        lease_expires_at=None,
    ):
        return _lost(operation)
    operation.status = BatchOperation.STATUS_FINISHED
    operation.result = BatchOperation.RESULT_FAILED
    operation.finished_datetime = approximately_now(alias)
    operation.output_data = output
    operation.last_error = last_error
    operation_finished.send(
        sender=BatchOperation, operation=operation, succeeded=False, error=error
    )
    return RunOutcome.FAILED


def _dispatch_retry(operation: BatchOperation, backoff: timedelta, alias: str) -> None:
    """Hand the retry to the dispatcher once the failure is committed, as ``enqueue`` would a
    delayed operation: with Celery it is published with an ETA instead of waiting for the
    poller, whose look-ahead window may already have passed its due time."""
    from ..dispatch import get_dispatcher
    from .enqueue import dispatch_on_commit

    dispatcher = get_dispatcher()
    if not (dispatcher.dispatches_anything and dispatcher.dispatches_retries):
        return
    # The row holds the database's own ``now + backoff``; this estimate only times the message
    # (a message that arrives early claims nothing, and the poller's drain runs the retry).
    operation.run_after = database_now(alias) + backoff
    # The dispatcher gets the row as it will be once committed: still marked to be claimed
    # alone if it was (its message must name it alone). The instance keeps its claim token:
    # the runner fences by it should the retry's transaction roll back (an atomic handler).
    retry = copy.copy(operation)
    retry.claimed_by = unclaimed_mark(operation.claimed_by)
    dispatch_on_commit([retry], alias)


def _lost(operation: BatchOperation) -> RunOutcome:
    log_event(
        logging.WARNING,
        "finish_fenced",
        id=operation.pk,
        operationtype=operation.operationtype,
        claimed_by=operation.claimed_by,
        reason="claim_lost_lease_expired",
    )
    return RunOutcome.LOST_CLAIM


class ReturnedThenInterrupted(BaseException):
    """The handler returned ``output``, and then one of the ``interruptions`` landed in the
    engine's own work after it (leaving the lease keeper's block, checking the output): the run
    is the handler's success, to record before the interruption goes on. (A ``BaseException``,
    so that no ``except Exception`` takes it for the handler's failure.)"""

    def __init__(self, output: Any, interruption: BaseException) -> None:
        super().__init__(interruption)
        self.output = output
        self.interruption = interruption
        #: What was recorded of the run, once it was (``None``: held, to be recorded later).
        self.outcome: RunOutcome | None = None


def _call(
    registered: Handler,
    operation: BatchOperation,
    alias: str | None = None,
    interruptions: tuple[type[BaseException], ...] = (),
) -> Any:
    """Call the handler; with ``alias`` (a handler that is not atomic), its lease is kept alive
    meanwhile (an atomic handler's row lock already keeps recovery away), and a caller's
    transaction survives a database error in it. One of the ``interruptions`` that lands once
    the handler has returned raises :class:`ReturnedThenInterrupted`."""
    returned = False
    output: Any = None
    try:
        if alias is not None and operation.claimed_by:
            with (
                lease_keeper.keep(operation, registered.resolved_lease(), alias),
                _shielding_callers_transaction(alias),
            ):
                output = registered.function(operation)
                returned = True
        elif alias is not None:
            with _shielding_callers_transaction(alias):
                output = registered.function(operation)
                returned = True
        else:
            output = registered.function(operation)
            returned = True
        check_output(output)
    except interruptions as exc:
        if returned:
            raise ReturnedThenInterrupted(output, exc) from None
        raise
    return output


def check_output(output: Any) -> None:
    """Raise :class:`HandlerOutputError` for a return value ``output_data`` can't store."""
    try:
        encode_json(output, what="handler return value")
    except ValueError as exc:
        raise HandlerOutputError(str(exc)) from exc


@contextlib.contextmanager
def _shielding_callers_transaction(alias: str) -> Iterator[None]:
    """Run a handler that is not atomic so that a database error in it does not break the
    caller's transaction (``run_due()`` in a test's, eager Celery in a request's): the failure
    must still be recorded there. In autocommit (a worker) there is nothing to shield.

    A savepoint is rolled back only when the handler broke the transaction: it raised a
    database error, or one left the transaction unusable. Its other writes stay, as they do in
    a worker: a test that counts what a failing handler wrote sees what production would.
    """
    connection = connections[alias]
    if not connection.in_atomic_block:
        yield
        return
    savepoint = transaction.savepoint(using=alias)
    try:
        yield
    except BaseException as exc:
        broken = isinstance(exc, DatabaseError) or connection.needs_rollback
        _release_or_roll_back(savepoint, alias, broken=broken)
        raise
    if not _release_or_roll_back(savepoint, alias, broken=connection.needs_rollback):
        raise HandlerRolledBackError(
            "The handler returned but left the caller's transaction unusable: it caught a "
            "database error raised inside it. Its writes were rolled back. Wrap a statement "
            "that may fail in an atomic() block of its own."
        )


def _release_or_roll_back(savepoint: str, alias: str, *, broken: bool) -> bool:
    """Release ``savepoint``; or, when ``broken`` (the handler broke the transaction) or the release
    fails (an error the handler caught left it aborted), roll back to it, which makes the
    caller's transaction usable again. Whether it was released."""
    if not broken:
        try:
            transaction.savepoint_commit(savepoint, using=alias)
            return True
        except DatabaseError:
            pass
    # Unmarked first, as Django's atomic() does: no statement runs while it is marked.
    transaction.set_rollback(False, using=alias)
    try:
        transaction.savepoint_rollback(savepoint, using=alias)
    except BaseException:
        transaction.set_rollback(True, using=alias)  # still broken: the caller's to end
        raise
    return False


def run_claimed(operation: BatchOperation, *, using: str | None = None) -> RunOutcome:
    """Run the handler of an operation this process claimed, and record the outcome.

    ``Exception``\\s from the handler fail the attempt; ``BaseException``\\s (``SystemExit``,
    ``KeyboardInterrupt``) propagate and leave the operation running until its lease expires.
    """
    return run_interruptible(operation, using=using, interruptions=())


def run_interruptible(
    operation: BatchOperation,
    *,
    using: str | None,
    interruptions: tuple[type[BaseException], ...],
) -> RunOutcome:
    """:func:`run_claimed`, except that the ``interruptions`` (exceptions that interrupt the
    worker, not failures of the handler: a Celery task's soft time limit) propagate like
    ``KeyboardInterrupt`` instead of failing the attempt."""
    alias = using or operation._state.db or write_alias()
    registered = registry[operation.operationtype]
    operation_started.send(sender=BatchOperation, operation=operation)
    if registered.atomic:
        return _run_atomic(operation, registered, alias, interruptions)
    try:
        output = _call(registered, operation, alias, interruptions)
    except ReturnedThenInterrupted as late:
        # Recorded first: the interruption is not the handler's, and a run that was lost here
        # would run again (or, its attempts spent, be failed as a lost worker's).
        late.outcome = _finish_returned(operation, registered, late.output, alias)
        raise
    except interruptions:
        raise
    except Exception as exc:
        # The handler's error may be its session's loss: record the failure on a new one.
        replace_lost_sessions({alias})
        return _finish_failure(operation, registered, describe_exception(exc), alias)
    return _finish_success(operation, output, alias)


def _finish_returned(
    operation: BatchOperation, registered: Handler, output: Any, alias: str
) -> RunOutcome:
    """Record the run of a handler that returned ``output``, not yet checked."""
    failed = fail_unstorable_output(operation, registered, output, alias)
    return failed if failed is not None else _finish_success(operation, output, alias)


def fail_unstorable_output(
    operation: BatchOperation, registered: Handler, output: Any, alias: str
) -> RunOutcome | None:
    """Fail the run when ``output_data`` can't store the handler's ``output``: the outcome
    recorded, or ``None`` when the output is fine and the success is the caller's to record.
    (For a handler that returned before an interruption, whose output was not checked yet.)"""
    try:
        check_output(output)
    except HandlerOutputError as exc:
        return _finish_failure(operation, registered, describe_exception(exc), alias)
    return None


def _run_atomic(
    operation: BatchOperation,
    registered: Handler,
    alias: str,
    interruptions: tuple[type[BaseException], ...],
) -> RunOutcome:
    owns_transaction = not connections[alias].in_atomic_block
    succeeded = False
    committed: list[bool] = []
    try:
        with transaction.atomic(using=alias):
            if owns_transaction:
                # First of the commit's callbacks: an error after it came from a callback the
                # handler registered, once the run had committed.
                transaction.on_commit(lambda: committed.append(True), using=alias)
            # Lock our row (fenced) first: a late worker whose lease was recovered stops here.
            if not _fenced(operation, alias).select_for_update().exists():
                return _lost(operation)
            try:
                with transaction.atomic(using=alias):
                    output = _call(registered, operation)
                    if transaction.get_rollback(using=alias):
                        # Leaving the block would undo the handler's writes in silence, and the
                        # finish below would record a success without them.
                        raise HandlerRolledBackError(
                            "The handler returned but left its transaction marked for "
                            "rollback: it caught a database error raised inside it. Its writes "
                            "were rolled back. Wrap a statement that may fail in an atomic() "
                            "block of its own."
                        )
                    _check_deferred_constraints(alias)
            except interruptions:
                raise  # out of the outer block too: nothing of the handler's is committed
            except Exception as exc:
                # The savepoint rolled back the handler's writes; record the failure.
                return _finish_failure(operation, registered, describe_exception(exc), alias)
            outcome = _finish_success(operation, output, alias, announce=False, report_loss=False)
            if outcome is RunOutcome.LOST_CLAIM:
                if _deleted_by_its_handler(operation, alias):
                    # Its work is what it was asked to do: kept, with no row to record it in.
                    _mark_successful(operation, output, alias)
                    outcome = RunOutcome.SUCCEEDED
                else:
                    # The row lock makes this unlikely, but the writes must never outlive the
                    # finish.
                    transaction.set_rollback(True, using=alias)
                    return _lost(operation)
            succeeded = True
    except BaseException as exc:
        if committed:
            if succeeded:
                _announce_success(operation)  # it holds; the callback's error is the caller's
            raise
        if not (isinstance(exc, IntegrityError) and succeeded and owns_transaction):
            raise
        # The commit refused the handler's writes (SQLite checks foreign keys only then), and
        # the finish with them: the operation is running under our claim again.
        operation.status = BatchOperation.STATUS_RUNNING
        operation.result = BatchOperation.RESULT_NOT_AVAILABLE
        operation.output_data = None
        return _finish_failure(operation, registered, describe_exception(exc), alias)
    # Announced once it holds: in a transaction of ours, once it committed.
    _announce_success(operation)
    return outcome


def _deleted_by_its_handler(operation: BatchOperation, alias: str) -> bool:
    """Whether the row of ``operation``, locked by its atomic run since before the handler
    started, is gone: then the handler deleted it itself, in the run's transaction (deleting
    its context object cascades to it through a ``GenericRelation``). Rolled back as a lost
    claim, its work would be undone, and the operation run again until failed as a lost
    worker's."""
    if BatchOperation.objects.db_manager(alias).filter(pk=operation.pk).exists():
        return False
    log_event(
        logging.WARNING,
        "operation_deleted_by_handler",
        id=operation.pk,
        operationtype=operation.operationtype,
        hint="its work is kept; no row is left to record the outcome in",
    )
    return True


def _check_deferred_constraints(alias: str) -> None:
    """Check now the constraints PostgreSQL would check at commit (Django's foreign keys): a
    violation is then the handler's failure, in its savepoint, instead of the commit's. Not on
    SQLite, whose check reads every table; its commit failure is caught instead."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        connection.check_constraints()


def run(
    operation_id: Any,
    *,
    worker: str | None = None,
    now: datetime | None = None,
    using: str | None = None,
) -> RunOutcome:
    """Claim one operation by id and, if the claim was won, run it."""
    operation = claim(operation_id, worker=worker, now=now, using=using)
    if operation is None:
        return RunOutcome.NOT_CLAIMED
    return run_claimed(operation, using=using)
