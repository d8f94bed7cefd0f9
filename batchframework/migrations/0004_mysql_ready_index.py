"""MySQL/MariaDB: lead the claim's index with ``status``.

``batchop_ready_idx`` is a partial index: only *unprocessed* rows, ordered as the claim takes
them. MySQL and MariaDB have no partial indexes, so Django created it over every row,
finished history included, and left out the ``status = 'unprocessed'`` condition. A claim
then read the history to find the few due rows: O(history) per claim (about 0.2 s with
100,000 finished rows on the development machine, against 20 ms). Once the table is large
enough for the optimizer to walk the index in claim order, its ``SELECT … FOR UPDATE`` also
kept every row it walked past locked (at READ COMMITTED too), so deleting or updating a
finished row (``batchframework_prune``, the admin) waited for the claim's transaction.

Here the index becomes ``(status, priority DESC, run_after, id)``: the claim reads the
unprocessed rows only, in claim order (MariaDB 10.8+ and MySQL 8 honour ``DESC``; older
MariaDB sorts the unprocessed rows instead, still never touching history). The index keeps its
name, so Django's later operations on it find it. One ``ALTER TABLE`` drops the old form and
adds the new: InnoDB builds it online, and the claim is never without an index.

A claim's UPDATE moves its rows' entries in this index (their status changes). At REPEATABLE
READ the gap locks of concurrent claims' scans would make those moves deadlock, so on MySQL
the claim's transaction runs at READ COMMITTED, Django's default there, whatever the
connection's ``isolation_level`` (see ``engine.claim``).

The other two partial indexes need no MySQL form: their columns (``lease_expires_at``,
``finished_datetime``) are NULL outside the status their condition names, and their queries'
ranges leave NULLs out. On other databases this migration does nothing.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

TABLE = "batchframework_batchoperation"
INDEX = "batchop_ready_idx"


def _replace(schema_editor: Any, columns: str) -> None:
    if schema_editor.connection.vendor != "mysql":
        return
    quote = schema_editor.quote_name
    schema_editor.execute(
        f"ALTER TABLE {quote(TABLE)} DROP INDEX {quote(INDEX)}, ADD INDEX {quote(INDEX)} ({columns})"
    )


def lead_with_status(apps: Any, schema_editor: Any) -> None:
    _replace(schema_editor, "`status`, `priority` DESC, `run_after`, `id`")


def as_django_made_it(apps: Any, schema_editor: Any) -> None:
    """``migrate batchframework 0003``: the index as Django builds it there, condition left out."""
    _replace(schema_editor, "`priority` DESC, `run_after`, `id`")


class Migration(migrations.Migration):
    dependencies = [("batchframework", "0003_drop_unused_indexes")]

    operations = [
        # Not in a transaction: MySQL can't roll DDL back, and Django refuses DDL inside one.
        # The hint lets a router that places the table by model skip databases without it.
        migrations.RunPython(
            lead_with_status,
            as_django_made_it,
            atomic=False,
            elidable=False,
            hints={"model_name": "batchoperation"},
        )
    ]
