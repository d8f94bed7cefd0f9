"""The one clock that decides when an operation is due: the database server's, in UTC.

Web and worker processes may disagree about the time; the database is the one place they all
share. Every "is it due?", lease and timestamp written by the engine is judged by
:class:`DatabaseNow` unless a caller passes an explicit ``now`` (time travel in tests).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import DateTimeField, Expression, Func, Value


class DatabaseNow(Func):
    """The database's current UTC time, to microsecond precision where it has it."""

    template = "CURRENT_TIMESTAMP"
    output_field = DateTimeField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # STATEMENT_TIMESTAMP, unlike CURRENT_TIMESTAMP, moves within a transaction.
        return self.as_sql(compiler, connection, template="STATEMENT_TIMESTAMP()", **extra)

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Django stores UTC in MySQL/MariaDB DATETIME columns; NOW() is in the session's zone.
        return self.as_sql(compiler, connection, template="UTC_TIMESTAMP(6)", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # The text format Django stores datetimes in, so comparisons sort correctly. The
        # percent signs are doubled twice: once for this template, once for the driver.
        return self.as_sql(
            compiler,
            connection,
            template="STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'NOW')",
            **extra,
        )


def now_expression(now: datetime | None = None) -> Expression:
    """``now`` as a query value, or the database clock when ``now`` is ``None``."""
    if now is None:
        return DatabaseNow()
    return Value(now, output_field=DateTimeField())
