"""Claiming: the single atomic conditional write that moves an operation from unprocessed to
running (invariant 1). Whoever's UPDATE matched the row owns this attempt; everyone else did
nothing and logs so.

A claim increments ``attempts``, sets a lease on the database clock, and writes a fresh claim
token to ``claimed_by``; finishing is fenced by that token (see :mod:`.run`). Operations whose
operationtype has no registered handler are never claimed, so the original's manual flow
(``mark_as_running()`` then ``finish()``) keeps working for them.

A batch claim counts an attempt for every operation in it, although only one runs at a time.
If the worker dies, recovery can't tell which one killed it, so it puts the whole batch back
without counting the attempt and marks each operation to be claimed alone from then on
(``claimed_by = "!isolated"``); a poison operation then uses up its own attempts only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.db import connections, transaction
from django.db.models import F
from django.utils import timezone

from ..clock import check_now, now_expression
from ..conf import get_settings
from ..exceptions import InvalidOperationError
from ..models import BatchOperation
from ..registry import registry
from ..signals import log_event
from ._common import (
    ISOLATED,
    claim_alias,
    mark_claimed_on,
    new_claim_token,
    read_committed_next,
    retrying_deadlocks,
    supports_skip_locked,
    time_after,
    unclaimed_mark,
    write_alias,
)
from .claim_postgresql import claim_due_postgresql

T = TypeVar("T")


def _claim_update(lease: timedelta, token: str, now: datetime | None) -> dict[str, Any]:
    return {
        "status": BatchOperation.STATUS_RUNNING,
        "result": BatchOperation.RESULT_NOT_AVAILABLE,
        "attempts": F("attempts") + 1,
        "claimed_by": token,
        "started_running_datetime": now_expression(now),
        "lease_expires_at": time_after(lease, now),
        "debounce_key": None,
    }


def _mark_claimed(
    operation: BatchOperation, token: str, lease: timedelta, now: datetime | None, alias: str
) -> None:
    """Mirror the claim's UPDATE on the in-memory instance (times approximated locally)."""
    mark_claimed_on(operation, alias)
    started = now or timezone.now()
    operation.status = BatchOperation.STATUS_RUNNING
    operation.result = BatchOperation.RESULT_NOT_AVAILABLE
    operation.claimed_by = token
    operation.started_running_datetime = started
    operation.lease_expires_at = started + lease
    operation.debounce_key = None
    operation.attempts += 1


def claim(
    operation_id: Any,
    *,
    worker: str | None = None,
    now: datetime | None = None,
    using: str | None = None,
) -> BatchOperation | None:
    """Claim one operation by id, if it is unprocessed, due and has a handler.

    Returns the claimed operation, or ``None`` (and logs why) when it was deleted, cancelled,
    already claimed, finished, locked by another claim, a cancel or a replace, not yet due, or
    has no registered handler. Two statements, a locking read (``SKIP LOCKED``) and the
    compare-and-set UPDATE, in a transaction of their own: the handler gets the values the
    claim took, not ones an ``enqueue(replace=True)`` replaced between the two, and a mark to
    be claimed alone is not lost in that window.
    """
    alias = write_alias(using)
    return retrying_deadlocks(
        alias,
        lambda: _claim_locked(operation_id, alias=alias, worker=worker, now=now),
        id=operation_id,
    )


def _claim_locked(
    operation_id: Any, *, alias: str, worker: str | None, now: datetime | None
) -> BatchOperation | None:
    manager = BatchOperation.objects.db_manager(alias)
    rows = manager.filter(pk=operation_id)
    if supports_skip_locked(alias):
        # Locked: being claimed, cancelled or replaced, or run by an atomic handler; never
        # wait for that, whoever holds it sees to the operation.
        rows = rows.select_for_update(skip_locked=True)
    read_committed_next(alias)
    with transaction.atomic(using=alias):
        operation = rows.first()
        if operation is None:
            exists = manager.filter(pk=operation_id).exists()
            reason = "locked" if exists else "not_found"
            log_event(logging.INFO, "claim_skipped", id=operation_id, reason=reason)
            return None
        registered = registry.get(operation.operationtype)
        if registered is None:
            log_event(
                logging.WARNING,
                "claim_skipped",
                id=operation_id,
                reason="no_handler",
                operationtype=operation.operationtype,
            )
            return None
        if operation.status != BatchOperation.STATUS_UNPROCESSED:
            log_event(
                logging.INFO,
                "claim_skipped",
                id=operation_id,
                reason=f"already_{operation.status}",
            )
            return None
        token = new_claim_token(worker, alone=operation.claimed_by == ISOLATED)
        lease = registered.resolved_lease()
        won = manager.filter(
            pk=operation.pk,
            status=BatchOperation.STATUS_UNPROCESSED,
            attempts=operation.attempts,
            # Where the read locks nothing (SQLite), the mark must still be the one read.
            claimed_by=operation.claimed_by,
            run_after__lte=now_expression(now),
        ).update(**_claim_update(lease, token, now))
    if not won:
        log_event(logging.INFO, "claim_skipped", id=operation_id, reason="lost_race_or_not_due")
        return None
    _mark_claimed(operation, token, lease, now, alias)
    return operation


