"""Small pieces shared by the engine modules."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.db import DatabaseError, OperationalError, connections, router
from django.db.models import DateTimeField, DurationField, Expression, Value
from django.utils import timezone

from ..clock import known_clock_offset, now_expression
from ..models import BatchOperation
from ..signals import log_event

_HOSTNAME = socket.gethostname()


def write_alias(using: str | None = None) -> str:
    """The database operations are written to: ``using`` if given, else the router's choice
    for :class:`~batchframework.models.BatchOperation` (``default`` without a router)."""
    return using or router.db_for_write(BatchOperation)


#: Ends the claim token of a claim that took several operations at once.
BATCH_SUFFIX = "/batch"
#: ``claimed_by`` of an unprocessed operation that must be claimed alone: it was held in a batch
#: whose worker died, so it may be the one that killed it.
ISOLATED = "!isolated"
#: Ends the claim token of a claim that took an operation marked :data:`ISOLATED`: the claim
#: overwrites the mark, and an attempt put back without finishing (given back, or failed with
#: attempts left) must get it back, or the operation would be batched again.
ALONE_SUFFIX = "/alone"


def worker_identity() -> str:
    """Who claims, unless a claimer names itself: this host and process."""
    return f"{_HOSTNAME}:{os.getpid()}"


def claimer_name(who: str | None = None) -> str:
    """A name for one claim of ``who`` (default: this host and process): its operations can be
    found by it (``claims_of``) when the claim's answer was lost with the database session.
    ``who`` is cut so that claim tokens keep all of the name."""
    return f"{(who or worker_identity())[:200]}:{uuid.uuid4().hex[:8]}"


def new_claim_token(worker: str | None = None, *, batch: bool = False, alone: bool = False) -> str:
    """A claim identity: who claims (host:pid unless given), a fresh token per claim, and
    whether the claim took a batch (recovery treats those differently) or an operation marked
    to be claimed alone (see :func:`unclaimed_mark`)."""
    who = worker or worker_identity()
    suffix = BATCH_SUFFIX if batch else ALONE_SUFFIX if alone else ""
    return f"{who[: 255 - 13 - len(suffix)]}:{uuid.uuid4().hex[:12]}{suffix}"


def unclaimed_mark(token: str) -> str:
    """``claimed_by`` for an operation that goes back to unprocessed from the claim ``token``:
    still marked to be claimed alone if it was claimed so."""
    return ISOLATED if token.endswith(ALONE_SUFFIX) else ""


def time_after(delta: timedelta, now: object = None) -> Expression:
    """``now + delta`` on the database clock (or the given ``now``)."""
    return _combine(now_expression(now), delta)  # type: ignore[arg-type]


def _combine(base: Expression, delta: timedelta) -> Expression:
    from django.db.models import ExpressionWrapper

    return ExpressionWrapper(
        base + Value(delta, output_field=DurationField()), output_field=DateTimeField()
    )


def read_committed_next(alias: str) -> None:
    """On MySQL/MariaDB, run the next transaction on ``alias`` at READ COMMITTED, unless the
    connection is there already (Django's default) or may be in a transaction (too late).

    A claim's UPDATE moves its rows' entries in the claim's index (led by ``status`` there,
    see migration 0004), and at REPEATABLE READ concurrent claims' ``SKIP LOCKED`` scans hold
    gap locks on the very gaps those entries move into: the claims deadlock, dozens of times a
    second with four claimers. READ COMMITTED takes no such gap locks. One statement, only
    when the connection's ``isolation_level`` option asks for another level or leaves the
    server's (whose default is REPEATABLE READ)."""
    from django.db import connections

    connection = connections[alias]
    if connection.vendor != "mysql" or connection.in_atomic_block:
        return
    connection.ensure_connection()
    if getattr(connection, "isolation_level", None) == "read committed":
        return
    if not connection.get_autocommit():
        return  # AUTOCOMMIT = False: a transaction may be open already, which MySQL refuses
    with connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")


def supports_skip_locked(alias: str) -> bool:
    from django.db import connections

    return bool(connections[alias].features.has_select_for_update_skip_locked)


#: How often a transaction runs again when it was a deadlock's victim.
DEADLOCK_ATTEMPTS = 3

T = TypeVar("T")


def retrying_deadlocks(
    alias: str, run: Callable[[], T], *, event: str = "claim_retried", **context: Any
) -> T:
    """Run ``run`` (a transaction of its own) again when it was a deadlock's victim, at most
    :data:`DEADLOCK_ATTEMPTS` times. Not in a caller's transaction, which the deadlock rolled
    back as a whole. (On MySQL/MariaDB a writer that locked an index entry first, then waits
    for the row, deadlocks with a claim's UPDATE of that entry: ``enqueue(replace=True)``.)"""
    # Not with autocommit turned off either: the deadlock rolled back the caller's transaction,
    # and a retry would commit the rest without the caller's earlier writes.
    connection = connections[alias]
    outermost = not connection.in_atomic_block and connection.get_autocommit()
    attempt = 1
    while True:
        try:
            return run()
        except OperationalError as exc:
            if not (outermost and is_deadlock(exc)) or attempt >= DEADLOCK_ATTEMPTS:
                raise
        log_event(logging.INFO, event, reason="deadlock", **context)
        attempt += 1


def is_deadlock(exc: OperationalError) -> bool:
    """Whether the database ended the transaction as a deadlock's victim (MySQL/MariaDB error
    1213, PostgreSQL SQLSTATE 40P01)."""
    return (exc.args[:1] == (1213,)) or getattr(exc.__cause__, "sqlstate", None) == "40P01"


#: Set on the instances a claim returns: the database the claim was made on.
CLAIMED_ON = "_batchframework_claimed_on"


def mark_claimed_on(operation: BatchOperation, alias: str) -> None:
    operation.__dict__[CLAIMED_ON] = alias


def claim_alias(operation: BatchOperation, using: str | None) -> str:
    """Where writes fenced by ``operation``'s claim go: ``using``; else, for an instance a claim
    returned, the database the claim was made on (a router may name another one for this
    model: ``enqueue(using=...)`` with ``POLL_DATABASES``); else where the router writes this
    instance (the primary, for one read from a replica)."""
    if using:
        return using
    claimed_on = operation.__dict__.get(CLAIMED_ON)
    if claimed_on:
        return str(claimed_on)
    return router.db_for_write(BatchOperation, instance=operation)


def replace_lost_sessions(aliases: set[str]) -> None:
    """Close the connections to ``aliases`` that Django saw fail and that no longer answer
    (Django opens a new one when next needed). Outside a worker's request cycle nobody else
    does, and every statement would fail on them. Not one in a caller's transaction
    (``atomic`` or autocommit turned off), which is the caller's; and never one that still
    answers, however old (Django's own ``close_if_unusable_or_obsolete`` would close that one
    too with ``CONN_MAX_AGE=0``, and with it a cursor the caller is reading)."""
    for alias in aliases:
        connection = connections[alias]
        if (
            connection.connection is None
            or not connection.errors_occurred
            or connection.in_atomic_block
            or not connection.get_autocommit()
        ):
            continue
        if connection.is_usable():
            connection.errors_occurred = False  # as Django marks one it checked
        else:
            # Closing may fail on a driver connection closed already (mysqlclient raises);
            # Django forgets it all the same.
            with contextlib.suppress(DatabaseError):
                connection.close()


def approximately_now(alias: str) -> datetime:
    """The database's time as this process estimates it, never with a query: what the
    in-memory instance is given for a time the database wrote with its own clock."""
    return timezone.now() + known_clock_offset(alias)
