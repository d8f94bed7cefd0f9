"""Bad arguments to the public API get a clear error before any query that could write or fail.

Each case runs inside the test's transaction: afterwards nothing was written and that
transaction still works (a database error would have broken it on PostgreSQL), which is what a
caller's own ``transaction.atomic()`` block needs. Covers ``set_progress`` (numbers outside the
column, text the driver can't encode), ``enqueue`` / ``enqueue_many`` (arguments of the wrong
kind: ``docs/guarantees.rst`` promises an ``InvalidOperationError`` for each) and every ``now``
(``run_due``, the queryset's time filters, the engine's claim and recovery).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework.engine import claim, claim_due, recover_expired, set_progress
from batchframework.exceptions import (
    InvalidOperationError,
    OperationFieldsError,
    OperationStateError,
    UnknownOperationTypeError,
)
from batchframework.testing import run_due
from tests.testapp.models import Post, StringThing, UUIDThing

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]

BIGINT_MAX = 2**63 - 1


def assert_transaction_usable() -> None:
    """A write and a read still work in the test's (the caller's) transaction."""
    Post.objects.create(title="after the error")
    assert Post.objects.filter(title="after the error").count() == 1


@pytest.fixture
def running() -> BatchOperation:
    """A claimed operation with progress 1 of 2, "one": what a refused call must leave."""
    op = claim(enqueue("test-sleep").pk)
    assert op is not None
    assert set_progress(op, 1, 2, "one") is True
    return op


def stored_progress(op: BatchOperation) -> tuple:
    row = BatchOperation.objects.get(pk=op.pk)
    return row.progress_done, row.progress_total, row.progress_message


# --- set_progress ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param((2**64,), "done", id="done-above-bigint"),
        pytest.param((BIGINT_MAX + 1,), "done", id="done-just-above"),
        pytest.param((1, 2**64), "total", id="total-above-bigint"),
        pytest.param((1, BIGINT_MAX + 1), "total", id="total-just-above"),
    ],
)
def test_set_progress_refuses_numbers_the_column_cannot_hold(running, args, needle):
    with pytest.raises(ValueError, match=needle) as excinfo:
        set_progress(running, *args)
    assert "2**63 - 1" in str(excinfo.value)
    assert stored_progress(running) == (1, 2, "one")
    assert_transaction_usable()


def test_set_progress_accepts_the_largest_number_the_column_holds(running):
    assert set_progress(running, BIGINT_MAX, BIGINT_MAX) is True
    assert stored_progress(running)[:2] == (BIGINT_MAX, BIGINT_MAX)


def test_set_progress_writes_lone_surrogates_as_escapes(running):
    """As error messages and abandon reasons are (``errors.storable_text``): the driver can't
    encode them, and a progress line is not worth failing a handler over."""
    assert set_progress(running, 2, 2, "a\ud800b") is True
    assert stored_progress(running) == (2, 2, "a\\ud800b")
    assert running.progress_message == "a\\ud800b"
    assert_transaction_usable()


def test_set_progress_cuts_an_escaped_message_to_the_column(running):
    assert set_progress(running, 2, 2, "\udfff" * 255) is True
    assert stored_progress(running)[2] == ("\\udfff" * 255)[:255]


# --- enqueue / enqueue_many ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "needle"),
    [
        pytest.param(lambda: enqueue(["x"]), UnknownOperationTypeError, "string", id="list"),
        pytest.param(lambda: enqueue({}), UnknownOperationTypeError, "string", id="dict"),
        pytest.param(lambda: enqueue(None), UnknownOperationTypeError, "string", id="none"),
        pytest.param(lambda: enqueue("test-echo", using=5), InvalidOperationError, "using"),
        pytest.param(
            lambda: enqueue("test-echo", using="bogus"),
            InvalidOperationError,
            "'default'",
            id="using-not-in-databases",
        ),
        pytest.param(lambda: enqueue("test-echo", replace="no"), InvalidOperationError, "replace"),
        pytest.param(lambda: enqueue("test-echo", replace=1), InvalidOperationError, "replace"),
        pytest.param(
            lambda: enqueue_many(["x"], [{}]), UnknownOperationTypeError, "string", id="many-list"
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", [{}], using=5), InvalidOperationError, "using"
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", None), InvalidOperationError, "iterable", id="none"
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", 3), InvalidOperationError, "iterable", id="int"
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", [1]),
            InvalidOperationError,
            "item 0 must be a mapping",
            id="item-int",
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", [{"input_data": 1}, "input_data"]),
            InvalidOperationError,
            "item 1 must be a mapping",
            id="item-str",
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", {"input_data": 1}),
            InvalidOperationError,
            "not a single dict",
            id="one-dict-for-the-list",
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", "abc"),
            InvalidOperationError,
            "not a single str",
            id="str-for-the-list",
        ),
        pytest.param(
            lambda: enqueue_many("test-echo", [{1: "a", "b": 2}]),
            InvalidOperationError,
            "unknown key(s) ['b', 1]",
            id="unknown-keys-of-mixed-types",
        ),
    ],
)
def test_enqueue_refuses_arguments_of_the_wrong_kind(call, error, needle):
    before = enqueue("test-echo", delay=timedelta(hours=1))  # pending: must be left alone
    with pytest.raises(error) as excinfo:
        call()
    assert isinstance(excinfo.value, InvalidOperationError)
    assert needle in str(excinfo.value)
    assert list(BatchOperation.objects.values_list("pk", "run_after")) == [
        (before.pk, before.run_after)
    ]
    assert_transaction_usable()


def test_enqueue_replace_false_and_true_still_work():
    first = enqueue("test-echo", input_data={"n": 1}, replace=True)
    assert enqueue("test-echo", input_data={"n": 2}, replace=True).pk == first.pk
    assert enqueue("test-echo", input_data={"n": 3}, replace=False).pk != first.pk
    assert BatchOperation.objects.count() == 2


def test_enqueue_many_takes_any_iterable_of_mappings():
    created = enqueue_many("test-echo", ({"input_data": {"i": i}} for i in range(3)))
    assert sorted(op.input_data["i"] for op in created) == [0, 1, 2]
    assert enqueue_many("test-echo", (), using="default") == []


# --- now -------------------------------------------------------------------------------------
NOT_DATETIMES = [
    pytest.param("2030-01-01", id="str"),
    pytest.param(date(2030, 1, 1), id="date"),
    pytest.param(5, id="int"),
    pytest.param("", id="empty-str"),
    pytest.param(0, id="zero"),
]
NAIVE = datetime(2100, 1, 1)
OUT_OF_RANGE = datetime(9999, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize("now", NOT_DATETIMES)
def test_run_due_refuses_a_now_that_is_no_datetime(now):
    op = enqueue("test-echo")
    with pytest.raises(TypeError, match="timezone-aware datetime"):
        run_due(now)
    assert BatchOperation.objects.get(pk=op.pk).status == BatchOperation.STATUS_UNPROCESSED
    assert_transaction_usable()


@pytest.mark.parametrize(
    ("now", "needle"), [(NAIVE, "naive"), (OUT_OF_RANGE, "1000-01-01 to 9999-01-01")]
)
def test_run_due_refuses_a_naive_or_unstorable_now(now, needle):
    op = enqueue("test-echo")
    with pytest.raises(ValueError, match=needle):
        run_due(now)
    assert BatchOperation.objects.get(pk=op.pk).status == BatchOperation.STATUS_UNPROCESSED
    assert_transaction_usable()


QUERYSET_FILTERS = ["due", "not_due", "lease_expired"]


@pytest.mark.parametrize("method", QUERYSET_FILTERS)
@pytest.mark.parametrize("now", NOT_DATETIMES[:3])
def test_queryset_time_filters_refuse_a_now_that_is_no_datetime(method, now):
    with pytest.raises(TypeError, match="timezone-aware datetime"):
        getattr(BatchOperation.objects, method)(now)
    assert_transaction_usable()


@pytest.mark.parametrize("method", QUERYSET_FILTERS)
def test_queryset_time_filters_refuse_a_naive_now(method):
    """It used to be only a RuntimeWarning, with the time read in the session's zone."""
    with pytest.raises(ValueError, match="naive"):
        getattr(BatchOperation.objects, method)(NAIVE)
    assert_transaction_usable()