def claims_needed(
    *, operationtypes: Sequence[str], batch_size: int, using: str | None = None
) -> dict[str, tuple[int, int]]:
    """For each queue with due operations of ``operationtypes``: how many are due, and how many
    :func:`claim_due` calls of ``batch_size`` take them all, counting that an operation to be
    claimed alone takes a claim of its own and may cut the batch before it short (so two
    claims each, at most). One aggregate query."""
    from django.db.models import Count, Q

    rows = (
        BatchOperation.objects.db_manager(write_alias(using))
        .due()
        .filter(operationtype__in=list(operationtypes))
        .values_list("queue")
        .annotate(due=Count("pk"), alone=Count("pk", filter=Q(claimed_by=ISOLATED)))
        .values_list("queue", "due", "alone")
    )
    return {queue: (due, -(-(due - alone) // batch_size) + 2 * alone) for queue, due, alone in rows}


def claim_due(
    *,
    ids: Sequence[Any] | None = None,
    queues: Sequence[str] | None = None,
    operationtypes: Sequence[str] | None = None,
    limit: int | None = None,
    worker: str | None = None,
    now: datetime | None = None,
    using: str | None = None,
) -> list[BatchOperation]:
    """Claim up to ``limit`` due operations, highest priority then earliest due first.

    ``ids`` restricts the claim to those operations (a chunk named by a message); ``queues``
    and ``operationtypes`` restrict it to those queues and types.

    Rows are locked with ``SELECT … FOR UPDATE SKIP LOCKED`` where the database supports it, so
    concurrent claimers take disjoint batches; elsewhere (SQLite) the conditional UPDATE still
    guarantees one winner per row. A constant number of statements per batch: one on
    PostgreSQL (see ``claim_postgresql``), a transaction of two elsewhere.

    Operations marked to be claimed alone (see the module docstring) are: when the first
    candidate is one, only it is claimed; otherwise the batch stops before the first one.
    """
    for name, names in (("queues", queues), ("operationtypes", operationtypes)):
        if isinstance(names, str):  # a str is a sequence of str: its letters
            raise InvalidOperationError(
                f"{name} must be a list of names, not the string {names!r}."
            )
    check_now(now)  # the PostgreSQL claim writes it into its SQL itself
    alias = write_alias(using)
    limit = limit or get_settings().BATCH_SIZE
    # The row's queue decides where it runs (it was routed when stored), not the handler's.
    types = registry.operationtypes()
    if operationtypes is not None:
        types = [t for t in types if t in set(operationtypes)]
    if not types:
        return []
    if connections[alias].vendor == "postgresql":
        return claim_due_postgresql(
            alias=alias,
            leases={t: registry[t].resolved_lease() for t in types},
            ids=ids,
            queues=queues,
            limit=limit,
            worker=worker,
            now=now,
        )
    return retrying_deadlocks(
        alias,
        lambda: _claim_due_portable(
            alias, types=types, ids=ids, queues=queues, limit=limit, worker=worker, now=now
        ),
    )


def _claim_due_portable(
    alias: str,
    *,
    types: Sequence[str],
    ids: Sequence[Any] | None,
    queues: Sequence[str] | None,
    limit: int,
    worker: str | None,
    now: datetime | None,
) -> list[BatchOperation]:
    """:func:`claim_due` where no one statement can claim: a locking read, then the
    compare-and-set UPDATE, in a transaction of their own."""
    manager = BatchOperation.objects.db_manager(alias)
    read_committed_next(alias)
    with transaction.atomic(using=alias):
        candidates = manager.due(now).filter(operationtype__in=types)
        if ids is not None:
            candidates = candidates.filter(pk__in=list(ids))
        if queues is not None:
            candidates = candidates.filter(queue__in=list(queues))
        candidates = candidates.order_by("-priority", "run_after", "pk")
        if supports_skip_locked(alias):
            candidates = candidates.select_for_update(skip_locked=True)
        operations = _alone_or_before_isolated(list(candidates[:limit]))
        if not operations:
            return []
        token = new_claim_token(
            worker, batch=len(operations) > 1, alone=operations[0].claimed_by == ISOLATED
        )
        by_lease: dict[timedelta, list[BatchOperation]] = defaultdict(list)
        for operation in operations:
            by_lease[registry[operation.operationtype].resolved_lease()].append(operation)
        claimed_count = 0
        for lease, group in by_lease.items():
            claimed_count += manager.filter(
                pk__in=[op.pk for op in group], status=BatchOperation.STATUS_UNPROCESSED
            ).update(**_claim_update(lease, token, now))
            for operation in group:
                _mark_claimed(operation, token, lease, now, alias)
        if claimed_count != len(operations):
            # Without row locks a concurrent claimer may have won some rows: keep only ours.
            ours = set(
                manager.filter(pk__in=[op.pk for op in operations], claimed_by=token).values_list(
                    "pk", flat=True
                )
            )
            operations = [op for op in operations if op.pk in ours]
    return operations


def must_be_claimed_alone(operation: BatchOperation) -> bool:
    """Whether this unprocessed operation is marked to be claimed alone (see the module
    docstring), as far as the instance knows: a deferred ``claimed_by`` is not loaded (no
    query) and counts as not marked. A message that names such an operation among others
    would claim only those before it: give it a message of its own."""
    return operation.__dict__.get("claimed_by") == ISOLATED


def _alone_or_before_isolated(candidates: list[BatchOperation]) -> list[BatchOperation]:
    """Keep an isolated operation alone in its claim (the others stay unclaimed)."""
    for index, operation in enumerate(candidates):
        if operation.claimed_by == ISOLATED:
            return candidates[:1] if index == 0 else candidates[:index]
    return candidates


def claims_of(worker: str, *, using: str | None = None) -> list[BatchOperation]:
    """The operations running under claims made with this ``worker`` name, in claim order.

    For a claimer whose session was lost with the answer to a claim that had committed: its
    operations are its own to run (otherwise they would wait for their leases to expire, and
    be counted as a lost worker's attempt without ever running). Only for a name no other
    claimer uses, such as one made for a single claim.
    """
    alias = write_alias(using)
    found = list(
        BatchOperation.objects.db_manager(alias)
        .running()
        .filter(claimed_by__startswith=f"{worker}:")
        .order_by("-priority", "run_after", "pk")
    )
    for operation in found:
        mark_claimed_on(operation, alias)
    return found


def release(operations: Sequence[BatchOperation], *, using: str | None = None) -> int:
    """Give back claimed operations whose turn has not come (e.g. on worker shutdown).

    Fenced by each operation's claim; the attempt the claim counted is taken back, and so is
    the claim itself: one marked to be claimed alone stays so. Returns how many went back.
    """
    if not operations:
        return 0
    released = 0
    by_claim: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for operation in operations:
        by_claim[(claim_alias(operation, using), operation.claimed_by)].append(operation.pk)
    for (alias, token), pks in by_claim.items():
        released += (
            BatchOperation.objects.db_manager(alias)
            .filter(pk__in=pks, status=BatchOperation.STATUS_RUNNING, claimed_by=token)
            .update(
                status=BatchOperation.STATUS_UNPROCESSED,
                attempts=F("attempts") - 1,
                claimed_by=unclaimed_mark(token),
                lease_expires_at=None,
            )
        )
    log_event(logging.INFO, "released", count=released)
    return released


def renew_leases(
    operations: Sequence[BatchOperation], *, using: str | None = None
) -> list[BatchOperation]:
    """Extend the leases of claimed operations that have not started yet.

    Workers call this while working through a claimed batch, so that operations waiting their
    turn are not recovered by others. Returns the operations still held (fenced by claim).
    """
    if not operations:
        return []
    groups: dict[tuple[str, str, timedelta], list[BatchOperation]] = defaultdict(list)
    for operation in operations:
        lease = registry[operation.operationtype].resolved_lease()
        groups[(claim_alias(operation, using), operation.claimed_by, lease)].append(operation)
    held: set[Any] = set()
    for (alias, token, lease), group in groups.items():
        pks = [op.pk for op in group]
        rows = BatchOperation.objects.db_manager(alias).filter(
            pk__in=pks, status=BatchOperation.STATUS_RUNNING, claimed_by=token
        )
        renewed = rows.update(lease_expires_at=time_after(lease))
        if renewed != len(group):
            still = set(rows.values_list("pk", flat=True))
            group = [op for op in group if op.pk in still]
        expires = timezone.now() + lease
        for operation in group:
            operation.lease_expires_at = expires
        held.update(op.pk for op in group)
    # In the order given: the batch's claim order, which its runner keeps.
    return [operation for operation in operations if operation.pk in held]
