"""Drop three indexes that no query uses.

Every INSERT writes an entry into every index of the table, and so do the claim and finish
UPDATEs: they change ``status``, which the partial indexes' predicates read, so PostgreSQL can
never update those rows in place (HOT). With 11 indexes, three of them unused, bulk INSERTs and
the claim and finish UPDATEs spent about a fifth of their server time on the unused three.

- ``context_content_type``'s own index: ``batchop_context_idx`` (content type, object id)
  serves every lookup by content type, including the cascade when a content type is deleted
  (Django looks the operations up by ``context_content_type_id``). The field now has
  ``db_index=False``. MySQL/MariaDB never had this index from Django (InnoDB indexes foreign
  keys itself), so nothing is dropped there.
- PostgreSQL only: the ``varchar_pattern_ops`` indexes (suffix ``_like``) that Django adds
  beside the index of ``operationtype`` and the unique index of ``debounce_key``, for
  ``LIKE 'prefix%'`` lookups. Nothing matches these columns by prefix (the admin searches with
  ``icontains``, which no B-tree index serves). The fields keep ``db_index``/``unique``, so
  the plain indexes stay; a later migration that alters either field on PostgreSQL must drop
  the ``_like`` index Django would add back.

Only DROP INDEX statements run (each takes the table's lock for a moment; nothing is rebuilt
or rescanned): Django's ``AlterField`` would also drop and re-create the foreign key
constraint, which re-validates every row under lock, so the state change is separate.
"""

from __future__ import annotations

from typing import Any

import django.db.models.deletion
from django.db import migrations, models

TABLE = "batchframework_batchoperation"


def _indexes_on(schema_editor: Any, column: str, *, like: bool) -> list[str]:
    """Names of the plain (non-unique, non-constraint) indexes on exactly ``column``; with
    ``like``, only PostgreSQL's ``_like`` ones, else only the others."""
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, TABLE)
    return sorted(
        name
        for name, info in constraints.items()
        if info["columns"] == [column]
        and info["index"]
        and not info["unique"]
        and not info["primary_key"]
        and not info["foreign_key"]
        and name.endswith("_like") == like
    )


def drop_unused_indexes(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    names: list[str] = []
    if vendor == "postgresql":
        names += _indexes_on(schema_editor, "operationtype", like=True)
        names += _indexes_on(schema_editor, "debounce_key", like=True)
    if vendor != "mysql":
        names += _indexes_on(schema_editor, "context_content_type_id", like=False)
    for name in names:
        schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


def restore_indexes(apps: Any, schema_editor: Any) -> None:
    """Re-create the indexes as Django names and builds them (``migrate batchframework 0002``)."""
    model = apps.get_model("batchframework", "BatchOperation")
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        for field_name in ("operationtype", "debounce_key"):
            field = model._meta.get_field(field_name)
            schema_editor.execute(schema_editor._create_like_index_sql(model, field))
    if vendor != "mysql":
        field = model._meta.get_field("context_content_type")
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[field]))


class Migration(migrations.Migration):
    dependencies = [
        ("batchframework", "0002_ready_index_orders_by_id"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="batchoperation",
                    name="context_content_type",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="contenttypes.contenttype",
                        verbose_name="context object type",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunPython(drop_unused_indexes, restore_indexes, elidable=False),
            ],
        ),
    ]
