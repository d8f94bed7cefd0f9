"""The one clock that decides when an operation is due: the database server's, in UTC.

Web and worker processes may disagree about the time; the database is the one place they all
share. Every "is it due?", lease and timestamp written by the engine is judged by
:class:`DatabaseNow` unless a caller passes an explicit ``now`` (time travel in tests). Due times
computed from a ``delay`` start from :func:`database_now`, this process's clock corrected by
its measured offset to the database clock, so a web server whose clock is slow can't make an
operation run early.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connections, router
from django.db.models import DateTimeField, Expression, Func, Value
from django.utils import timezone

from .conf import get_settings


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
        # The text format Django stores datetimes in, with six fraction digits as Django
        # writes them, so that text comparisons order them as times: '….314000' <= '….314' is
        # false, which made an operation due in this very millisecond look not yet due. The
        # percent signs are doubled twice: once for this template, once for the driver.
        return self.as_sql(
            compiler,
            connection,
            template="(STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'NOW') || '000')",
            **extra,
        )


#: The times an operation may be due at, or record: what every supported database stores
#: (MySQL's DATETIME begins with the year 1000) and reads back into a Python ``datetime`` shown
#: in any time zone (the last year before Python's limit is kept free for that).
EARLIEST_TIME = datetime(1000, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9999, 1, 1, tzinfo=UTC)


def storable(value: datetime) -> bool:
    """Whether the aware ``value`` lies from :data:`EARLIEST_TIME` to :data:`LATEST_TIME`."""
    try:
        return EARLIEST_TIME <= value.astimezone(UTC) <= LATEST_TIME
    except OverflowError:  # in UTC, before the year 1 or after 9999
        return False


#: How :func:`storable`'s range reads in messages.
STORABLE_RANGE = "from 1000-01-01 to 9999-01-01 (UTC)"


def check_now(now: object) -> None:
    """Refuse a ``now`` (time travel) that due times can't be judged against, before any query.

    A naive datetime would be read in the database session's zone or warned about and guessed;
    a string or a date fails deep in Django with a message that names neither the argument nor
    the fix; a time outside :data:`STORABLE_RANGE` fails in the database, breaking the caller's
    transaction. ``TypeError`` for what is no datetime, ``ValueError`` for the rest.
    """
    if now is None:
        return
    if not isinstance(now, datetime):
        raise TypeError(
            f"now must be a timezone-aware datetime (or None for the database clock), not {now!r}."
        )
    if timezone.is_naive(now):
        raise ValueError(
            "now must be a timezone-aware datetime (e.g. django.utils.timezone.now() + delta); "
            f"a naive datetime is ambiguous: {now!r}."
        )
    if not storable(now):
        raise ValueError(f"now must be {STORABLE_RANGE}, not {now}.")


def now_expression(now: datetime | None = None) -> Expression:
    """``now`` as a query value, or the database clock when ``now`` is ``None``.

    Every ORM query that takes a caller's ``now`` builds it here, so :func:`check_now` guards
    them; SQL written by hand (the claim on PostgreSQL) must call it itself.
    """
    if now is None:
        return DatabaseNow()
    check_now(now)
    return Value(now, output_field=DateTimeField())


#: How long a measured offset between this process's clock and the database's is trusted.
OFFSET_TTL_SECONDS = 60.0
#: Offsets smaller than this are measurement noise (round trip, SQLite's millisecond
#: resolution) and count as zero: processes on the database's own machine use their clock as is.
NOISE = timedelta(milliseconds=10)

#: Offsets larger than this are logged: a clock that far off needs fixing (or is frozen by a test).
LOUD_SKEW = timedelta(seconds=1)

_offsets: dict[str, tuple[float, timedelta]] = {}
_offsets_lock = threading.Lock()


def _read_database_time(using: str) -> datetime:
    connection = connections[using]
    sql = {
        "postgresql": "SELECT STATEMENT_TIMESTAMP()",
        "mysql": "SELECT UTC_TIMESTAMP(6)",
        "sqlite": "SELECT STRFTIME('%Y-%m-%d %H:%M:%f', 'now')",
    }.get(connection.vendor, "SELECT CURRENT_TIMESTAMP")
    with connection.cursor() as cursor:
        cursor.execute(sql)
        value = cursor.fetchone()[0]
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return value


def clock_offset(using: str | None = None) -> timedelta:
    """How far the database clock is ahead of this process's clock (cached for a minute).

    Measured against the midpoint of the query's round trip; offsets within ``NOISE`` (10 ms) are
    zero.
    """
    if not get_settings().CORRECT_CLOCK_SKEW:
        return timedelta(0)
    alias = using or router.db_for_write(_batchoperation_model())
    cached = _offsets.get(alias)
    if cached is not None and time.monotonic() - cached[0] < OFFSET_TTL_SECONDS:
        return cached[1]
    before = timezone.now()
    database_time = _read_database_time(alias)
    after = timezone.now()
    offset = database_time - (before + (after - before) / 2)
    if abs(offset) < NOISE:
        offset = timedelta(0)
    elif abs(offset) > LOUD_SKEW:
        from .signals import log_event

        log_event(
            logging.WARNING,
            "clock_skew",
            database=alias,
            seconds_database_is_ahead=round(offset.total_seconds(), 3),
            hint="fix NTP; or set CORRECT_CLOCK_SKEW=False if a test froze the clock",
        )
    with _offsets_lock:
        _offsets[alias] = (time.monotonic(), offset)
    return offset


def database_now(using: str | None = None) -> datetime:
    """The database's current time, estimated from this process's clock and the offset."""
    return timezone.now() + clock_offset(using)


def known_clock_offset(using: str | None = None) -> timedelta:
    """The offset :func:`clock_offset` last measured for ``using``, however old, or zero:
    never a query (for threads that must not wait on the database, or have no connection)."""
    if not get_settings().CORRECT_CLOCK_SKEW:
        return timedelta(0)
    cached = _offsets.get(using or router.db_for_write(_batchoperation_model()))
    return cached[1] if cached is not None else timedelta(0)


def forget_clock_offsets() -> None:
    """Drop cached offsets (tests that move the process clock call this)."""
    with _offsets_lock:
        _offsets.clear()


def _batchoperation_model() -> Any:
    from .models import BatchOperation

    return BatchOperation
