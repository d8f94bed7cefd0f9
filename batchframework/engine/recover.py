"""Lease recovery: operations whose worker died are put back, or failed when their attempts
are spent (invariant 7). Pollers and workers call this on every tick; no user-written reaper.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Concat

from ..clock import now_expression
from ..conf import get_settings
from ..errors import ErrorDetails
from ..models import BatchOperation
from ..registry import registry
from ..signals import log_event, operation_finished, operation_retry_scheduled
from ._common import BATCH_SUFFIX, ISOLATED, supports_skip_locked, write_alias

LOST_WORKER_ERROR_TYPE = "batchframework.WorkerLost"
LOST_WORKER_ERROR: ErrorDetails = {
    "type": LOST_WORKER_ERROR_TYPE,
    "message": "The worker running this operation was lost (its lease expired) and no "
    "attempts are left.",
    "traceback": "",
}
#: How every ``last_error`` recovery writes begins.
_LOST_PREFIX = "The worker running this operation was lost"


def _lost_message(attempt_word: str) -> str:
    return (
        f"{_LOST_PREFIX}: its lease expired before it finished ({attempt_word}). Last claimed by "
    )


def _announce(operations: list[BatchOperation]) -> None:
    """Send the signals of the operations recovery failed or put back for another attempt;
    an operation its own worker finished or retried just before recovery's UPDATE (SQLite,
    which locks no rows) was announced by that worker. A receiver's error reaches the caller
    once every operation was announced: one receiver must not keep the others' news."""
    failure: Exception | None = None
    for operation in operations:
        try:
            _announce_one(operation)
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def _announce_one(operation: BatchOperation) -> None:
    if not (operation.last_error or "").startswith(_LOST_PREFIX):
        return
    if operation.status == BatchOperation.STATUS_FINISHED and not operation.claimed_by:
        operation_finished.send(
            sender=BatchOperation,
            operation=operation,
            succeeded=False,
            error=dict(LOST_WORKER_ERROR),
        )
    elif operation.status == BatchOperation.STATUS_UNPROCESSED:
        operation_retry_scheduled.send(
            sender=BatchOperation,
            operation=operation,
            error={**LOST_WORKER_ERROR, "message": operation.last_error},
            attempt=operation.attempts,
        )


def recover_expired(
    *, now: datetime | None = None, limit: int | None = None, using: str | None = None
) -> int:
    """Recover up to ``limit`` running operations whose lease has expired.

    An operation claimed alone goes back to unprocessed (due at once) if it has attempts left,
    else it finishes as failed with a reason that says the worker was lost. An operation that
    was claimed in a batch goes back without the attempt being counted (the worker may have
    died running another one of the batch), marked to be claimed alone from now on. Every
    operation that goes back is marked so: if it killed its worker, the next death is its own.
    An operation claimed alone whose operationtype has no handler here goes back too, its
    attempt not counted: only a process that has the handler knows whether its attempts are
    spent (and a claim does not ask).
    An operation failed here is announced with
    :data:`~batchframework.signals.operation_finished`, one put back with its attempt counted
    with :data:`~batchframework.signals.operation_retry_scheduled`, once the recovery commits.
    Returns how many were recovered. A constant number of statements per call.
    """
    alias = write_alias(using)
    limit = limit or get_settings().BATCH_SIZE * 10
    manager = BatchOperation.objects.db_manager(alias)
    with transaction.atomic(using=alias):
        expired = manager.lease_expired(now).order_by("lease_expires_at")
        if supports_skip_locked(alias):
            expired = expired.select_for_update(skip_locked=True)
        rows = list(expired.values_list("pk", "operationtype", "attempts", "claimed_by")[:limit])
        if not rows:
            return 0
        uncounted: list[Any] = []  # held in a batch: maybe never started
        retry: list[Any] = []
        spent: list[Any] = []
        unjudged: list[Any] = []  # no handler here to judge its attempts by
        for pk, operationtype, attempts, claimed_by in rows:
            if claimed_by.endswith(BATCH_SUFFIX):
                uncounted.append(pk)
                continue
            registered = registry.get(operationtype)
            if registered is None:
                # Whether its attempts are spent is for a process that has its handler (one of
                # a newer release, during a rolling deploy), which only claims: back to
                # unprocessed, the attempt not counted, as for an operation held in a batch.
                unjudged.append(pk)
            elif attempts < registered.resolved_max_attempts():
                retry.append(pk)
            else:
                spent.append(pk)
        # Re-check the expiry in the UPDATE: a renewal may have landed since the read.
        still_expired: dict[str, Any] = {
            "status": BatchOperation.STATUS_RUNNING,
            "lease_expires_at__lt": now_expression(now),
        }
        recovered = 0
        # Put back with the attempt not counted: held in a batch (maybe never started), or
        # without a handler here to judge its attempts by.
        for ids, why in (
            (uncounted, "held in a batch; retried alone, attempt not counted"),
            (unjudged, "no handler where it was recovered; attempt not counted"),
        ):
            if ids:
                recovered += manager.filter(pk__in=ids, **still_expired).update(
                    status=BatchOperation.STATUS_UNPROCESSED,
                    attempts=F("attempts") - 1,
                    run_after=now_expression(now),
                    last_error=Concat(Value(_lost_message(why)), "claimed_by"),
                    claimed_by=ISOLATED,
                    lease_expires_at=None,
                )
        if retry:
            recovered += manager.filter(pk__in=retry, **still_expired).update(
                status=BatchOperation.STATUS_UNPROCESSED,
                run_after=now_expression(now),
                last_error=Concat(Value(_lost_message("will retry alone")), "claimed_by"),
                claimed_by=ISOLATED,
                lease_expires_at=None,
            )
        if spent:
            recovered += manager.filter(pk__in=spent, **still_expired).update(
                status=BatchOperation.STATUS_FINISHED,
                result=BatchOperation.RESULT_FAILED,
                finished_datetime=now_expression(now),
                last_error=Concat(Value(_lost_message("attempts spent")), "claimed_by"),
                output_data={"error": dict(LOST_WORKER_ERROR)},
                claimed_by="",
                lease_expires_at=None,
            )
        # Read as recovered, to announce once that holds (the rows are locked until then).
        announced = list(manager.filter(pk__in=retry + spent)) if retry or spent else []
    _announce(announced)
    if recovered:
        log_event(
            logging.WARNING,
            "leases_recovered",
            count=recovered,
            retried_alone=len(retry),
            batch_held_uncounted=len(uncounted),
            failed=len(spent),
            without_handler=len(unjudged),
        )
    return recovered