def test_claim_and_recovery_refuse_a_bad_now():
    op = enqueue("test-echo")
    with pytest.raises(TypeError, match="timezone-aware datetime"):
        claim(op.pk, now="2030-01-01")
    with pytest.raises(ValueError, match="naive"):
        recover_expired(now=NAIVE)
    # The PostgreSQL claim writes ``now`` into its own SQL: a string broke the transaction.
    with pytest.raises(TypeError, match="timezone-aware datetime"):
        claim_due(now="2030-01-01")
    assert BatchOperation.objects.get(pk=op.pk).status == BatchOperation.STATUS_UNPROCESSED
    assert_transaction_usable()


def test_an_aware_now_in_any_zone_still_works():
    op = enqueue("test-echo")
    later = timezone.localtime(timezone.now() + timedelta(seconds=1))
    assert BatchOperation.objects.due(later).get() == op
    assert [o.pk for o in run_due(later)] == [op.pk]


# --- Context objects, related objects and creation arguments ---------------------------------
@pytest.mark.parametrize("model", [UUIDThing, StringThing], ids=["uuid-pk", "text-pk"])
@pytest.mark.parametrize("create", ["enqueue", "create_asynchronous"])
def test_an_unsaved_context_object_with_a_default_primary_key_is_refused(model, create):
    """A UUID or text primary key is set before the object is saved: only ``pk is None`` was
    refused, so an operation pointed at an object that never existed (its handler saw
    ``context_object`` None), and succeeded."""
    unsaved = model()
    with pytest.raises(InvalidOperationError, match="must be saved"):
        if create == "enqueue":
            enqueue("test-echo", context_object=unsaved)
        else:
            BatchOperation.objects.create_asynchronous(context_object=unsaved)
    assert not BatchOperation.objects.exists()
    saved = model.objects.create(**({"slug": "saved"} if model is StringThing else {}))
    built = model(pk=saved.pk)  # built, not read, for an existing row: fine (one lookup)
    assert enqueue("test-echo", context_object=built).context_object == saved
    assert BatchOperation.objects.for_context_object(built).count() == 1
    with pytest.raises(InvalidOperationError, match="must be saved"):
        BatchOperation.objects.for_context_object(model())


