"""Scenario 12 (enqueue's entry points): bad input → a clear error, nothing written, nothing
lost; property-based with hypothesis.

- Any invalid argument to ``enqueue`` / ``enqueue_many`` / ``create_asynchronous`` raises a
  subclass of :class:`batchframework.exceptions.InvalidOperationError` and writes no row; an
  operation that was pending before is untouched; an enclosing transaction stays usable.
- Any valid JSON ``input_data`` round-trips exactly (stored, read back, and seen by the
  handler).

No subprocesses: runs on PostgreSQL, SQLite and MariaDB.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework.exceptions import (
    InputDataError,
    InvalidOperationError,
    UnknownOperationTypeError,
)
from batchframework.registry import registry
from batchframework.testing import run_due
from tests.testapp.models import Game, StringThing

pytestmark = [pytest.mark.reliability, pytest.mark.django_db, pytest.mark.timeout(120)]

HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
stats = {"examples": 0, "rows": 0, "runs": 0}


@pytest.fixture(autouse=True)
def _postgresql_only():
    """Overrides the suite's PostgreSQL-only gate: these tests need no subprocess and must
    hold on every supported database."""


# --- Strategies ------------------------------------------------------------------------------
# Text a database can store unchanged: no NUL, no lone surrogates.
safe_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(safe_text, children, max_size=4)
    ),
    max_leaves=12,
)

bad_leaf = st.sampled_from(
    [
        object(),
        {1, 2},
        b"bytes",
        datetime(2026, 1, 1),
        date(2026, 1, 1),
        Decimal("1.5"),
        math.nan,
        math.inf,
        -math.inf,
        1j,
        "nul\x00inside",
        "lone \ud800 surrogate",
        {1: "int key"},
        {(1, 2): "tuple key"},
        range(3),
    ]
)
# An invalid leaf, possibly buried inside valid containers.
bad_input = st.recursive(
    bad_leaf,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=2).map(lambda xs: [*xs, "ok"])
        | inner.map(lambda x: {"nested": x})
    ),
    max_leaves=3,
)

naive = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1))
bad_delay = st.one_of(
    st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
    st.integers(max_value=-1),
    st.timedeltas(max_value=timedelta(microseconds=-1)),
    st.sampled_from([math.nan, math.inf, -math.inf, True, False, "10", [1], timedelta.max, 1e300]),
    # Due in the year 9999 or later: a time no database stores and reads back everywhere.
    st.sampled_from([timedelta(days=2_912_000), timedelta(days=2_930_000)]),
)
# Aware, but outside the years 1000-9999 in UTC (datetime.max five hours behind UTC is in the
# year 10000 there).
out_of_range = st.sampled_from(
    [
        datetime.min.replace(tzinfo=timezone(timedelta(hours=1))),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
        datetime(999, 12, 31, tzinfo=UTC),
        datetime(9999, 6, 1, tzinfo=UTC),
    ]
)
bad_run_after = st.one_of(
    naive, out_of_range, st.sampled_from([date(2030, 1, 1), "2030-01-01T00:00:00Z", 0, 1.5])
)
bad_priority = st.one_of(
    st.integers(max_value=-32769),
    st.integers(min_value=32768),
    st.sampled_from([True, 1.0, "1", None]),
)
bad_queue = st.one_of(
    st.just(""), st.text(min_size=101, max_size=120), st.sampled_from([1, ["q"], b"q", "q\x00"])
)


def _unknown_type(text: str) -> bool:
    return text not in registry


invalid_call = st.one_of(
    st.text(max_size=30).filter(_unknown_type).map(lambda t: {"operationtype": t}),
    st.sampled_from([None, 1, b"test-echo"]).map(lambda t: {"operationtype": t}),
    bad_input.map(lambda v: {"input_data": v}),
    bad_delay.map(lambda v: {"delay": v}),
    bad_run_after.map(lambda v: {"run_after": v}),
    st.just({"delay": 1, "run_after": datetime(2030, 1, 1, tzinfo=ZoneInfo("UTC"))}),
    bad_priority.map(lambda v: {"priority": v}),
    bad_queue.map(lambda v: {"queue": v}),
    st.sampled_from(["game", 1, Game, object()]).map(lambda v: {"context_object": v}),
    st.just("unsaved-game").map(lambda _: {"context_object": Game()}),
    # A primary key longer than context_object_id's 255 characters.
    st.just("long-pk").map(lambda _: {"context_object": StringThing(slug="k" * 256)}),
    st.sampled_from(["admin", 1]).map(lambda v: {"started_by": v}),
    st.just("unsaved-user").map(lambda _: {"started_by": get_user_model()(username="nobody")}),
    st.just("not-a-user").map(lambda _: {"started_by": Game.objects.create()}),
)


def _call(kwargs: dict, replace: bool) -> None:
    kwargs = {"operationtype": "test-echo", **kwargs}
    enqueue(kwargs.pop("operationtype"), replace=replace, **kwargs)


@pytest.fixture
def pending() -> BatchOperation:
    """An operation pending before the bad calls: it must stay exactly as it was."""
    return enqueue("test-echo", input_data={"keep": "me"}, delay=timedelta(hours=1))


def _assert_untouched(pending: BatchOperation, count: int) -> None:
    assert BatchOperation.objects.count() == count
    row = BatchOperation.objects.get(pk=pending.pk)
    assert (row.status, row.input_data, row.run_after, row.attempts) == (
        "unprocessed",
        {"keep": "me"},
        pending.run_after,
        0,
    )


# --- Properties --------------------------------------------------------------------------------
@HYPOTHESIS
@given(bad=invalid_call, replace=st.booleans())
def test_invalid_enqueue_raises_and_writes_nothing(pending, bad, replace):
    before = BatchOperation.objects.count()
    with pytest.raises(InvalidOperationError):
        _call(bad, replace)
    stats["examples"] += 1
    _assert_untouched(pending, before)


@HYPOTHESIS
@given(
    bad=invalid_call.filter(
        lambda b: set(b) <= {"input_data", "delay", "run_after", "priority", "context_object"}
    ),
    good=st.integers(min_value=0, max_value=3),
    position=st.integers(min_value=0, max_value=3),
)
def test_invalid_item_in_enqueue_many_writes_nothing(pending, bad, good, position):
    before = BatchOperation.objects.count()
    items: list[dict] = [{"input_data": {"n": i}} for i in range(good)]
    items.insert(min(position, good), bad)
    with pytest.raises(InvalidOperationError):
        enqueue_many("test-echo", items)
    stats["examples"] += 1
    _assert_untouched(pending, before)


@HYPOTHESIS
@given(value=bad_input)
def test_invalid_input_to_create_asynchronous_writes_nothing(pending, value):
    before = BatchOperation.objects.count()
    with pytest.raises(InputDataError):
        BatchOperation.objects.create_asynchronous(operationtype="test-echo", input_data=value)
    stats["examples"] += 1
    _assert_untouched(pending, before)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a, b) -> bool:
    """Equal and of the same JSON types all the way down. JSON has one number type, and
    PostgreSQL's jsonb stores numbers as decimals (1e16 reads back as 10**16), so numbers are
    compared by value as floats."""
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    return a == b


@HYPOTHESIS
@given(value=json_values)
def test_valid_json_input_round_trips(value):
    operation = enqueue("test-echo", input_data=value)
    stats["examples"] += 1
    stats["rows"] += 1
    stored = BatchOperation.objects.get(pk=operation.pk).input_data
    assert _same(stored, value), f"stored {value!r}, read back {stored!r}"
    ran = run_due(operationtype="test-echo")
    stats["runs"] += [op.pk for op in ran].count(operation.pk)
    assert operation.pk in [op.pk for op in ran]
    echoed = BatchOperation.objects.get(pk=operation.pk).output_data
    assert _same(echoed, {"echo": value}), f"handler saw {echoed!r} for {value!r}"


# --- Limits and transactions ---------------------------------------------------------------------
def test_size_limit_is_exact(pending):
    before = BatchOperation.objects.count()
    with override_settings(
        BATCHFRAMEWORK={
            "MAX_INPUT_BYTES": 1000,
            "DISPATCHER": "batchframework.dispatch.NullDispatcher",
        }
    ):
        with pytest.raises(InputDataError, match="MAX_INPUT_BYTES"):
            enqueue("test-echo", input_data="x" * 999)  # 1001 bytes as JSON
        with pytest.raises(InputDataError):
            enqueue("test-echo", input_data={"é": "é" * 495})  # multi-byte: counted as bytes
        _assert_untouched(pending, before)
        assert enqueue("test-echo", input_data="x" * 998).pk  # exactly 1000 bytes
    with pytest.raises(InputDataError):  # the default limit: 1,000,000 bytes
        enqueue("test-echo", input_data="y" * 1_000_000)
    assert BatchOperation.objects.count() == before + 1


def test_bad_call_inside_atomic_leaves_the_transaction_usable(pending):
    before = BatchOperation.objects.count()
    with transaction.atomic():
        for bad in (
            {"operationtype": "nope"},
            {"input_data": {"x": math.nan}},
            {"delay": -5},
            {"run_after": datetime(2030, 1, 1)},
        ):
            with pytest.raises(InvalidOperationError):
                _call(bad, replace=False)
        kept = enqueue("test-echo", input_data=[1, 2])
    assert BatchOperation.objects.count() == before + 1
    assert BatchOperation.objects.get(pk=kept.pk).input_data == [1, 2]


def test_unknown_operationtype_error_lists_the_registered_ones():
    with pytest.raises(UnknownOperationTypeError) as info:
        enqueue("no-such-type")
    assert "test-echo" in str(info.value) and "no-such-type" in str(info.value)
    assert BatchOperation.objects.count() == 0


@pytest.mark.parametrize("delay", [1e12, -1e12, 10**12, -(10**12), 86_400 * 1_000_000_000])
def test_out_of_range_delay_in_seconds_is_an_invalid_operation(pending, delay):
    """A number of seconds too large for a timedelta must be refused like any bad delay (an
    ``InvalidOperationError``), not escape as a bare ``OverflowError``."""
    before = BatchOperation.objects.count()
    with pytest.raises(InvalidOperationError):
        enqueue("test-echo", delay=delay)
    _assert_untouched(pending, before)


OUT_OF_RANGE = [
    datetime.min.replace(tzinfo=timezone(timedelta(hours=1))),  # the year 0 in UTC
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),  # the year 10000 in UTC
    datetime(999, 12, 31, tzinfo=UTC),
    datetime(9999, 6, 1, tzinfo=UTC),
]


@pytest.mark.parametrize("when", OUT_OF_RANGE, ids=str)
def test_a_time_no_database_can_store_is_refused_by_every_entry_point(pending, when):
    """Such a time was stored by PostgreSQL and then broke every claim and every listing of
    the table (reading it back overflows Python's datetime); the others raised OverflowError."""
    before = BatchOperation.objects.count()
    with pytest.raises(InvalidOperationError, match="1000-01-01 to 9999-01-01"):
        enqueue("test-echo", run_after=when)
    with pytest.raises(InvalidOperationError, match="1000-01-01 to 9999-01-01"):
        enqueue("test-echo", run_after=when, replace=True, context_object=Game.objects.create())
    with pytest.raises(InvalidOperationError, match="1000-01-01 to 9999-01-01"):
        enqueue_many("test-echo", [{}, {"run_after": when}])
    with pytest.raises(InvalidOperationError, match="1000-01-01 to 9999-01-01"):
        pending.postpone(run_after=when)
    for create in (
        BatchOperation.objects.create_asynchronous,
        BatchOperation.objects.create_synchronous,
    ):
        with pytest.raises(InvalidOperationError, match="run_after"):
            create(operationtype="test-echo", run_after=when)
    with pytest.raises(InvalidOperationError, match="too large"):
        enqueue("test-echo", delay=timedelta(days=2_912_000))  # due in the year 9999
    _assert_untouched(pending, before)


def test_times_at_the_ends_of_the_range_are_stored_and_read_back(pending):
    early = datetime(1000, 1, 1, tzinfo=UTC)
    late = datetime(9999, 1, 1, tzinfo=UTC)
    stored = [enqueue("test-echo", run_after=when) for when in (early, late)]
    assert [BatchOperation.objects.get(pk=op.pk).run_after for op in stored] == [early, late]
    assert len(list(BatchOperation.objects.all())) == 3  # the table still lists
    assert [op.pk for op in run_due(operationtype="test-echo")] == [stored[0].pk]


def test_a_context_object_whose_key_is_too_long_is_refused(pending):
    """``enqueue_many`` on PostgreSQL cut such a key to 255 characters: the operation pointed
    at another object. ``enqueue`` failed with the database's error."""
    before = BatchOperation.objects.count()
    too_long = StringThing(slug="k" * 256)
    with pytest.raises(InvalidOperationError, match="255"):
        enqueue("test-echo", context_object=too_long)
    with pytest.raises(InvalidOperationError, match="255"):
        enqueue_many("test-echo", [{"context_object": too_long}])
    with pytest.raises(InvalidOperationError, match="255"):
        BatchOperation.objects.create_asynchronous(operationtype="x", context_object=too_long)
    _assert_untouched(pending, before)
    longest = StringThing(slug="k" * 255)
    (created,) = enqueue_many("test-echo", [{"context_object": longest}])
    assert BatchOperation.objects.for_context_object(longest).get().pk == created.pk


def test_zz_report(reliability_report):
    """One summary line for the scenario (runs last in this module), from what its tests
    counted: it reports nothing when they did not run (a ``-k`` selection, another order)."""
    if not stats["rows"]:
        pytest.skip("the round-trip tests of this module did not run before the report")
    reliability_report(
        12,
        operations=stats["rows"],
        runs=stats["runs"],
        duplicates=max(0, stats["runs"] - stats["rows"]),
        lost=max(0, stats["rows"] - stats["runs"]),
        seconds=time.monotonic() - _STARTED,
        invalid_examples=stats["examples"] - stats["rows"],
    )


_STARTED = time.monotonic()
