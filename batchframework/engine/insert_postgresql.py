"""Storing one operation on PostgreSQL with a statement built once, not once per ``enqueue``.

``Model.save()`` compiles its INSERT anew on every call: about 0.15 ms of Python per operation
on the benchmark machine, a sixth of a whole ``enqueue`` in its own transaction. ``enqueue``
writes the same columns every time, so on PostgreSQL the statement is built once per process
and a call only adapts its values. What ``save()`` does besides is kept: the model's own
check on the context id, ``pre_save`` and ``post_save``, and the instance's saved state. The
statement goes through Django's cursor, so query logging, ``execute_wrapper`` and
``assertNumQueries`` see it.

Other databases keep ``Model.save()`` (:func:`insert`'s fallback), so the suite, which runs on
PostgreSQL, SQLite and MariaDB, tests both paths.
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.models import Field, JSONField
from django.db.models.signals import post_save, pre_save

from ..models import BatchOperation


def insert(operation: BatchOperation, *, alias: str, notify: str | None = None) -> None:
    """Insert the unsaved ``operation`` on ``alias``; it leaves with its primary key set.

    With ``notify`` (PostgreSQL only), the same statement sends ``NOTIFY <notify>, '<id>'``,
    which PostgreSQL delivers when the transaction commits, and never if it rolls back.
    """
    connection = connections[alias]
    if connection.vendor != "postgresql":
        if notify is not None:
            raise ValueError("NOTIFY needs PostgreSQL")
        operation.save(force_insert=True, using=alias)
        return
    operation.take_context_object_id_instance()
    pre_save.send(
        sender=BatchOperation, instance=operation, raw=False, using=alias, update_fields=None
    )
    sql, columns = _statement(connection, notifying=notify is not None)
    params: list[Any] = []
    for field, may_skip in columns:
        value = getattr(operation, field.attname)
        if value is not None and not (may_skip and type(value) in _PLAIN):
            value = field.get_db_prep_save(value, connection)
        params.append(value)
    if notify is not None:
        params.append(notify)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        operation.pk = cursor.fetchone()[0]
    operation._state.adding = False
    operation._state.db = alias
    post_save.send(
        sender=BatchOperation,
        instance=operation,
        created=True,
        update_fields=None,
        raw=False,
        using=alias,
    )


#: Values that a non-JSON column's ``get_db_prep_save`` would return unchanged.
_PLAIN = (str, int)


#: The statements built so far, by whether they announce (quoting is the same on every
#: PostgreSQL connection, so one build serves the whole process).
_statements: dict[bool, tuple[str, list[tuple[Field[Any, Any], bool]]]] = {}


def _statement(
    connection: Any, *, notifying: bool
) -> tuple[str, list[tuple[Field[Any, Any], bool]]]:
    """The INSERT of every column but the primary key (announcing the new id on a channel, the
    last parameter, when ``notifying``), and for each column whether a plain ``str``/``int``
    value may skip adaptation (not for JSON: a string there is a JSON value)."""
    built = _statements.get(notifying)
    if built is not None:
        return built
    meta = BatchOperation._meta
    fields = [field for field in meta.concrete_fields if not field.primary_key]
    quote = connection.ops.quote_name
    pk = quote(meta.pk.column)
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {pk}"
    )
    if notifying:
        # One statement: announcing costs no extra round trip.
        sql = f"WITH new AS ({sql}) SELECT {pk}, pg_notify(%s, {pk}::text) FROM new"
    built = _statements[notifying] = (
        sql,
        [(field, not isinstance(field, JSONField)) for field in fields],
    )
    return built