@pytest.mark.parametrize("given", [None, 5], ids=["none", "int"])
def test_for_context_object_of_no_model_instance_is_refused(given):
    with pytest.raises(InvalidOperationError, match="model instance"):
        BatchOperation.objects.for_context_object(given)


@pytest.mark.parametrize(
    "extra",
    [
        {"context_object_id": "999"},
        {"context_content_type_id": 1},
    ],
    ids=["and-id", "and-content-type"],
)
def test_a_context_object_and_its_parts_together_are_refused(extra):
    """One of them was dropped in silence."""
    post = Post.objects.create(title="p")
    with pytest.raises(InvalidOperationError, match="either context_object"):
        BatchOperation.objects.create_asynchronous(context_object=post, **extra)
    with pytest.raises(InvalidOperationError, match="needs context_content_type"):
        BatchOperation.objects.create_asynchronous(context_object_id="5")
    assert not BatchOperation.objects.exists()
    assert_transaction_usable()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"operationtype": ["x"]}, "operationtype"),
        ({"run_after": 5}, "run_after"),
        ({"finished_datetime": object()}, "finished_datetime"),
    ],
    ids=["operationtype-list", "run-after-int", "finished-object"],
)
def test_create_methods_refuse_values_of_the_wrong_type_as_field_errors(kwargs, field):
    with pytest.raises(OperationFieldsError) as excinfo:
        BatchOperation.objects.create_asynchronous(**kwargs)
    assert field in excinfo.value.message_dict
    assert not BatchOperation.objects.exists()
    assert_transaction_usable()


