"""``claim_due`` on PostgreSQL: one statement instead of a transaction of two.

The portable claim (:func:`.claim.claim_due`) locks the candidates with ``SELECT … FOR UPDATE
SKIP LOCKED``, picks the batch in Python, and updates it: BEGIN, two statements and COMMIT,
plus building two ORM queries — on a message of one operation that is most of its lateness.
Here the same steps are one ``WITH … UPDATE … RETURNING`` statement, run on its own (autocommit)
or inside the caller's transaction:

``candidates``
    the due rows, in claim order, locked with ``FOR UPDATE SKIP LOCKED``;
``chosen``
    the same rule as the portable path for operations to be claimed alone: an isolated first
    candidate is taken alone, otherwise the batch stops before the first isolated one;
the ``UPDATE``
    counts the attempt, sets the claim token (a batch token when it took several, an "alone"
    token when it took an isolated one), the start time and each operationtype's lease, on
    the database clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connections
from django.utils import timezone

from ..models import BatchOperation
from ._common import ISOLATED, mark_claimed_on, new_claim_token


def claim_due_postgresql(
    *,
    alias: str,
    leases: dict[str, timedelta],
    ids: Sequence[Any] | None,
    queues: Sequence[str] | None,
    limit: int,
    worker: str | None,
    now: datetime | None,
) -> list[BatchOperation]:
    """Claim up to ``limit`` due operations of the types in ``leases`` (see ``claim_due``)."""
    meta = BatchOperation._meta
    quote = connections[alias].ops.quote_name
    table = quote(meta.db_table)
    # Every concrete field, in field order: what ``_loaded`` expects.
    returning = ", ".join(f"op.{quote(str(field.column))}" for field in meta.concrete_fields)
    clock = "%(now)s" if now is not None else "STATEMENT_TIMESTAMP()"
    conditions = ["status = %(unprocessed)s", f"run_after <= {clock}"]
    conditions.append("operationtype = ANY(%(types)s)")
    if ids is not None:
        conditions.append("id = ANY(%(ids)s)")
    if queues is not None:
        conditions.append("queue = ANY(%(queues)s)")
    sql = f"""
        WITH candidates AS (
            SELECT id, priority, run_after, claimed_by, operationtype FROM {table}
            WHERE {" AND ".join(conditions)}
            ORDER BY priority DESC, run_after, id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ), ranked AS (
            SELECT id, operationtype, claimed_by = %(isolated)s AS isolated,
                   row_number() OVER (ORDER BY priority DESC, run_after, id) AS n
            FROM candidates
        ), chosen AS (
            SELECT id, operationtype, isolated FROM ranked
            WHERE n = 1 OR n < COALESCE((SELECT min(n) FROM ranked WHERE isolated), n + 1)
        )
        UPDATE {table} AS op SET
            status = %(running)s,
            result = %(not_available)s,
            attempts = op.attempts + 1,
            claimed_by = CASE WHEN (SELECT count(*) FROM chosen) > 1 THEN %(batch_token)s
                              WHEN chosen.isolated THEN %(alone_token)s ELSE %(token)s END,
            started_running_datetime = {clock},
            lease_expires_at = {clock} + leases.lease,
            debounce_key = NULL
        FROM chosen
        JOIN unnest(%(types)s::text[], %(leases)s::interval[]) AS leases(operationtype, lease)
            ON leases.operationtype = chosen.operationtype
        WHERE op.id = chosen.id
        RETURNING {returning}
    """
    params = {
        "unprocessed": BatchOperation.STATUS_UNPROCESSED,
        "running": BatchOperation.STATUS_RUNNING,
        "not_available": BatchOperation.RESULT_NOT_AVAILABLE,
        "isolated": ISOLATED,
        "types": list(leases),
        "leases": list(leases.values()),
        "ids": None if ids is None else [meta.pk.get_prep_value(pk) for pk in ids],
        "queues": None if queues is None else list(queues),
        "limit": limit,
        "token": new_claim_token(worker),
        "batch_token": new_claim_token(worker, batch=True),
        "alone_token": new_claim_token(worker, alone=True),
        "now": now,
    }
    connection = connections[alias]
    # Taken before the claim, so that the deadline kept below is never later than the row's.
    started = now or timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        operations = _loaded(cursor, alias, connection)
    for operation in operations:
        # The row's lease is on the database's clock; the worker judges what is left of it on
        # its own (batch.BatchRunner, keeper), as the portable claim leaves it. A worker clock
        # behind the database's would otherwise think a lease fresher than it is, skip the
        # fenced renewal, and run an operation whose lease was recovered meanwhile.
        operation.lease_expires_at = started + leases[operation.operationtype]
    # RETURNING has no order: run them in claim order.
    operations.sort(key=lambda op: (-op.priority, op.run_after, op.pk))
    return operations


def _loaded(cursor: Any, alias: str, connection: Any) -> list[BatchOperation]:
    """The returned rows (one column per concrete field, in field order) as loaded instances,
    as ``Manager.raw()`` would make them, without resolving the columns against the model anew
    for every claim (half a millisecond)."""
    fields = BatchOperation._meta.concrete_fields
    attnames = [field.attname for field in fields]
    converters = _converters(connection)
    loaded = [
        BatchOperation.from_db(
            alias,
            attnames,
            [
                _converted(value, column, chain, connection)
                for value, (column, chain) in zip(row, converters, strict=True)
            ],
        )
        for row in cursor.fetchall()
    ]
    for operation in loaded:
        mark_claimed_on(operation, alias)
    return loaded


def _converted(value: Any, column: Any, chain: list[Any], connection: Any) -> Any:
    for converter in chain:
        value = converter(value, column, connection)
    return value


#: Each concrete field's column and database converters, built on the first claim (they are
#: the same on every PostgreSQL connection, so one build serves the whole process).
_chains: list[tuple[Any, list[Any]]] = []


def _converters(connection: Any) -> list[tuple[Any, list[Any]]]:
    if not _chains:
        table = BatchOperation._meta.db_table
        columns = [field.get_col(table) for field in BatchOperation._meta.concrete_fields]
        # Replaced whole, so that threads building at once never see a half-built list.
        backend = connection.ops
        _chains[:] = [
            (column, backend.get_db_converters(column) + column.get_db_converters(connection))
            for column in columns
        ]
    return _chains
