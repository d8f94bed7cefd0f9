"""Storing many operations of one ``enqueue_many`` call.

The operations of one call share most of their columns (operationtype, queue, who started
them, status …); only the context object, input, due time and priority vary. Django's
``bulk_create`` would still adapt every field of every instance. On PostgreSQL the shared
columns are therefore sent once per statement and the varying ones as one array each
(``INSERT … SELECT … FROM unnest(…)``), which is several times faster; elsewhere
``bulk_create`` stores them. Either way every chunk is one statement, and the instances
returned carry their primary keys; except on MySQL, whose bulk INSERT can't return the keys:
there each operation is one INSERT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import Field
from django.db.models.base import ModelState
from django.db.models.signals import post_init, pre_init

from ..models import BatchOperation

#: The columns that differ between the operations of one call, in :class:`Row` order.
VARYING = ("context_content_type_id", "context_object_id", "input_data", "run_after", "priority")


@dataclass(frozen=True, slots=True)
class Row:
    """One validated item: what differs from the call's other operations."""

    context_content_type: Any  # a ContentType or None
    context_object_id: str | None
    input_data: Any
    input_json: str | None  # input_data as validated JSON text (None for no input)
    run_after: Any
    priority: int


def store(
    template: BatchOperation, rows: Sequence[Row], *, alias: str, batch_size: int
) -> list[BatchOperation]:
    """Insert one operation per row (the template's values elsewhere) and return them saved."""
    operations = _instances(template, rows)
    connection = connections[alias]
    if connection.vendor != "postgresql":
        if not connection.features.can_return_rows_from_bulk_insert:
            # MySQL: a bulk INSERT can't tell the new primary keys, and operations without
            # theirs could be neither returned nor dispatched. One INSERT each there.
            for operation in operations:
                operation.save(force_insert=True, using=alias)
            return operations
        return BatchOperation.objects.using(alias).bulk_create(operations, batch_size=batch_size)
    insert = _UnnestInsert(template, connection)
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        for operation, pk in zip(operations[chunk], insert.execute(rows[chunk]), strict=True):
            operation.pk = pk
            operation._state.adding = False
            operation._state.db = alias
    return operations


def _instances(template: BatchOperation, rows: Sequence[Row]) -> list[BatchOperation]:
    """Unsaved instances with the template's values and each row's own."""
    fields = BatchOperation._meta.concrete_fields
    values = [getattr(template, field.attname) for field in fields]
    position = {field.attname: index for index, field in enumerate(fields)}
    ct, oid, data, due, prio = (position[name] for name in VARYING)
    started_by = BatchOperation._meta.get_field("started_by")
    content_type = BatchOperation._meta.get_field("context_content_type")
    user = template.started_by if template.started_by_id is not None else None
    new = _constructor(fields)
    operations = []
    for row in rows:
        values[ct] = row.context_content_type.pk if row.context_content_type else None
        values[oid] = row.context_object_id
        values[data] = row.input_data
        values[due] = row.run_after
        values[prio] = row.priority
        operation = new(values)
        # Keep the related objects the caller passed, as keyword construction would.
        if user is not None:
            started_by.set_cached_value(operation, user)
        if row.context_content_type is not None:
            content_type.set_cached_value(operation, row.context_content_type)
        operations.append(operation)
    return operations


def _constructor(fields: Sequence[Field[Any, Any]]) -> Callable[[list[Any]], BatchOperation]:
    """A function making an unsaved instance from one value per concrete field.

    ``Model.__init__`` sets each field through ``setattr`` and sends ``pre_init`` and
    ``post_init``: two thirds of building an instance, a tenth of storing it. With no receiver
    of those signals for the model, the values go straight into the instance's ``__dict__``,
    which is all that ``__init__`` leaves there for positional values of concrete fields (the
    only descriptors it would go through, the foreign keys' ``*_id`` ones, just drop a cached
    related object, which a new instance doesn't have).
    """
    if pre_init.has_listeners(BatchOperation) or post_init.has_listeners(BatchOperation):
        return lambda values: BatchOperation(*values)
    attnames = [field.attname for field in fields]
    blank = BatchOperation.__new__

    def new(values: list[Any]) -> BatchOperation:
        operation = blank(BatchOperation)
        operation._state = ModelState()
        operation.__dict__.update(zip(attnames, values, strict=True))
        return operation

    return new


class _UnnestInsert:
    """``INSERT … SELECT <shared values>, <unnested arrays> RETURNING id`` on PostgreSQL."""

    def __init__(self, template: BatchOperation, connection: Any) -> None:
        self.connection = connection
        meta = BatchOperation._meta
        fields: list[Field[Any, Any]] = [f for f in meta.concrete_fields if not f.primary_key]
        quote = connection.ops.quote_name
        self.shared_params: list[Any] = []
        select: list[str] = []
        arrays: list[str] = []
        for field in fields:
            if field.attname not in VARYING:
                value = field.get_db_prep_save(field.pre_save(template, add=True), connection)
                # Cast: a bare parameter in a SELECT list would be typed as text.
                select.append(f"%s::{field.cast_db_type(connection)}")
                self.shared_params.append(value)
            elif field.attname == "input_data":
                # JSON goes as text (validated and serialized already), cast row by row.
                select.append("r.input_data::jsonb")
            else:
                select.append(f"r.{field.attname}")
        by_attname = {field.attname: field for field in fields}
        for name in VARYING:
            element = "text" if name == "input_data" else by_attname[name].cast_db_type(connection)
            arrays.append(f"%s::{element}[]")
        self.sql = (
            f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
            f"SELECT {', '.join(select)} FROM unnest({', '.join(arrays)}) "
            f"AS r({', '.join(VARYING)}) RETURNING {quote(meta.pk.column)}"
        )

    def execute(self, rows: Sequence[Row]) -> list[int]:
        arrays: list[list[Any]] = [[], [], [], [], []]
        ct, oid, data, due, prio = arrays
        for row in rows:
            ct.append(row.context_content_type.pk if row.context_content_type else None)
            oid.append(row.context_object_id)
            data.append(row.input_json)
            due.append(row.run_after)
            prio.append(row.priority)
        with self.connection.cursor() as cursor:
            cursor.execute(self.sql, [*self.shared_params, *arrays])
            return [pk for (pk,) in cursor.fetchall()]