@pytest.mark.parametrize("taken", ["debounce_key", "id"])
def test_a_value_another_operation_holds_leaves_the_callers_transaction_usable(taken):
    """The database refused the duplicate with an ``IntegrityError`` that broke the caller's
    transaction; every other refused field value raises ``OperationFieldsError`` first."""
    first = BatchOperation.objects.create_asynchronous(debounce_key="k")
    again = {"debounce_key": "k"} if taken == "debounce_key" else {"id": first.pk}
    with pytest.raises(OperationFieldsError, match=taken):
        BatchOperation.objects.create_asynchronous(**again)
    assert BatchOperation.objects.count() == 1
    assert_transaction_usable()


# --- The original's manual flow --------------------------------------------------------------
def test_a_finished_operation_is_neither_finished_again_nor_marked_as_running():
    """A second ``finish()`` made a failure successful while keeping its error; marking a
    finished operation as running left it running with its result, which the abandoned tools
    then took for a live one."""
    op = BatchOperation.objects.create_synchronous(operationtype="manual")
    op.finish(failed=True, output_data={"error": {"type": "a"}})
    with pytest.raises(OperationStateError, match="finished"):
        op.finish()
    with pytest.raises(OperationStateError, match="finished"):
        op.mark_as_running()
    stored = BatchOperation.objects.get(pk=op.pk)
    assert (stored.status, stored.result) == (
        BatchOperation.STATUS_FINISHED,
        BatchOperation.RESULT_FAILED,
    )
    assert stored.error == {"type": "a"}


@pytest.mark.parametrize("atomic", [False, True], ids=["plain", "atomic"])
@pytest.mark.parametrize("call", ["finish", "mark_as_running"])
def test_a_handler_that_finishes_its_own_operation_by_hand_is_told_how(registered, atomic, call):
    """Porting the original's manual flow into a handler: ``finish()`` inside an atomic handler
    failed the engine's fenced finish, which rolled the handler's work back and left the
    operation running until it was failed as a lost worker's; a plain one never announced."""

    @registered("test-finishes-itself", atomic=atomic, max_attempts=1)
    def finishes_itself(operation):
        Post.objects.create(title="the handler's work")
        getattr(operation, call)()
        return {"returned": True}

    op = enqueue("test-finishes-itself")
    run_due(operationtype="test-finishes-itself")
    stored = BatchOperation.objects.get(pk=op.pk)
    assert (stored.status, stored.result) == ("finished", "failed")
    assert stored.error["type"] == "batchframework.exceptions.OperationStateError"
    assert "a handler returns its output" in stored.error["message"]
    assert Post.objects.exists() is not atomic  # an atomic handler's work rolls back with it


def test_the_manual_flow_finishes_an_operation_recovery_marked_to_run_alone():
    """Recovery marks an operation lost with a batch (``claimed_by`` holds the mark, not a
    claim); the manual flow then took it for one a worker had claimed, and refused to finish
    what it had marked as running."""
    op = enqueue("test-noop", delay=3600)
    BatchOperation.objects.filter(pk=op.pk).update(claimed_by="!isolated")  # recovery's mark
    op = BatchOperation.objects.get(pk=op.pk)
    op.mark_as_running()
    op.finish()
    stored = BatchOperation.objects.get(pk=op.pk)
    assert (stored.status, stored.result) == ("finished", "successful")


def test_a_synchronous_operation_starts_when_it_is_created():
    op = BatchOperation.objects.create_synchronous(operationtype="manual")
    assert op.created_datetime == op.started_running_datetime


def test_a_reference_built_with_its_key_costs_no_query():
    """``Post(pk=post_id)`` is the usual way to point at a row without reading it; only keys
    with a default are looked up (a UUID is set before its instance is saved)."""
    posts = [Post.objects.create(title=str(n)) for n in range(20)]
    enqueue_many("test-echo", [{"context_object": Post(pk=post.pk)} for post in posts[:1]])
    with CaptureQueriesContext(connection) as captured:
        enqueue_many("test-echo", [{"context_object": Post(pk=post.pk)} for post in posts])
    assert not [q for q in captured.captured_queries if q["sql"].upper().startswith("SELECT")]
    assert BatchOperation.objects.count() == 21
