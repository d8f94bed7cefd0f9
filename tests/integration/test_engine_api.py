"""The engine through its public API, against the configured database (SQLite, PostgreSQL or
MariaDB): registration, enqueue and its validation, transactional dispatch, debounce, postpone,
cancel, progress, bulk enqueue, signals, logging, running, retries, recovery, fencing, query
counts and system checks.

Handlers come from ``tests/testapp/batch_handlers.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import IntegrityError, connection, transaction
from django.db.models.signals import post_init, post_save, pre_save
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import batchframework
from batchframework import BatchOperation, enqueue, enqueue_many, handler
from batchframework.clock import forget_clock_offsets
from batchframework.conf import get_settings
from batchframework.dispatch import NULL_DISPATCHER
from batchframework.engine import (
    CancelOutcome,
    RunOutcome,
    claim,
    claim_due,
    claims_needed,
    recover_expired,
    release,
    renew_leases,
    run,
    set_progress,
)
from batchframework.engine.run import run_claimed
from batchframework.exceptions import (
    HandlerRegistrationError,
    InputDataError,
    InvalidOperationError,
    UnknownOperationTypeError,
)
from batchframework.registry import registry
from batchframework.signals import (
    kv,
    operation_cancelled,
    operation_finished,
    operation_retry_scheduled,
    operation_started,
    operations_enqueued,
)
from batchframework.testing import run_due
from tests.testapp.models import Archive, Effect, Execution, Player, Post, UUIDThing

from .helpers import (
    ANNOUNCE_CHANNEL,
    ANNOUNCING_DISPATCHER,
    EXPLODING_DISPATCHER,
    RecordingDispatcher,
    assert_close,
)

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]

LOST_WORKER = "batchframework.WorkerLost"


def fresh(op: BatchOperation) -> BatchOperation:
    return BatchOperation.objects.get(pk=op.pk)


def row_values(op: BatchOperation) -> dict:
    return BatchOperation.objects.filter(pk=op.pk).values().get()


# --- Public API and registry ----------------------------------------------------------------
def test_flat_public_api_names():
    from batchframework import BatchOperation as Model
    from batchframework import enqueue as enqueue_fn
    from batchframework import enqueue_many as enqueue_many_fn
    from batchframework import handler as handler_fn

    assert Model is BatchOperation
    assert enqueue_fn is batchframework.engine.enqueue
    assert enqueue_many_fn is batchframework.engine.enqueue_many
    assert handler_fn is handler
    assert batchframework.registry is registry
    with pytest.raises(AttributeError):
        batchframework.no_such_name  # noqa: B018


def test_registering_an_operationtype_twice_names_both_functions():
    def first_handler(operation):
        return 1

    def second_handler(operation):
        return 2

    try:
        handler("test-api-duplicate")(first_handler)
        with pytest.raises(HandlerRegistrationError) as excinfo:
            handler("test-api-duplicate")(second_handler)
        message = str(excinfo.value)
        assert "first_handler" in message and "second_handler" in message
        assert "test-api-duplicate" in message
        # The first registration stands.
        assert registry["test-api-duplicate"].function is first_handler
        # Registering the very same function again (a re-import) is harmless.
        handler("test-api-duplicate")(first_handler)
    finally:
        registry.unregister("test-api-duplicate")
    assert "test-api-duplicate" not in registry


def _made_by_a_factory(result):
    def made(operation):
        return result

    return made


class _Methods:
    def handle(self, operation):
        return id(self)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (lambda operation: 1, lambda operation: 2),
        (_made_by_a_factory(1), _made_by_a_factory(2)),
        (_Methods().handle, _Methods().handle),
    ],
    ids=["lambdas", "factory", "bound-methods"],
)
def test_another_function_with_the_same_name_is_no_second_registration(first, second):
    """Two lambdas, two functions made by one factory, or the methods of two instances share
    their qualified name; the second silently replaced the first handler, as if it were the
    same function imported again."""
    try:
        handler("test-api-same-name")(first)
        with pytest.raises(HandlerRegistrationError, match="already handled"):
            handler("test-api-same-name")(second)
        assert registry["test-api-same-name"].function is first
    finally:
        registry.unregister("test-api-same-name")


def test_the_same_function_registered_again_with_other_options_is_refused():
    def options_differ(operation):
        return None

    try:
        handler("test-api-options", queue="a", max_attempts=1)(options_differ)
        handler("test-api-options", queue="a", max_attempts=1)(options_differ)  # the same
        with pytest.raises(HandlerRegistrationError, match="with other options"):
            handler("test-api-options", queue="b", max_attempts=5)(options_differ)
        assert registry["test-api-options"].queue == "a"
    finally:
        registry.unregister("test-api-options")


def test_a_reloaded_handlers_module_registers_its_new_function(tmp_path, monkeypatch):
    """``importlib.reload`` runs a module's ``@handler`` again with a new function object of
    the same name: it takes the old one's place (the module's code now)."""
    import importlib

    (tmp_path / "reloaded_handlers.py").write_text(
        "from batchframework import handler\n"
        "@handler('test-api-reloaded')\n"
        "def reloaded(operation):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("reloaded_handlers")
        before = registry["test-api-reloaded"].function
        importlib.reload(module)
        assert registry["test-api-reloaded"].function is module.reloaded is not before
    finally:
        registry.unregister("test-api-reloaded")
        monkeypatch.delitem(sys.modules, "reloaded_handlers", raising=False)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),  # a bool is an int to Python
        ({"lease": -1}, "lease"),
        ({"lease": timedelta(days=3_000_000)}, "lease"),  # its expiry would be past year 9999
        ({"queue": "q" * 101}, "queue"),  # longer than the column
        ({"queue": ""}, "queue"),
        ({"queue": 5}, "queue"),
        ({"queue": "q\x00"}, "queue"),
        ({"atomic": "no"}, "atomic"),  # truthy: the handler would run atomic
    ],
)
def test_handler_options_are_validated(options, needle):
    with pytest.raises(HandlerRegistrationError, match=needle):
        handler("test-api-bad", **options)
    assert "test-api-bad" not in registry


def test_an_invalid_operationtype_is_refused():
    with pytest.raises(HandlerRegistrationError):
        handler("has spaces")


def test_an_async_handler_is_refused():
    """Called as fn(operation), it returned a coroutine that never ran, and every attempt
    failed on that return value."""

    async def coroutine_handler(operation):
        return 1

    async def generator_handler(operation):
        yield 1

    class AsyncCallable:
        async def __call__(self, operation):
            return 1

    for fn in (
        coroutine_handler,
        generator_handler,
        AsyncCallable(),
        functools.partial(coroutine_handler),
        functools.partial(AsyncCallable()),
    ):
        with pytest.raises(HandlerRegistrationError, match="async"):
            handler("test-api-bad")(fn)
    assert "test-api-bad" not in registry


def test_a_generator_function_is_refused_as_a_handler():
    """Called, it returned a generator whose body never ran: every attempt failed on that
    return value, and none of the handler's code had run."""

    def generator_handler(operation):
        yield 1

    class GeneratorCallable:
        def __call__(self, operation):
            yield 1

    for fn in (generator_handler, GeneratorCallable(), functools.partial(generator_handler)):
        with pytest.raises(HandlerRegistrationError, match="generator"):
            handler("test-api-bad")(fn)
    assert "test-api-bad" not in registry


def test_a_callable_object_is_a_handler():
    class Callable_:
        def __call__(self, operation):
            return {"called": True}

    handler("test-api-callable")(Callable_())
    try:
        op = enqueue("test-api-callable")
        run_due()
        assert fresh(op).output_data == {"called": True}
    finally:
        registry.unregister("test-api-callable")


def test_a_handler_error_whose_message_holds_a_nul_is_recorded():
    """PostgreSQL refused to store the message: run() raised, and the operation stayed
    running until its lease expired."""

    def nul_in_message(operation):
        raise ValueError("a\x00b")

    handler("test-api-nul")(nul_in_message)
    try:
        op = enqueue("test-api-nul")
        assert run(op.pk) is RunOutcome.FAILED
        assert fresh(op).error["message"] == "a\\x00b"
        assert "a\\x00b" in fresh(op).last_error
    finally:
        registry.unregister("test-api-nul")


class _UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no message")


def test_a_handler_error_whose_str_raises_is_recorded():
    """Describing the failure called ``str()`` on the exception unguarded: its error replaced
    the handler's, and the operation stayed running until its lease expired (and the block of
    a synchronous operation raised the wrong error, leaving it running for good)."""

    def unprintable(operation):
        raise _UnprintableError

    handler("test-api-unprintable")(unprintable)
    try:
        op = enqueue("test-api-unprintable")
        assert run(op.pk) is RunOutcome.FAILED
        assert fresh(op).error["type"].endswith("_UnprintableError")
        assert fresh(op).error["message"] == "<exception str() failed>"
    finally:
        registry.unregister("test-api-unprintable")
    synchronous_block = BatchOperation.objects.synchronous(operationtype="unprintable")
    with pytest.raises(_UnprintableError), synchronous_block as synchronous:
        raise _UnprintableError
    assert fresh(synchronous).status == BatchOperation.STATUS_FINISHED
    assert fresh(synchronous).result == BatchOperation.RESULT_FAILED


def test_registry_lists_discovered_handlers():
    expected = {
        "test-noop",
        "test-echo",
        "test-effect",
        "test-always-fails",
        "test-fails-once",
        "test-atomic",
        "test-sleep",
        "test-bad-output",
        "test-other-queue",
    }
    assert expected <= set(registry.operationtypes())
    assert registry.operationtypes() == sorted(registry.operationtypes())
    listed = {h.operationtype: h for h in registry}
    assert listed["test-sleep"].resolved_lease() == timedelta(seconds=2)
    assert listed["test-atomic"].atomic is True
    assert listed["test-echo"].name == "tests.testapp.batch_handlers.echo"
    assert registry.operationtypes_for_queues(["other"]) == ["test-other-queue"]
    assert len(registry) >= len(expected)
    with pytest.raises(UnknownOperationTypeError) as excinfo:
        registry["no-such-type"]
    assert "test-echo" in str(excinfo.value)


# --- enqueue ----------------------------------------------------------------------------------
def test_enqueue_stores_one_unprocessed_row():
    post = Post.objects.create(title="p")
    user = get_user_model().objects.create(username="u")
    before = timezone.now()
    op = enqueue(
        "test-echo", context_object=post, input_data={"a": [1, "b"]}, started_by=user, priority=5
    )
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_UNPROCESSED
    assert stored.result == BatchOperation.RESULT_NOT_AVAILABLE
    assert stored.operationtype == "test-echo"
    assert stored.context_object == post
    assert stored.input_data == {"a": [1, "b"]}
    assert stored.started_by == user
    assert stored.priority == 5
    assert stored.queue == "default"
    assert stored.attempts == 0
    # Due now, in whole milliseconds: at most 1 ms before the call, never after it.
    assert before - timedelta(milliseconds=1) < stored.run_after <= timezone.now()
    assert list(BatchOperation.objects.for_context_object(post)) == [stored]
    assert enqueue("test-other-queue").queue == "other"
    assert enqueue("test-echo", queue="special").queue == "special"


@pytest.mark.parametrize(
    "input_data",
    [
        None,
        {"text": 'quote " backslash \\ and ünïcode ✓', "nested": [1, 2.5, None, True]},
        [],
        "plain",  # a JSON string, not text to be stored as is
        0,
        {"big": 2**53},
    ],
)
def test_enqueue_returns_the_stored_operation_field_for_field(input_data):
    """On PostgreSQL ``enqueue`` writes with a prebuilt statement instead of ``save()``: what it
    returns and what ``save()``'s signals see must not differ from the stored row."""
    user = get_user_model().objects.create(username="single")
    thing = UUIDThing.objects.create()
    seen: list[tuple[str, int | None, bool, dict]] = []

    def pre(sender, instance, signal, **kwargs):
        seen.append(("pre", instance.pk, instance._state.adding, kwargs))

    def post(sender, instance, signal, **kwargs):
        seen.append(("post", instance.pk, instance._state.adding, kwargs))

    pre_save.connect(pre, sender=BatchOperation)
    post_save.connect(post, sender=BatchOperation)
    try:
        op = enqueue(
            "test-echo",
            context_object=thing,
            input_data=input_data,
            started_by=user,
            queue="other",
            priority=-3,
            delay=timedelta(seconds=30),
        )
    finally:
        pre_save.disconnect(pre, sender=BatchOperation)
        post_save.disconnect(post, sender=BatchOperation)
    row = fresh(op)
    for field in BatchOperation._meta.concrete_fields:
        assert getattr(op, field.attname) == getattr(row, field.attname), field.name
    assert row.input_data == input_data
    assert row.context_object == thing
    assert not op._state.adding and op._state.db == "default"
    common = {"raw": False, "using": "default", "update_fields": None}
    assert seen == [
        ("pre", None, True, common),
        ("post", op.pk, False, {**common, "created": True}),
    ]
    with CaptureQueriesContext(connection) as captured:
        assert op.started_by == user  # kept, not fetched again
    assert captured.captured_queries == []


def test_an_operation_due_now_is_due_for_a_claim_straight_after_enqueue():
    """Due now holds at once on the database's clock, whatever its resolution: SQLite's clock
    reads whole milliseconds, so a due time with microseconds used to be due only a moment
    later, and a claim in the same millisecond found nothing; and SQLite compares times as
    text, so its clock must read with as many fraction digits as Django stores."""
    for _ in range(300):  # many land in the millisecond they were stored in
        op = enqueue("test-noop")
        assert op.run_after.microsecond % 1000 == 0  # not after any reading in the same ms
        assert claim(op.pk) is not None, op.run_after


def test_enqueue_with_delay_and_run_after():
    now = timezone.now()
    delayed = enqueue("test-noop", delay=timedelta(minutes=15))
    assert_close(fresh(delayed).run_after, now + timedelta(minutes=15))
    seconds = enqueue("test-noop", delay=90)
    assert_close(fresh(seconds).run_after, now + timedelta(seconds=90))
    at = now + timedelta(hours=2)
    assert fresh(enqueue("test-noop", run_after=at)).run_after == at


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"input_data": {"when": object()}}, InputDataError, "JSON"),
        ({"input_data": {"d": Decimal("1.5")}}, InputDataError, "JSON"),
        ({"input_data": {"x": float("nan")}}, InputDataError, "JSON"),
        ({"delay": timedelta(minutes=1), "run_after": "now"}, InvalidOperationError, "not both"),
        ({"delay": timedelta(seconds=-1)}, InvalidOperationError, "negative"),
        ({"delay": -5}, InvalidOperationError, "negative, got -5"),
        ({"delay": "soon"}, InvalidOperationError, "delay"),
        ({"run_after": "naive"}, InvalidOperationError, "timezone-aware"),
        ({"priority": "high"}, InvalidOperationError, "priority"),
        ({"priority": 1.5}, InvalidOperationError, "priority"),
        ({"priority": True}, InvalidOperationError, "priority"),
        ({"priority": 10**6}, InvalidOperationError, "priority"),
        ({"context_object": "unsaved"}, InvalidOperationError, "saved"),
        ({"context_object": "not-a-model"}, InvalidOperationError, "context_object"),
        ({"started_by": "unsaved-user"}, InvalidOperationError, "started_by"),
        ({"queue": ""}, InvalidOperationError, "queue"),
    ],
)
def test_enqueue_validation_writes_nothing(kwargs, error, needle):
    kwargs = dict(kwargs)
    if kwargs.get("run_after") == "now":
        kwargs["run_after"] = timezone.now()
    if kwargs.get("run_after") == "naive":
        kwargs["run_after"] = timezone.now().replace(tzinfo=None)
    if kwargs.get("context_object") == "unsaved":
        kwargs["context_object"] = Post(title="never saved")
    if kwargs.get("context_object") == "not-a-model":
        kwargs["context_object"] = {"pk": 1}
    if kwargs.get("started_by") == "unsaved-user":
        kwargs["started_by"] = get_user_model()(username="ghost")
    with pytest.raises(error) as excinfo:
        enqueue("test-echo", **kwargs)
    assert needle in str(excinfo.value)
    assert BatchOperation.objects.count() == 0


def test_enqueue_unknown_operationtype_lists_registered_ones():
    with pytest.raises(UnknownOperationTypeError) as excinfo:
        enqueue("no-such-operation", input_data={"a": 1})
    message = str(excinfo.value)
    assert "no-such-operation" in message
    for known in ("test-echo", "test-noop", "test-effect"):
        assert known in message
    assert isinstance(excinfo.value, InvalidOperationError)
    assert BatchOperation.objects.count() == 0


def test_input_data_size_limit():
    with override_settings(BATCHFRAMEWORK={"MAX_INPUT_BYTES": 20, "DISPATCHER": NULL_DISPATCHER}):
        with pytest.raises(InputDataError, match="MAX_INPUT_BYTES"):
            enqueue("test-echo", input_data={"text": "x" * 50})
        enqueue("test-echo", input_data={"t": "ok"})
    assert BatchOperation.objects.count() == 1


# --- Transactional enqueue (invariant 5) ----------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_enqueue_rolled_back_leaves_no_row_and_dispatches_nothing(recording_dispatcher):
    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        op = enqueue("test-echo", input_data={"a": 1})
        assert BatchOperation.objects.filter(pk=op.pk).exists()
        raise Boom
    assert BatchOperation.objects.count() == 0
    assert recording_dispatcher == []


@pytest.mark.django_db(transaction=True)
def test_enqueue_committed_dispatches_once_after_commit(recording_dispatcher):
    with transaction.atomic():
        op = enqueue("test-echo", input_data={"a": 1})
        assert recording_dispatcher == []  # not before the commit
    assert recording_dispatcher == [("default", [op.pk])]
    # Outside a transaction (autocommit) the dispatch happens at once.
    second = enqueue("test-noop")
    assert recording_dispatcher == [("default", [op.pk]), ("default", [second.pk])]
    # A bulk enqueue is one dispatch of all its operations.
    many = enqueue_many("test-noop", [{}, {}, {}])
    assert recording_dispatcher[-1] == ("default", [o.pk for o in many])
    assert len(recording_dispatcher) == 3


@pytest.fixture
def pg_listener() -> Iterator[Callable[[float], list[str]]]:
    """A second PostgreSQL session LISTENing on ``ANNOUNCE_CHANNEL``: call it with a timeout
    to get the payloads that arrived."""
    import psycopg

    settings = connection.settings_dict
    session = psycopg.connect(
        dbname=settings["NAME"],
        user=settings["USER"] or None,
        password=settings["PASSWORD"] or None,
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        autocommit=True,
    )
    session.execute(f"LISTEN {ANNOUNCE_CHANNEL}")
    try:
        yield lambda timeout: [n.payload for n in session.notifies(timeout=timeout, stop_after=1)]
    finally:
        session.close()


@pytest.mark.django_db(transaction=True)
def test_a_dispatcher_with_a_channel_is_told_by_notify_on_postgresql_only(request):
    """``Dispatcher.notify_channel``: on PostgreSQL the INSERT announces the operation, which
    arrives only on commit and never after a rollback, and nothing is dispatched in-process;
    elsewhere (and for ``enqueue_many`` and ``replace=True``) ``dispatch`` runs after commit."""
    RecordingDispatcher.calls.clear()
    postgresql = connection.vendor == "postgresql"
    listen = request.getfixturevalue("pg_listener") if postgresql else None
    with override_settings(BATCHFRAMEWORK={"DISPATCHER": ANNOUNCING_DISPATCHER}):
        with transaction.atomic():
            op = enqueue("test-echo", input_data={"a": 1})
            if listen:
                assert listen(0.2) == []  # not before the commit
        if listen:
            assert listen(5) == [str(op.pk)]
            assert RecordingDispatcher.calls == []
        else:
            assert RecordingDispatcher.calls == [("default", [op.pk])]
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            enqueue("test-echo")
            1 / 0  # noqa: B018
        with transaction.atomic():  # a savepoint rolled back takes its announcement with it
            kept = enqueue("test-echo")
            with pytest.raises(ZeroDivisionError), transaction.atomic():
                enqueue("test-echo")
                1 / 0  # noqa: B018
        if listen:
            assert listen(0.3) == [str(kept.pk)]
            assert listen(0.3) == []
        else:
            assert RecordingDispatcher.calls[-1] == ("default", [kept.pk])
        RecordingDispatcher.calls.clear()
        many = enqueue_many("test-noop", [{}, {}])
        debounced = enqueue("test-other-queue", replace=True)
        assert RecordingDispatcher.calls == [
            ("default", [o.pk for o in many]),
            ("default", [debounced.pk]),
        ]
        if listen:
            assert listen(0.2) == []
    assert BatchOperation.objects.count() == 5
    RecordingDispatcher.calls.clear()


def test_enqueue_in_test_transaction_dispatches_on_commit_callbacks(
    recording_dispatcher, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        op = enqueue("test-echo")
        assert recording_dispatcher == []
    assert len(callbacks) == 1
    assert recording_dispatcher == [("default", [op.pk])]


def test_failing_dispatcher_never_fails_enqueue(django_capture_on_commit_callbacks, caplog):
    caplog.set_level(logging.WARNING, logger="batchframework")
    with (
        override_settings(BATCHFRAMEWORK={"DISPATCHER": EXPLODING_DISPATCHER}),
        django_capture_on_commit_callbacks(execute=True) as callbacks,
    ):
        op = enqueue("test-echo")
    assert len(callbacks) == 1
    assert fresh(op).status == BatchOperation.STATUS_UNPROCESSED  # left for the poller
    assert "event=dispatch_failed" in caplog.text and "broker down" in caplog.text


# --- Debounce, postpone, cancel -------------------------------------------------------------
def test_replace_true_updates_the_pending_operation():
    post = Post.objects.create(title="p")
    other = Post.objects.create(title="q")
    now = timezone.now()
    first = enqueue(
        "test-echo",
        context_object=post,
        input_data={"v": 1},
        delay=timedelta(minutes=10),
        replace=True,
    )
    second = enqueue(
        "test-echo",
        context_object=post,
        input_data={"v": 2},
        delay=timedelta(minutes=20),
        replace=True,
    )
    assert second.pk == first.pk
    pending = BatchOperation.objects.for_context_object(post).unprocessed()
    assert pending.count() == 1
    stored = pending.get()
    assert stored.input_data == {"v": 2}
    assert_close(stored.run_after, now + timedelta(minutes=20))
    # Another context object or operationtype is another operation.
    assert enqueue("test-echo", context_object=other, replace=True).pk != first.pk
    assert enqueue("test-noop", context_object=post, replace=True).pk != first.pk
    # Once the pending one has been claimed, replace=True creates a new pending one.
    assert run_due(now=now + timedelta(minutes=30), operationtype="test-echo")
    assert fresh(first).status == BatchOperation.STATUS_FINISHED
    third = enqueue("test-echo", context_object=post, input_data={"v": 3}, replace=True)
    assert third.pk != first.pk
    assert fresh(first).input_data == {"v": 2}
    echoes = BatchOperation.objects.for_context_object(post).filter(operationtype="test-echo")
    assert echoes.count() == 2


@pytest.mark.parametrize("put_back", ["retry", "release"])
def test_replace_true_leaves_an_attempt_put_back_alone_and_updates_only_the_newer_one(put_back):
    """While A runs, a change is stored as a new pending operation B. A then goes back to
    pending (its attempt failed and waits for a retry, or a stopping worker gave it back).
    Later changes update B only: updating both would make the same work run twice."""
    calls: list[tuple[int, Any]] = []

    def debounced(operation):
        calls.append((operation.pk, operation.input_data))
        if put_back == "retry" and len(calls) == 1:
            raise RuntimeError("transient")

    handler("test-debounced", max_attempts=2, retry_backoff=0)(debounced)
    try:
        post = Post.objects.create(title="p")
        a = enqueue("test-debounced", context_object=post, input_data={"v": 1}, replace=True)
        (claimed,) = claim_due(operationtypes=["test-debounced"])
        b = enqueue("test-debounced", context_object=post, input_data={"v": 2}, replace=True)
        assert b.pk != a.pk
        if put_back == "retry":
            assert run_claimed(claimed) is RunOutcome.RETRY_SCHEDULED
        else:
            release([claimed])
        c = enqueue("test-debounced", context_object=post, input_data={"v": 3}, replace=True)
        assert c.pk == b.pk
        pending = BatchOperation.objects.for_context_object(post).unprocessed().order_by("pk")
        assert list(pending.values_list("pk", "input_data")) == [(a.pk, {"v": 1}), (b.pk, {"v": 3})]
        run_due(now=timezone.now() + timedelta(seconds=5))
        ran = calls if put_back == "release" else calls[1:]
        assert sorted(ran) == [(a.pk, {"v": 1}), (b.pk, {"v": 3})]  # each once, either first
    finally:
        registry.unregister("test-debounced")


@pytest.mark.parametrize("flow", ["mark_as_running", "status_and_save", "finish"])
def test_replace_true_after_the_originals_manual_flow_enqueues_a_new_operation(flow):
    """The manual flow (the original's) frees the debounce key as a claim does."""
    post = Post.objects.create(title="p")
    first = enqueue("test-echo", context_object=post, replace=True)
    if flow == "mark_as_running":
        first.mark_as_running()
    elif flow == "status_and_save":
        first = BatchOperation.objects.get(pk=first.pk)
        first.status = BatchOperation.STATUS_RUNNING
        first.save()
    first.finish()
    again = enqueue("test-echo", context_object=post, replace=True)
    assert again.pk != first.pk
    assert enqueue("test-echo", context_object=post, replace=True).pk == again.pk


def test_postpone_moves_a_pending_operation():
    now = timezone.now()
    op = enqueue("test-echo", delay=timedelta(minutes=1))
    assert op.postpone(timedelta(hours=1)) is True
    assert_close(fresh(op).run_after, now + timedelta(hours=1))
    assert run_due(now=now + timedelta(minutes=2)) == []
    assert batchframework.postpone(op.pk, run_after=now + timedelta(minutes=5)) is True
    assert fresh(op).run_after == now + timedelta(minutes=5)
    with pytest.raises(InvalidOperationError):
        op.postpone(timedelta(seconds=-1))
    assert [o.pk for o in run_due(now=now + timedelta(minutes=6))] == [op.pk]
    assert op.postpone(timedelta(hours=1)) is False  # finished: nothing changes
    assert fresh(op).status == BatchOperation.STATUS_FINISHED


def test_cancel_outcomes():
    pending = enqueue("test-effect", delay=timedelta(minutes=5))
    outcome = pending.cancel()
    assert outcome is CancelOutcome.CANCELLED and bool(outcome) is True
    assert not BatchOperation.objects.filter(pk=pending.pk).exists()
    assert run_due(now=timezone.now() + timedelta(hours=1)) == []
    assert Execution.objects.count() == 0
    assert batchframework.cancel(pending.pk) is CancelOutcome.NOT_FOUND

    running = enqueue("test-echo")
    claimed = claim(running.pk)
    assert claimed is not None
    before = row_values(running)
    outcome = running.cancel()
    assert outcome is CancelOutcome.TOO_LATE_RUNNING and bool(outcome) is False
    assert row_values(running) == before

    assert run_claimed(claimed) is RunOutcome.SUCCEEDED
    before = row_values(running)
    assert batchframework.cancel(running) is CancelOutcome.TOO_LATE_FINISHED
    assert row_values(running) == before


def test_cancel_many_cancels_the_pending_and_leaves_the_others(
    received, django_capture_on_commit_callbacks
):
    first, second = enqueue_many("test-effect", [{}, {}], delay=60)
    running = enqueue("test-echo")
    claimed = claim(running.pk)
    assert claimed is not None
    finished = enqueue("test-echo")
    run(finished.pk)
    before = [row_values(running), row_values(finished)]
    with django_capture_on_commit_callbacks(execute=True):
        cancelled = batchframework.cancel_many(
            # An instance, its key again (as text, as a form posts it), a key, the others, and
            # a key that names nothing.
            [second, str(second.pk), first.pk, running, finished, 10**12]
        )
        assert received.get("cancelled") is None  # not before the cancels are final
    assert cancelled == [second.pk, first.pk]
    assert not BatchOperation.objects.filter(pk__in=[first.pk, second.pk]).exists()
    assert [row_values(running), row_values(finished)] == before
    assert sorted(e["operation_id"] for e in received["cancelled"]) == sorted(cancelled)
    assert batchframework.cancel_many([first, second]) == []
    assert run_due(now=timezone.now() + timedelta(hours=1)) == []
    assert Execution.objects.count() == 0


def test_cancel_many_costs_the_same_statements_for_any_number_in_a_chunk(monkeypatch):
    def statements(count: int) -> int:
        operations = enqueue_many("test-effect", [{}] * count, delay=60)
        with CaptureQueriesContext(connection) as queries:
            assert len(batchframework.cancel_many(operations)) == count
        return len(queries)

    assert statements(3) == statements(40)
    # A chunk per transaction: two chunks cost twice one's statements.
    from batchframework.engine import control

    monkeypatch.setattr(control, "CANCEL_CHUNK", 20)
    assert statements(40) == 2 * statements(20)


def test_cancel_many_in_a_transaction_that_rolls_back_cancels_nothing(
    received, django_capture_on_commit_callbacks
):
    operations = enqueue_many("test-noop", [{}, {}], delay=60)
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        assert len(batchframework.cancel_many(operations)) == 2
        raise RuntimeError("the caller's transaction fails")
    assert (
        BatchOperation.objects.unprocessed().filter(pk__in=[o.pk for o in operations]).count() == 2
    )
    assert received.get("cancelled") is None


def test_cancel_many_refuses_what_is_not_a_list_of_operations_and_cancels_nothing():
    pending = enqueue("test-noop", delay=60)
    for wrong in (pending, str(pending.pk), 5):
        with pytest.raises(TypeError):
            batchframework.cancel_many(wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected a number"):
        batchframework.cancel_many([pending, "not a key"])
    assert BatchOperation.objects.unprocessed().filter(pk=pending.pk).exists()


def test_deleting_a_pending_operation_is_as_safe_as_cancel():
    op = enqueue("test-effect")
    BatchOperation.objects.filter(pk=op.pk).delete()
    assert run(op.pk) is RunOutcome.NOT_CLAIMED
    assert run_due() == []
    assert Execution.objects.count() == 0


# --- Progress --------------------------------------------------------------------------------
def test_set_progress_is_durable_and_renews_the_lease():
    now = timezone.now()
    op = enqueue("test-sleep", run_after=now - timedelta(hours=1))
    # Claimed "30 minutes ago" with a 2 s lease: the lease has long expired.
    claimed = claim(op.pk, now=now - timedelta(minutes=30))
    assert claimed is not None
    assert fresh(op).lease_expires_at < now
    assert set_progress(claimed, 3, 10, "three of ten") is True
    stored = fresh(op)
    assert stored.progress_done == 3 and stored.progress_total == 10
    assert stored.progress_message == "three of ten"
    assert stored.progress == pytest.approx(0.3)
    assert stored.lease_expires_at > timezone.now() - timedelta(seconds=1)
    assert_close(stored.lease_expires_at, timezone.now() + timedelta(seconds=2))
    # The renewed lease is not recovered.
    assert recover_expired() == 0
    assert fresh(op).status == BatchOperation.STATUS_RUNNING
    # The model method does the same.
    claimed.set_progress(4)
    assert fresh(op).progress_done == 4 and fresh(op).progress_total == 10
    with pytest.raises(ValueError):
        set_progress(claimed, -1)
    with pytest.raises(ValueError, match="NUL"):  # PostgreSQL refuses it in text; all alike
        set_progress(claimed, 5, 10, "five\x00")
    assert (fresh(op).progress_done, fresh(op).progress_message) == (4, "three of ten")


def test_set_progress_refused_after_the_claim_was_lost():
    now = timezone.now()
    op = enqueue("test-sleep")
    stale = claim(op.pk)
    assert stale is not None
    assert recover_expired(now=now + timedelta(minutes=1)) == 1
    assert set_progress(stale, 1, 2) is False
    assert fresh(op).progress_done is None


# --- enqueue_many ----------------------------------------------------------------------------
def test_enqueue_many_stores_all_items():
    post = Post.objects.create(title="p")
    now = timezone.now()
    created = enqueue_many(
        "test-echo",
        [
            {"input_data": {"i": 0}},
            {"input_data": {"i": 1}, "context_object": post, "priority": 3},
            {"input_data": {"i": 2}, "delay": timedelta(minutes=5)},
        ],
        delay=timedelta(minutes=1),
    )
    assert len(created) == 3 and all(op.pk for op in created)
    stored = {op.input_data["i"]: op for op in BatchOperation.objects.all()}
    assert stored[1].context_object == post and stored[1].priority == 3
    assert_close(stored[0].run_after, now + timedelta(minutes=1))
    assert_close(stored[2].run_after, now + timedelta(minutes=5))
    assert all(op.status == BatchOperation.STATUS_UNPROCESSED for op in stored.values())
    assert enqueue_many("test-echo", []) == []


@pytest.mark.skipif(connection.vendor == "postgresql", reason="PostgreSQL has its own INSERT")
def test_enqueue_many_where_a_bulk_insert_returns_no_keys_still_returns_them(monkeypatch):
    """MySQL's bulk INSERT can't return the new primary keys (emulated here on SQLite or
    MariaDB): the operations returned must carry theirs all the same (messages name them)."""
    monkeypatch.setattr(type(connection.features), "can_return_rows_from_bulk_insert", False)
    no_dispatch = override_settings(BATCHFRAMEWORK={"DISPATCHER": NULL_DISPATCHER})
    with no_dispatch, CaptureQueriesContext(connection) as captured:
        created = enqueue_many("test-echo", [{"input_data": {"i": i}} for i in range(3)])
    inserts = [q for q in captured.captured_queries if q["sql"].upper().startswith("INSERT")]
    assert len(inserts) == 3  # one each
    assert [op.pk for op in created] == sorted(op.pk for op in created)
    assert all(op.pk for op in created) and not any(op._state.adding for op in created)
    stored = dict(BatchOperation.objects.values_list("pk", "input_data"))
    assert stored == {op.pk: {"i": i} for i, op in enumerate(created)}


def test_enqueue_many_returns_the_stored_operations_field_for_field():
    user = get_user_model().objects.create(username="bulk")
    post, thing = Post.objects.create(title="p"), UUIDThing.objects.create()
    inputs = [
        None,
        {"text": 'quote " backslash \\ and ünïcode ✓', "nested": [1, 2.5, None, True]},
        [],
        "plain",
        0,
        {"big": 2**53},
    ]
    items = [
        {"input_data": data, "priority": i - 2, "context_object": (None, post, thing)[i % 3]}
        for i, data in enumerate(inputs)
    ]
    items[4]["delay"] = timedelta(minutes=3)
    created = enqueue_many("test-echo", items, started_by=user, queue="other", batch_size=4)
    stored = {op.pk: op for op in BatchOperation.objects.all()}
    assert sorted(stored) == sorted(op.pk for op in created)
    for item, op in zip(items, created, strict=True):
        row = stored[op.pk]
        for field in BatchOperation._meta.concrete_fields:
            assert getattr(op, field.attname) == getattr(row, field.attname), field.name
        assert row.input_data == item["input_data"]
        assert row.context_object == item["context_object"]
        assert not op._state.adding and op._state.db == "default"
    with CaptureQueriesContext(connection) as captured:
        assert {op.started_by for op in created} == {user}  # kept, not fetched again
        types = {op.context_content_type for op in created if op.context_content_type_id}
        assert types == {ContentType.objects.get_for_model(m) for m in (post, thing)}
    assert captured.captured_queries == []
    assert {row.queue for row in stored.values()} == {"other"}


def test_enqueue_many_items_without_a_time_of_their_own_share_the_call_s():
    created = enqueue_many("test-noop", [{} for _ in range(30)], delay=timedelta(minutes=1))
    assert len({op.run_after for op in created}) == 1
    assert BatchOperation.objects.values("run_after").distinct().count() == 1
    # The call's own time is validated even when there are no items to use it.
    with pytest.raises(InvalidOperationError, match="delay"):
        enqueue_many("test-noop", [], delay=-1)


@pytest.mark.parametrize("key", ["run_after", "delay"])
def test_enqueue_many_items_whose_time_is_none_share_the_call_s(key):
    """``{"run_after": obj.scheduled_at}`` of an object without one: ``None`` means "not
    given", as for enqueue(). It made the item due at once, an hour early here."""
    created = enqueue_many("test-noop", [{key: None}, {}], delay=timedelta(hours=1))
    assert created[0].run_after == created[1].run_after
    assert BatchOperation.objects.due(now=timezone.now() + timedelta(minutes=59)).count() == 0


def test_enqueue_many_builds_its_instances_with_init_signals_when_someone_listens():
    built: list[BatchOperation] = []

    def record(sender, instance, **kwargs):
        built.append(instance)

    post_init.connect(record, sender=BatchOperation)
    try:
        created = enqueue_many("test-echo", [{"input_data": i} for i in range(3)])
    finally:
        post_init.disconnect(record, sender=BatchOperation)
    assert all(any(seen is op for seen in built) for op in created)
    assert [op.input_data for op in created] == [0, 1, 2]
    assert all(op.pk and not op._state.adding for op in created)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "10"])
def test_enqueue_many_refuses_a_bad_batch_size(batch_size):
    with pytest.raises(InvalidOperationError, match="batch_size"):
        enqueue_many("test-echo", [{}], batch_size=batch_size)
    assert BatchOperation.objects.count() == 0


def _expected_insert_statements(items: int, batch_size: int) -> int:
    fields = [f for f in BatchOperation._meta.concrete_fields if not f.primary_key]
    objs = [BatchOperation() for _ in range(items)]
    per_statement = min(batch_size, connection.ops.bulk_batch_size(fields, objs) or batch_size)
    return math.ceil(items / per_statement)


def test_enqueue_many_is_one_insert_per_chunk(django_assert_num_queries):
    items = [{"input_data": {"i": i}} for i in range(1000)]
    inserts = _expected_insert_statements(1000, 1000)
    if connection.vendor != "sqlite":
        assert inserts == 1
    # SAVEPOINT + INSERT(s) + RELEASE SAVEPOINT
    with django_assert_num_queries(inserts + 2) as captured:
        created = enqueue_many("test-noop", items, batch_size=1000)
    assert sum("INSERT" in q["sql"].upper() for q in captured.captured_queries) == inserts
    assert len(created) == 1000 and len({op.pk for op in created}) == 1000
    assert BatchOperation.objects.count() == 1000
    # Smaller chunks: one INSERT per chunk (3 chunks of at most 100, unless SQLite's variable
    # limit makes the chunks smaller still).
    with CaptureQueriesContext(connection) as captured:
        enqueue_many("test-noop", items[:250], batch_size=100)
    chunks = _expected_insert_statements(250, 100)
    assert chunks == 3 or connection.vendor == "sqlite"
    assert sum("INSERT" in q["sql"].upper() for q in captured.captured_queries) == chunks


@pytest.mark.parametrize(
    "bad_item",
    [
        {"input_data": {"x": object()}},
        {"delay": timedelta(seconds=-1)},
        {"priority": "high"},
        {"unknown_key": 1},
        {"context_object": Post(title="unsaved")},
    ],
)
def test_enqueue_many_validates_every_item_before_inserting(bad_item):
    items = [{"input_data": {"i": i}} for i in range(600)]
    items.insert(500, bad_item)
    with pytest.raises(InvalidOperationError) as excinfo:
        enqueue_many("test-echo", items, batch_size=100)
    assert "item 500" in str(excinfo.value)
    assert BatchOperation.objects.count() == 0


def test_enqueue_many_unknown_operationtype_writes_nothing():
    with pytest.raises(UnknownOperationTypeError):
        enqueue_many("no-such-type", [{}, {}])
    assert BatchOperation.objects.count() == 0


# --- Signals and logging ---------------------------------------------------------------------
@pytest.fixture
def received() -> Iterator[dict[str, list[dict]]]:
    events: dict[str, list[dict]] = {}
    receivers = {}
    for name, signal in {
        "enqueued": operations_enqueued,
        "started": operation_started,
        "finished": operation_finished,
        "retry": operation_retry_scheduled,
        "cancelled": operation_cancelled,
    }.items():

        def receiver(sender, _name=name, **kwargs):
            kwargs.pop("signal", None)
            events.setdefault(_name, []).append({"sender": sender, **kwargs})

        receivers[name] = (signal, receiver)
        signal.connect(receiver, weak=False)
    try:
        yield events
    finally:
        for signal, receiver in receivers.values():
            signal.disconnect(receiver)


def test_signals_are_sent(received, django_capture_on_commit_callbacks):
    op = enqueue("test-echo", input_data={"x": 1})
    assert [e["operations"] for e in received["enqueued"]] == [[op]]
    assert received["enqueued"][0]["sender"] is BatchOperation
    many = enqueue_many("test-noop", [{}, {}])
    assert received["enqueued"][1]["operations"] == many

    run_due(operationtype="test-echo")
    assert [e["operation"].pk for e in received["started"]] == [op.pk]
    assert [(e["operation"].pk, e["succeeded"], e["error"]) for e in received["finished"]] == [
        (op.pk, True, None)
    ]

    failing = enqueue("test-always-fails")
    run_due(now=timezone.now() + timedelta(minutes=1), operationtype="test-always-fails")
    assert [e["attempt"] for e in received["retry"]] == [1, 2]
    assert all(e["operation"].pk == failing.pk for e in received["retry"])
    assert received["retry"][0]["error"]["type"] == "builtins.ValueError"
    last = received["finished"][-1]
    assert last["operation"].pk == failing.pk and last["succeeded"] is False
    assert last["error"]["message"] == f"boom {failing.pk}"

    pending = enqueue("test-noop", delay=60)
    with django_capture_on_commit_callbacks(execute=True):
        pending.cancel()
        assert received.get("cancelled") is None  # not before the cancel is final
    assert [e["operation_id"] for e in received["cancelled"]] == [pending.pk]


@pytest.mark.parametrize("operationtype", ["test-noop", "test-atomic", "test-always-fails"])
def test_receivers_and_run_due_see_the_times_the_database_recorded(operationtype):
    """``finished_datetime`` read ``None`` on the instance receivers get and ``run_due``
    returns, though the operation was finished: a receiver computing a duration failed. A
    retry's instance kept its old ``run_after``."""
    seen: list[tuple[str, Any, Any]] = []

    def finished(sender, operation, **kwargs):
        seen.append(("finished", operation.finished_datetime, None))

    def retried(sender, operation, **kwargs):
        seen.append(("retry", operation.run_after, operation.status))

    operation_finished.connect(finished)
    operation_retry_scheduled.connect(retried)
    try:
        ops = [enqueue(operationtype) for _ in range(2)]  # two: a batch records them together
        ran = run_due(now=timezone.now() + timedelta(seconds=1), operationtype=operationtype)
    finally:
        operation_finished.disconnect(finished)
        operation_retry_scheduled.disconnect(retried)
    last_runs = {op.pk: op for op in ran}  # (one per attempt)
    assert sorted(last_runs) == sorted(op.pk for op in ops)
    for op in ops:
        assert_close(last_runs[op.pk].finished_datetime, fresh(op).finished_datetime)
    finishes = [when for kind, when, _ in seen if kind == "finished"]
    assert len(finishes) == 2 and all(when is not None for when in finishes)
    retries = [(when, status) for kind, when, status in seen if kind == "retry"]
    if operationtype == "test-always-fails":  # retry_backoff=0: due again at once
        assert len(retries) == 4 and all(status == "unprocessed" for _, status in retries)
        assert all(abs(when - timezone.now()) < timedelta(seconds=5) for when, _ in retries)


def test_a_cancel_that_rolls_back_sends_no_signal(received, django_capture_on_commit_callbacks):
    """A receiver keeping a record of cancellations must not record one a rollback undid:
    the operation is still there, and will run."""
    pending = enqueue("test-noop", delay=60)
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        assert pending.cancel()
        raise RuntimeError("the caller's transaction fails")
    assert BatchOperation.objects.unprocessed().filter(pk=pending.pk).exists()
    assert received.get("cancelled") is None


def test_logging_in_key_value_form(caplog, django_capture_on_commit_callbacks):
    caplog.set_level(logging.DEBUG, logger="batchframework")
    with django_capture_on_commit_callbacks(execute=True):  # logged once committed
        op = enqueue("test-echo")
    assert f"event=enqueued id={op.pk} operationtype=test-echo queue=default" in caplog.text
    run_due(operationtype="test-echo")
    assert f"event=started id={op.pk} operationtype=test-echo attempt=1" in caplog.text
    assert f"event=finished id={op.pk} operationtype=test-echo result=successful" in caplog.text

    caplog.clear()
    failing = enqueue("test-always-fails")
    run_due(now=timezone.now() + timedelta(minutes=1), operationtype="test-always-fails")
    retries = [r for r in caplog.records if "event=retry_scheduled" in r.getMessage()]
    assert len(retries) == 2 and retries[0].levelno == logging.WARNING
    assert f"id={failing.pk}" in retries[0].getMessage()
    assert "error_type=builtins.ValueError" in retries[0].getMessage()
    assert "Traceback (most recent call last)" in retries[0].getMessage()
    failures = [r for r in caplog.records if "result=failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    message = failures[0].getMessage()
    assert f"event=finished id={failing.pk} operationtype=test-always-fails result=failed" in (
        message
    )
    assert "Traceback (most recent call last)" in message
    assert f"ValueError: boom {failing.pk}" in message

    # One line each, the traceback (and the error message at its end) escaped into it.
    assert all("\n" not in record.getMessage() for record in caplog.records)

    caplog.clear()
    claim(failing.pk)
    assert f"event=claim_skipped id={failing.pk} reason=already_finished" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_an_enqueue_is_logged_once_committed_and_a_rolled_back_one_not_at_all(caplog):
    caplog.set_level(logging.INFO, logger="batchframework")
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        enqueue("test-echo")
        assert "event=enqueued" not in caplog.text  # not yet: it may be rolled back
        1 / 0  # noqa: B018
    with transaction.atomic():
        enqueue_many("test-echo", [{}] * 2)
        with pytest.raises(ZeroDivisionError), transaction.atomic():  # a savepoint
            enqueue("test-echo")
            1 / 0  # noqa: B018
    assert BatchOperation.objects.count() == 2
    assert "event=enqueued_many count=2" in caplog.text
    assert "event=enqueued " not in caplog.text
    committed = enqueue("test-echo")  # autocommit: logged at once
    assert f"event=enqueued id={committed.pk} " in caplog.text


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("x\nevent=finished id=7", '"x\\nevent=finished id=7"'),
        ("a\rb\tc", '"a\\rb\\tc"'),
        ("\x1b[31mred", '"\\x1b[31mred"'),
        ("line\u2028break", '"line\\u2028break"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("C:\\dir", '"C:\\\\dir"'),
        ("plain", "plain"),
        ("", '""'),
    ],
)
def test_a_logged_value_can_never_start_a_line_of_its_own(value, written):
    """A hostile message's queue name, say, must not forge another event's line."""
    line = kv(event="message_noop", queue=value)
    assert line == f"event=message_noop queue={written}"
    assert len(line.splitlines()) == 1


# --- Running ---------------------------------------------------------------------------------
def test_handler_return_value_becomes_output_data():
    op = enqueue("test-echo", input_data={"nested": {"list": [1, 2.5, None, "x"]}})
    assert run(op.pk) is RunOutcome.SUCCEEDED
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_FINISHED
    assert stored.result == BatchOperation.RESULT_SUCCESSFUL
    assert stored.output_data == {"echo": {"nested": {"list": [1, 2.5, None, "x"]}}}
    assert stored.attempts == 1
    assert stored.finished_datetime is not None and stored.started_running_datetime is not None
    assert stored.lease_expires_at is None
    assert stored.error is None
    assert run(op.pk) is RunOutcome.NOT_CLAIMED  # finished: never again


def test_exception_is_recorded_with_type_message_and_traceback():
    op = enqueue("test-always-fails")
    ran = run_due(now=timezone.now() + timedelta(minutes=1))
    assert [o.pk for o in ran] == [op.pk] * 3
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_FINISHED
    assert stored.result == BatchOperation.RESULT_FAILED
    assert stored.attempts == 3
    error = stored.output_data["error"]
    assert error["type"] == "builtins.ValueError"
    assert error["message"] == f"boom {op.pk}"
    assert "Traceback (most recent call last)" in error["traceback"]
    assert "always_fails" in error["traceback"]
    assert stored.error == error
    assert "Traceback" in stored.last_error and f"ValueError: boom {op.pk}" in stored.last_error
    assert Execution.objects.filter(key=str(op.pk)).count() == 3


def test_non_json_handler_output_fails_the_attempt():
    op = enqueue("test-bad-output")
    assert run(op.pk) is RunOutcome.FAILED
    stored = fresh(op)
    assert stored.result == BatchOperation.RESULT_FAILED
    assert stored.output_data["error"]["type"] == "batchframework.exceptions.HandlerOutputError"
    assert "JSON" in stored.output_data["error"]["message"]


def test_output_nested_too_deep_fails_its_own_attempt_only(registered):
    """MariaDB refused such output when the batch recorded its successes: every operation of
    the batch stayed running, and ran again after recovery."""

    @registered("test-deep-output")
    def deep_output(operation):
        depth = operation.input_data["depth"]
        return json.loads("[" * depth + "]" * depth)

    ops = enqueue_many(
        "test-deep-output", [{"input_data": {"depth": depth}} for depth in (31, 32, 3)]
    )
    assert sorted(o.pk for o in run_due(operationtype="test-deep-output")) == [o.pk for o in ops]
    stored = [fresh(op) for op in ops]
    assert [op.result for op in stored] == ["successful", "failed", "successful"]
    assert stored[1].output_data["error"]["type"] == (
        "batchframework.exceptions.HandlerOutputError"
    )
    assert "31 levels" in stored[1].output_data["error"]["message"]
    assert stored[0].output_data == json.loads("[" * 31 + "]" * 31)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "plain"])
def test_a_handler_that_deletes_its_own_operation_keeps_its_work(registered, received, atomic):
    """Deleting the context object cascades to its operations through a GenericRelation, this
    one included. An atomic handler's finish then found no row, took it for a lost claim and
    rolled the handler's work back: the operation ran again until failed as a lost worker's."""

    @registered("test-delete-archive", atomic=atomic, max_attempts=1)
    def delete_archive(operation):
        operation.context_object.delete()
        Effect.objects.create(key=f"deleted {operation.pk}")
        return {"deleted": True}

    archive = Archive.objects.create(title="old")
    op = enqueue("test-delete-archive", context_object=archive)
    [ran] = run_due(operationtype="test-delete-archive")
    assert not Archive.objects.exists()
    assert not BatchOperation.objects.filter(pk=op.pk).exists()
    assert Effect.objects.filter(key=f"deleted {op.pk}").count() == 1
    if atomic:
        assert (ran.pk, ran.result) == (op.pk, BatchOperation.RESULT_SUCCESSFUL)
        assert [e["succeeded"] for e in received["finished"]] == [True]
    # A plain handler's work committed as it went; its finish finds no row, and is reported
    # as a lost claim (the row was not locked: who deleted it can't be told).


def test_retry_with_backoff():
    op = enqueue("test-fails-once")
    start = timezone.now()
    assert [o.pk for o in run_due()] == [op.pk]
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_UNPROCESSED
    assert stored.attempts == 1
    assert_close(stored.run_after, start + timedelta(seconds=60))
    assert stored.run_after > timezone.now() + timedelta(seconds=50)
    assert "first attempt fails" in stored.last_error
    assert run_due() == []  # never early
    assert run_due(now=timezone.now() + timedelta(seconds=30)) == []
    ran = run_due(now=timezone.now() + timedelta(seconds=61))
    assert [o.pk for o in ran] == [op.pk]
    stored = fresh(op)
    assert stored.result == BatchOperation.RESULT_SUCCESSFUL
    assert stored.attempts == 2
    assert stored.output_data == {"attempt": 2}
    assert Execution.objects.filter(key=str(op.pk)).count() == 2


def test_unregistered_operationtype_is_never_claimed_and_manual_flow_works():
    op = BatchOperation.objects.create_asynchronous(
        operationtype="manual-only", input_data={"a": 1}
    )
    now = timezone.now() + timedelta(days=1)
    assert claim(op.pk) is None
    assert run(op.pk) is RunOutcome.NOT_CLAIMED
    assert claim_due(now=now) == []
    assert run_due(now=now) == []
    assert fresh(op).status == BatchOperation.STATUS_UNPROCESSED and fresh(op).attempts == 0
    op.mark_as_running()
    assert recover_expired(now=now) == 0
    assert fresh(op).status == BatchOperation.STATUS_RUNNING
    op.finish(output_data={"done": True})
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_FINISHED
    assert stored.result == BatchOperation.RESULT_SUCCESSFUL
    assert stored.output_data == {"done": True}


def test_always_synchronous_runs_due_operations_at_commit(django_capture_on_commit_callbacks):
    with override_settings(BATCHFRAMEWORK={"ALWAYS_SYNCHRONOUS": True}):
        with django_capture_on_commit_callbacks(execute=True):
            due = enqueue("test-echo", input_data={"x": 1})
            delayed = enqueue("test-effect", delay=timedelta(minutes=15))
            assert fresh(due).status == BatchOperation.STATUS_UNPROCESSED  # not before commit
        stored = fresh(due)
        assert stored.status == BatchOperation.STATUS_FINISHED
        assert stored.output_data == {"echo": {"x": 1}}
        assert stored.attempts == 1
        assert fresh(delayed).status == BatchOperation.STATUS_UNPROCESSED  # never early
        assert Effect.objects.count() == 0
        ran = run_due(now=timezone.now() + timedelta(minutes=16))
        assert [o.pk for o in ran] == [delayed.pk]
    assert Effect.objects.count() == 1


def test_always_synchronous_judges_due_by_the_database_clock(
    monkeypatch, django_capture_on_commit_callbacks
):
    """A process clock 10 s fast must not make an operation delayed by 5 s run at once."""
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=10))
    forget_clock_offsets()
    try:
        with (
            override_settings(BATCHFRAMEWORK={"ALWAYS_SYNCHRONOUS": True}),
            django_capture_on_commit_callbacks(execute=True) as callbacks,
        ):
            delayed = enqueue("test-echo", delay=timedelta(seconds=5))
            due = enqueue("test-echo")
        assert len(callbacks) == 2
    finally:
        forget_clock_offsets()
    assert fresh(delayed).status == BatchOperation.STATUS_UNPROCESSED
    stored = fresh(due)
    assert stored.status == BatchOperation.STATUS_FINISHED
    assert_close(stored.started_running_datetime, real_now())


@pytest.mark.django_db(transaction=True)
def test_always_synchronous_rollback_runs_nothing():
    with override_settings(BATCHFRAMEWORK={"ALWAYS_SYNCHRONOUS": True}):
        with pytest.raises(RuntimeError), transaction.atomic():
            enqueue("test-effect")
            raise RuntimeError("roll back")
        assert Execution.objects.count() == 0
        assert BatchOperation.objects.count() == 0
        with transaction.atomic():
            op = enqueue("test-effect")
            assert Execution.objects.count() == 0
        assert Execution.objects.count() == 1
        assert fresh(op).result == BatchOperation.RESULT_SUCCESSFUL


@pytest.mark.django_db(transaction=True)
def test_always_synchronous_leaves_a_due_retry_to_run_due():
    """A retry due at once is not run inside its failed attempt's finish (a handler that keeps
    failing would nest its attempts); run_due() or a worker runs it."""
    with override_settings(BATCHFRAMEWORK={"ALWAYS_SYNCHRONOUS": True}):
        op = enqueue("test-always-fails")  # max_attempts=3, retry_backoff=0
        stored = fresh(op)
        assert (stored.status, stored.attempts) == (BatchOperation.STATUS_UNPROCESSED, 1)
        assert Execution.objects.count() == 1
        assert [o.pk for o in run_due()] == [op.pk]
        assert (fresh(op).attempts, Execution.objects.count()) == (2, 2)


def test_run_due_time_travel():
    op = enqueue("test-echo", input_data={"n": 1}, delay=timedelta(minutes=15))
    assert run_due() == []
    assert run_due(now=timezone.now() + timedelta(minutes=14)) == []
    assert fresh(op).status == BatchOperation.STATUS_UNPROCESSED
    ran = run_due(now=timezone.now() + timedelta(minutes=16))
    assert [o.pk for o in ran] == [op.pk]
    assert ran[0].status == BatchOperation.STATUS_FINISHED
    assert fresh(op).output_data == {"echo": {"n": 1}}
    with pytest.raises(ValueError):
        run_due(now=timezone.now().replace(tzinfo=None))


@pytest.fixture
def clashing_handler() -> Iterator[str]:
    """A handler that writes an Execution row, then an Effect whose key already exists (an
    IntegrityError); with ``input_data["catch"]``, it catches that error and returns."""

    @handler("test-clashes")
    def clashes(operation):
        Execution.objects.create(key=str(operation.pk))
        try:
            Effect.objects.create(key="taken")
        except IntegrityError:
            if not (operation.input_data or {}).get("catch"):
                raise
        return None

    Effect.objects.create(key="taken")
    yield "test-clashes"
    registry.unregister("test-clashes")


def test_run_due_records_a_handlers_database_error_inside_the_tests_transaction(
    clashing_handler,
):
    """The handler's failed statement broke the test's transaction: recording the failure
    raised TransactionManagementError into the test, though the docs promise a failing
    handler is recorded on its row. Its statements since the start are rolled back."""
    op = enqueue(clashing_handler)
    [ran] = run_due()
    assert (ran.status, ran.result) == ("finished", "failed")
    assert fresh(op).error["type"].endswith("IntegrityError")
    assert not Execution.objects.filter(key=str(op.pk)).exists()  # the transaction works


def test_a_handler_that_caught_a_database_error_is_failed_not_recorded_successful(
    clashing_handler,
):
    op = enqueue(clashing_handler, input_data={"catch": True})
    [ran] = run_due()
    assert (ran.status, ran.result) == ("finished", "failed")
    assert fresh(op).error["type"] == "batchframework.exceptions.HandlerRolledBackError"


def test_always_synchronous_records_a_handlers_database_error_in_the_callers_transaction(
    clashing_handler, django_capture_on_commit_callbacks
):
    """Eager mode ran into the same wall: the dispatch failed (logged), the operation stayed
    running, and the test's transaction was unusable."""
    with (
        override_settings(BATCHFRAMEWORK={"ALWAYS_SYNCHRONOUS": True}),
        django_capture_on_commit_callbacks(execute=True),
    ):
        op = enqueue(clashing_handler)
    assert (fresh(op).status, fresh(op).result) == ("finished", "failed")


def test_a_failing_handlers_other_writes_stay_in_the_tests_transaction_as_in_a_worker():
    """Only a handler that broke the transaction loses its writes: one that raised anything
    else keeps them, as it does in a worker (autocommit), so tests count what production
    would."""
    op = enqueue("test-always-fails")
    run_due(now=timezone.now() + timedelta(minutes=1), operationtype="test-always-fails")
    assert fresh(op).result == "failed"
    assert Execution.objects.filter(key=str(op.pk)).count() == 3  # one per attempt


def test_run_due_filters_by_operationtype_and_orders_by_priority():
    low = enqueue("test-noop", priority=-1)
    high = enqueue("test-noop", priority=10)
    echo = enqueue("test-echo")
    ran = run_due(operationtype="test-noop")
    assert [o.pk for o in ran] == [high.pk, low.pk]
    assert fresh(echo).status == BatchOperation.STATUS_UNPROCESSED
    assert [o.pk for o in run_due(operationtype=["test-echo"])] == [echo.pk]


def test_atomic_handler_rolls_back_its_writes_on_failure():
    op = enqueue("test-atomic", input_data={"crash_on_attempt": 1})
    assert run(op.pk) is RunOutcome.RETRY_SCHEDULED
    assert Effect.objects.count() == 0  # the failed attempt's write was rolled back
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_UNPROCESSED and stored.attempts == 1
    assert "simulated crash" in stored.last_error
    ran = run_due(now=timezone.now() + timedelta(seconds=1))
    assert [o.pk for o in ran] == [op.pk]
    assert list(Effect.objects.values_list("key", flat=True)) == [f"atomic-{op.pk}"]
    stored = fresh(op)
    assert stored.result == BatchOperation.RESULT_SUCCESSFUL
    assert stored.output_data == {"attempt": 2}


@pytest.mark.parametrize("own_savepoint", [False, True], ids=["swallowed", "own-savepoint"])
def test_an_atomic_handler_that_swallowed_a_database_error_did_not_succeed(own_savepoint):
    """Catching an IntegrityError inside the handler's transaction marks it for rollback: its
    writes are undone whatever it returns, so the attempt must not be recorded as a success.
    With the failing statement in an atomic() of its own (Django's advice), it succeeds."""
    Effect.objects.create(key="taken")

    def records_once(operation):
        Effect.objects.create(key=f"work-{operation.pk}")
        try:
            if own_savepoint:
                with transaction.atomic():
                    Effect.objects.create(key="taken")
            else:
                Effect.objects.create(key="taken")
        except IntegrityError:
            pass  # "already recorded, fine"
        return {"done": True}

    handler("test-atomic-swallows", atomic=True)(records_once)
    try:
        op = enqueue("test-atomic-swallows")
        outcome = run(op.pk)
    finally:
        registry.unregister("test-atomic-swallows")
    stored = fresh(op)
    work = Effect.objects.filter(key=f"work-{op.pk}").exists()
    if own_savepoint:
        assert outcome is RunOutcome.SUCCEEDED and work
        assert stored.result == BatchOperation.RESULT_SUCCESSFUL
    else:
        assert outcome is RunOutcome.FAILED and not work
        assert stored.result == BatchOperation.RESULT_FAILED
        assert "HandlerRolledBackError" in stored.last_error
        assert "marked for rollback" in stored.last_error


@pytest.mark.django_db(transaction=True)
def test_an_atomic_handler_whose_writes_break_a_constraint_checked_at_commit_fails():
    """PostgreSQL and SQLite check Django's foreign keys when the transaction commits. The
    finish was written and ``operation_finished`` announced a success; then the commit refused
    the handler's writes, and with them the finish: the operation stayed running, to be run
    again by recovery (and announced again) until it was failed as a lost worker's."""
    finished: list[bool] = []

    def record(sender, operation, succeeded, **kwargs):
        finished.append(succeeded)

    def dangling_player(operation):
        Player.objects.create(game_id=987_654, name="no such game")
        return {"done": True}

    handler("test-atomic-deferred-fk", atomic=True)(dangling_player)
    operation_finished.connect(record)
    try:
        op = enqueue("test-atomic-deferred-fk")
        outcome = run(op.pk)
    finally:
        operation_finished.disconnect(record)
        registry.unregister("test-atomic-deferred-fk")
    stored = fresh(op)
    assert outcome is RunOutcome.FAILED
    assert (stored.status, stored.result) == (
        BatchOperation.STATUS_FINISHED,
        BatchOperation.RESULT_FAILED,
    )
    assert stored.error["type"].endswith("IntegrityError")
    assert finished == [False]
    assert not Player.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_atomic_handler_whose_on_commit_callback_fails_still_succeeded():
    """A callback the handler registered runs once the run has committed; its error was taken
    for the commit's: the success went unannounced and was reported as a lost claim."""
    finished: list[bool] = []

    def record(sender, operation, succeeded, **kwargs):
        finished.append(succeeded)

    def callback_fails(operation):
        Effect.objects.create(key="taken")
        transaction.on_commit(lambda: Effect.objects.create(key="taken"))
        return {"done": True}

    handler("test-atomic-callback-fails", atomic=True)(callback_fails)
    operation_finished.connect(record)
    try:
        op = enqueue("test-atomic-callback-fails")
        with pytest.raises(IntegrityError):
            run(op.pk)
    finally:
        operation_finished.disconnect(record)
        registry.unregister("test-atomic-callback-fails")
    stored = fresh(op)
    assert (stored.status, stored.result) == (
        BatchOperation.STATUS_FINISHED,
        BatchOperation.RESULT_SUCCESSFUL,
    )
    assert finished == [True]


# --- Query counts (invariant 9) --------------------------------------------------------------
def test_enqueue_is_one_insert(django_assert_num_queries):
    post = Post.objects.create(title="p")
    # Warm the per-process caches (ContentType, and any clock reading used for delays).
    enqueue("test-echo", context_object=post, delay=timedelta(seconds=1))
    with django_assert_num_queries(1) as captured:
        enqueue("test-echo", input_data={"a": 1})
    assert captured.captured_queries[0]["sql"].upper().startswith("INSERT")
    with django_assert_num_queries(1):
        enqueue("test-echo", context_object=post, delay=timedelta(minutes=1), priority=2)
    # Announcing it (PostgreSQL NOTIFY) is part of the same statement.
    announcing = override_settings(BATCHFRAMEWORK={"DISPATCHER": ANNOUNCING_DISPATCHER})
    with announcing, django_assert_num_queries(1):
        enqueue("test-echo", input_data={"a": 1})


def test_claim_and_finish_are_constant(django_assert_num_queries):
    op = enqueue("test-noop")
    # The locking read and the compare-and-set UPDATE, in a transaction: a savepoint here,
    # in the test's transaction (SAVEPOINT … RELEASE SAVEPOINT are counted; BEGIN and COMMIT
    # outside one are not).
    with django_assert_num_queries(4):
        claimed = claim(op.pk)
    assert claimed is not None
    # The fenced UPDATE; in a caller's transaction (here, the test's) the handler runs in a
    # savepoint that a database error in it can't break (SAVEPOINT, RELEASE): two more.
    with django_assert_num_queries(1 + 2):
        assert run_claimed(claimed) is RunOutcome.SUCCEEDED
    with django_assert_num_queries(3):  # a claim that finds nothing to do stops after the read
        assert claim(op.pk) is None

    failing = enqueue("test-always-fails")
    claimed = claim(failing.pk)
    with django_assert_num_queries(2 + 2):  # the handler's INSERT + the fenced retry UPDATE
        assert run_claimed(claimed) is RunOutcome.RETRY_SCHEDULED


@pytest.mark.parametrize("size", [10, 100])
def test_claim_due_is_constant_per_batch(size, django_assert_num_queries):
    enqueue_many("test-noop", [{} for _ in range(size)])
    # PostgreSQL: one WITH … FOR UPDATE SKIP LOCKED … UPDATE … RETURNING statement. Elsewhere:
    # SAVEPOINT, SELECT (… FOR UPDATE SKIP LOCKED where supported), UPDATE, RELEASE SAVEPOINT.
    with django_assert_num_queries(1 if connection.vendor == "postgresql" else 4):
        claimed = claim_due(limit=size)
    assert len(claimed) == size
    assert all(op.status == BatchOperation.STATUS_RUNNING for op in claimed)
    assert BatchOperation.objects.running().count() == size
    assert len({op.claimed_by for op in claimed}) == 1
    with django_assert_num_queries(4):  # recovering the whole batch is constant too
        assert recover_expired(now=timezone.now() + timedelta(minutes=10)) == size


@pytest.mark.skipif(connection.vendor != "postgresql", reason="reads a PostgreSQL plan")
def test_claim_reads_only_its_batch_when_thousands_share_a_due_time():
    """The ready index orders completely (priority, due time, id): a claim of 50 among 3,000
    operations with one run_after must not sort them all (that made each claim O(n))."""
    enqueue_many("test-noop", [{} for _ in range(3000)], run_after=timezone.now())
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE batchframework_batchoperation")
    with CaptureQueriesContext(connection) as captured:
        assert len(claim_due(limit=50)) == 50
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + captured.captured_queries[-1]["sql"])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Index Scan using batchop_ready_idx" in plan, plan
    assert "Incremental Sort" not in plan, plan


@pytest.mark.parametrize("argument", ["queues", "operationtypes"])
def test_claim_due_refuses_a_bare_string_for_a_list_of_names(argument):
    """``"test-echo"`` is a sequence of one-letter names, which would claim nothing."""
    op = enqueue("test-echo")
    name = {"queues": op.queue, "operationtypes": "test-echo"}[argument]
    with pytest.raises(InvalidOperationError, match="list of names"):
        claim_due(**{argument: name})
    assert [claimed.pk for claimed in claim_due(**{argument: [name]})] == [op.pk]


def test_claim_due_takes_only_what_is_due_in_priority_order():
    now = timezone.now()
    later = enqueue("test-noop", delay=timedelta(minutes=5))
    first = enqueue("test-noop", priority=1)
    second = enqueue("test-noop")
    other = enqueue("test-other-queue")
    claimed = claim_due(queues=["default"])
    assert [o.pk for o in claimed] == [first.pk, second.pk]
    assert claim_due(queues=["default"]) == []
    assert [o.pk for o in claim_due(queues=["other"])] == [other.pk]
    assert [o.pk for o in claim_due(now=now + timedelta(minutes=6))] == [later.pk]


def test_claim_due_returns_the_claimed_rows_field_for_field():
    user = get_user_model().objects.create(username="claimer")
    post = Post.objects.create(title="p")
    stored = [
        enqueue("test-echo", input_data={"text": "ünïcode ✓", "n": [1, 2.5, None]}),
        enqueue("test-echo", context_object=post, started_by=user, priority=2),
        enqueue("test-echo", input_data="plain"),
    ]
    claimed = claim_due(ids=[op.pk for op in stored])
    assert [op.pk for op in claimed] == [stored[1].pk, stored[0].pk, stored[2].pk]
    # PostgreSQL returns the claimed rows; elsewhere the claim's times are set locally too.
    # The lease's deadline is kept on the worker's clock everywhere (the worker judges it).
    local_times = (
        {"lease_expires_at"}
        if connection.vendor == "postgresql"
        else {"started_running_datetime", "lease_expires_at"}
    )
    for op in claimed:
        row = fresh(op)
        for field in BatchOperation._meta.concrete_fields:
            if field.attname in local_times:
                assert_close(getattr(op, field.attname), getattr(row, field.attname))
            else:
                assert getattr(op, field.attname) == getattr(row, field.attname), field.name
        assert not op._state.adding and op._state.db == "default"
    assert claimed[0].context_object == post and claimed[0].started_by == user
    assert claimed[1].input_data == {"text": "ünïcode ✓", "n": [1, 2.5, None]}
    assert all(op.status == BatchOperation.STATUS_RUNNING for op in claimed)


# --- Lease recovery and fencing (invariants 2 and 7) -----------------------------------------
def test_recover_expired_retries_when_attempts_are_left():
    op = enqueue("test-always-fails")  # max_attempts=3, default 5-minute lease
    assert claim(op.pk) is not None
    assert recover_expired(now=timezone.now() + timedelta(minutes=1)) == 0  # lease still valid
    assert fresh(op).status == BatchOperation.STATUS_RUNNING
    future = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=future) == 1
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_UNPROCESSED
    assert stored.attempts == 1
    # Marked to be claimed alone: if it was what killed its worker, the next death is its own.
    assert stored.claimed_by == "!isolated" and stored.lease_expires_at is None
    assert "worker running this operation was lost" in stored.last_error
    assert recover_expired(now=future) == 0


def test_recovery_of_a_batch_does_not_count_the_attempt_and_isolates_each_operation():
    ops = [enqueue("test-always-fails") for _ in range(3)]  # max_attempts=3
    claimed = claim_due(limit=10)
    assert sorted(op.pk for op in claimed) == sorted(op.pk for op in ops)
    assert all(op.attempts == 1 for op in claimed)
    future = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=future) == 3
    for op in ops:
        stored = fresh(op)
        assert stored.status == BatchOperation.STATUS_UNPROCESSED
        assert stored.attempts == 0  # the worker may have died running another one
        assert stored.claimed_by == "!isolated"
    # From now on each is claimed alone, however large the batch asked for.
    first = claim_due(limit=10, now=future)
    assert len(first) == 1 and first[0].attempts == 1
    assert not first[0].claimed_by.endswith("/batch")


def test_claims_needed_are_enough_to_take_every_due_operation():
    """What the poller sends drains by: operations to be claimed alone cut batches short."""
    ops = [enqueue("test-noop", priority=-index) for index in range(9)]  # claimed in this order
    isolated = [ops[2].pk, ops[5].pk]  # as recovery of a dead worker's batch marks them
    BatchOperation.objects.filter(pk__in=isolated).update(claimed_by="!isolated")
    due, claims = claims_needed(operationtypes=["test-noop"], batch_size=3)["default"]
    assert due == 9
    taken = [claim_due(operationtypes=["test-noop"], limit=3) for _ in range(claims)]
    assert sorted(op.pk for batch in taken for op in batch) == [op.pk for op in ops]
    assert [len(batch) for batch in taken[:5]] == [2, 1, 2, 1, 3]


def test_a_stale_claim_can_neither_release_nor_renew_its_successors_claim():
    """A worker whose batch was recovered (it looked dead) and claimed again by another must
    not, when it wakes, give the operations back or keep their leases alive: both belong to
    the new claim now (invariant 2)."""
    ops = [enqueue("test-noop") for _ in range(2)]
    stale = claim_due(limit=2)
    future = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=future) == 2
    current = [claim(op.pk, now=future) for op in ops]
    assert all(op is not None for op in current)
    before = [row_values(op) for op in ops]

    assert renew_leases(stale) == []
    assert release(stale) == 0
    assert [row_values(op) for op in ops] == before  # still running under the new claim
    assert [op.pk for op in renew_leases(current)] == [op.pk for op in ops]


def test_renewing_a_batchs_leases_keeps_its_claim_order():
    """Renewals are grouped by lease; the held operations came back group by group, and the
    batch then ran them out of priority order."""
    for priority, operationtype in ((30, "test-noop"), (20, "test-sleep"), (10, "test-noop")):
        enqueue(
            operationtype, priority=priority, input_data=0 if "sleep" in operationtype else None
        )
    batch = claim_due(limit=3)
    assert [op.priority for op in batch] == [30, 20, 10]
    assert [op.priority for op in renew_leases(batch)] == [30, 20, 10]


def test_recovery_without_the_handler_puts_the_operation_back_instead_of_failing_it():
    """A process without the handler (an older release during a rolling deploy) failed the
    operation after one attempt of the three its handler allows. It can't judge the attempts,
    and a claim does not: the attempt goes uncounted, as for an operation held in a batch
    (counted, an operation of one attempt ran a second)."""

    def patient(operation):
        return None

    handler("test-api-patient", max_attempts=3)(patient)
    try:
        op = enqueue("test-api-patient")
        assert claim(op.pk) is not None
        later = timezone.now() + timedelta(minutes=10)
        registry.unregister("test-api-patient")
        assert recover_expired(now=later) == 1
        row = fresh(op)
        assert (row.status, row.attempts, row.claimed_by) == ("unprocessed", 0, "!isolated")
        assert "no handler where it was recovered" in row.last_error
        handler("test-api-patient", max_attempts=3)(patient)
        assert [ran.pk for ran in run_due(now=later)] == [op.pk]
        assert fresh(op).result == BatchOperation.RESULT_SUCCESSFUL
    finally:
        registry.unregister("test-api-patient")


def test_recovery_without_handlers_never_holds_up_the_recovery_of_others():
    """Skipped rather than put back, operations without a handler here took every place in
    recovery's limit, and no other lost operation was recovered."""
    gone = [enqueue("test-noop") for _ in range(3)]
    assert all(claim(op.pk) is not None for op in gone)
    # A handler since removed (or not deployed here); their leases expire first.
    BatchOperation.objects.filter(pk__in=[op.pk for op in gone]).update(operationtype="gone")
    other = enqueue("test-noop")
    time.sleep(0.01)
    assert claim(other.pk) is not None
    later = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=later, limit=3) == 3
    assert recover_expired(now=later, limit=3) == 1
    assert fresh(other).status == BatchOperation.STATUS_FINISHED  # its one attempt is spent


def test_recover_expired_fails_when_attempts_are_spent():
    op = enqueue("test-echo")  # max_attempts=1
    assert claim(op.pk) is not None
    assert recover_expired(now=timezone.now() + timedelta(minutes=10)) == 1
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_FINISHED
    assert stored.result == BatchOperation.RESULT_FAILED
    assert stored.output_data["error"]["type"] == LOST_WORKER
    assert "lost" in stored.output_data["error"]["message"]
    assert "attempts spent" in stored.last_error


def test_recovery_announces_the_operations_it_fails_or_retries():
    """Recovery failed operations as a lost worker's (the usual end of a killed worker, with
    the default ``max_attempts=1``) and put others back for another attempt without a signal:
    receivers that tell users about failures never heard of these. An operation held in a
    batch goes back without a failed attempt, and without a signal."""
    sent: list[tuple[str, Any, Any]] = []

    def finished(sender, operation, succeeded, error, **kwargs):
        sent.append(("finished", operation.pk, (succeeded, error["type"], operation.status)))

    def retried(sender, operation, error, attempt, **kwargs):
        sent.append(("retry", operation.pk, (attempt, error["type"], operation.status)))

    spent = enqueue("test-echo")  # max_attempts=1
    left = enqueue("test-always-fails")  # max_attempts=3
    assert claim(spent.pk) is not None and claim(left.pk) is not None
    held = [enqueue("test-always-fails") for _ in range(2)]
    assert len(claim_due(ids=[op.pk for op in held], limit=2)) == 2
    operation_finished.connect(finished)
    operation_retry_scheduled.connect(retried)
    try:
        assert recover_expired(now=timezone.now() + timedelta(minutes=10)) == 4
    finally:
        operation_finished.disconnect(finished)
        operation_retry_scheduled.disconnect(retried)
    assert sorted(sent, key=lambda signal: signal[1]) == [
        ("finished", spent.pk, (False, LOST_WORKER, BatchOperation.STATUS_FINISHED)),
        ("retry", left.pk, (1, LOST_WORKER, BatchOperation.STATUS_UNPROCESSED)),
    ]


def test_valid_lease_is_never_robbed():
    op = enqueue("test-sleep")  # 2-second lease
    claimed = claim(op.pk)
    assert claimed is not None
    assert recover_expired() == 0
    assert recover_expired(now=timezone.now() + timedelta(seconds=1)) == 0
    assert run_due() == []
    assert claim(op.pk) is None
    stored = fresh(op)
    assert stored.status == BatchOperation.STATUS_RUNNING
    assert stored.claimed_by == claimed.claimed_by


def test_fenced_finish_after_recovery_changes_nothing():
    op = enqueue("test-echo", input_data={"v": 1})
    stale = claim(op.pk)
    assert stale is not None
    future = timezone.now() + timedelta(minutes=10)
    # A retry needs attempts left: give this row a second attempt through recovery's own rule.
    two_attempts = {"DEFAULT_MAX_ATTEMPTS": 2, "DISPATCHER": NULL_DISPATCHER}
    with override_settings(BATCHFRAMEWORK=two_attempts):
        assert recover_expired(now=future) == 1
        current = claim(op.pk, now=future)
        assert current is not None and current.claimed_by != stale.claimed_by
        before = row_values(op)
        assert before["status"] == BatchOperation.STATUS_RUNNING and before["attempts"] == 2
        assert run_claimed(stale) is RunOutcome.LOST_CLAIM
        assert row_values(op) == before
        assert run_claimed(current) is RunOutcome.SUCCEEDED
    stored = fresh(op)
    assert stored.result == BatchOperation.RESULT_SUCCESSFUL and stored.attempts == 2
    finished = row_values(op)
    assert run_claimed(stale) is RunOutcome.LOST_CLAIM
    assert row_values(op) == finished


def test_fenced_failure_after_recovery_changes_nothing():
    op = enqueue("test-fails-once")  # attempt 1 raises, attempt 2 succeeds; max_attempts=2
    stale = claim(op.pk)
    future = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=future) == 1
    current = claim(op.pk, now=future)
    assert current is not None and current.attempts == 2
    before = row_values(op)
    assert run_claimed(stale) is RunOutcome.LOST_CLAIM  # its retry UPDATE matched nothing
    assert row_values(op) == before
    assert run_claimed(current) is RunOutcome.SUCCEEDED
    assert fresh(op).output_data == {"attempt": 2}


def test_fenced_failure_of_a_stale_atomic_claim_writes_nothing():
    op = enqueue("test-atomic")
    stale = claim(op.pk)
    future = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=future) == 1
    current = claim(op.pk, now=future)
    assert current is not None
    assert run_claimed(stale) is RunOutcome.LOST_CLAIM
    assert Effect.objects.count() == 0  # the stale atomic handler did not even run
    assert run_claimed(current) is RunOutcome.SUCCEEDED
    assert Effect.objects.count() == 1


def test_an_atomic_handler_whose_finish_is_lost_commits_none_of_its_writes():
    """An atomic handler's writes commit with its finish or not at all: here the claim is lost
    inside the handler's own transaction (as a row lock would normally prevent), and the finish
    that matches nothing must take the handler's writes with it."""

    def loses_its_claim(operation):
        Effect.objects.create(key="written-by-the-lost-attempt")
        BatchOperation.objects.filter(pk=operation.pk).update(claimed_by="someone-else")

    handler("test-api-lost-atomic", atomic=True)(loses_its_claim)
    try:
        op = enqueue("test-api-lost-atomic")
        assert run(op.pk) is RunOutcome.LOST_CLAIM
        assert Effect.objects.count() == 0
        assert fresh(op).claimed_by != "someone-else"  # the handler's update went too
    finally:
        registry.unregister("test-api-lost-atomic")


# --- System checks ---------------------------------------------------------------------------
def _batchframework_messages(**setting):
    with override_settings(**setting):
        return [m for m in checks.run_checks() if m.id and m.id.startswith("batchframework.")]


def test_default_settings_pass_the_checks():
    assert _batchframework_messages() == []
    call_command("check")


@pytest.mark.parametrize(
    ("setting", "check_id", "needle"),
    [
        ({"BATCH_SIZE": 0}, "batchframework.E003", "BATCH_SIZE"),
        # Recovery reads ten batches' worth: a huge one overflowed the database's LIMIT on
        # every poll, with no check to say so.
        ({"BATCH_SIZE": 10**18}, "batchframework.E003", "at most 1,000,000"),
        ({"DEFAULT_MAX_ATTEMPTS": -1}, "batchframework.E003", "DEFAULT_MAX_ATTEMPTS"),
        ({"DEFAULT_LEASE": -5}, "batchframework.E004", "DEFAULT_LEASE"),
        # The lease keeper could not renew it in time: operations taken from live workers.
        ({"DEFAULT_LEASE": 0.1}, "batchframework.E004", "at least a second"),
        ({"POLL_INTERVAL": 0}, "batchframework.E004", "POLL_INTERVAL"),
        ({"DEFAULT_RETRY_BACKOFF": -1}, "batchframework.E004", "DEFAULT_RETRY_BACKOFF"),
        ({"FINISH_WINDOW": -0.1}, "batchframework.E004", "FINISH_WINDOW"),
        # Longer than a hundred years: a lease or retry that long ended past year 9999.
        ({"DEFAULT_LEASE": timedelta(days=3_000_000)}, "batchframework.E004", "DEFAULT_LEASE"),
        ({"MAX_RETRY_BACKOFF": timedelta.max}, "batchframework.E004", "MAX_RETRY_BACKOFF"),
        # Workers sleep that long, and beat's interval column is 32 bits.
        ({"POLL_INTERVAL": timedelta(days=2)}, "batchframework.E004", "POLL_INTERVAL"),
        ({"DISPATCHER": "no.such.Dispatcher"}, "batchframework.E005", "no.such.Dispatcher"),
        ({"DISPATCHER": "datetime.timedelta"}, "batchframework.E005", "not a Dispatcher"),
        ({"POLL_INTERVAL": 600}, "batchframework.W001", "POLL_INTERVAL"),
        ({"ROUTES": {"no-such-type": "q"}}, "batchframework.W002", "no-such-type"),
    ],
)
def test_checks_report_bad_settings_with_hints(settings, setting, check_id, needle):
    bad = {**settings.BATCHFRAMEWORK, **setting}
    messages = _batchframework_messages(BATCHFRAMEWORK=bad)
    matching = [m for m in messages if m.id == check_id]
    assert matching, f"expected {check_id}, got {messages}"
    assert needle in matching[0].msg
    assert matching[0].hint
    if check_id.startswith("batchframework.E"):
        assert matching[0].level == checks.ERROR
        with override_settings(BATCHFRAMEWORK=bad), pytest.raises(SystemCheckError) as excinfo:
            call_command("check")
        assert check_id in str(excinfo.value) and "HINT" in str(excinfo.value)
        if check_id in ("batchframework.E003", "batchframework.E004"):
            # A number out of range stops every process, not only those that run the checks
            # (a Celery worker doesn't): with BATCH_SIZE 0, workers claimed nothing, silently.
            with override_settings(BATCHFRAMEWORK=bad), pytest.raises(ImproperlyConfigured):
                get_settings()
    else:
        assert matching[0].level == checks.WARNING


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("datetime.timedelta", r"is not a batchframework\.dispatch\.Dispatcher"),
        ("no.such.Dispatcher", r"can't be imported: No module named 'no'"),
    ],
)
def test_a_dispatcher_that_is_not_one_fails_enqueue_before_it_writes(
    settings, replace, path, message
):
    """It raised an AttributeError once the row was written, so a caller that tried again
    stored the operation twice; and a path that can't be imported raised ImportError, not
    the ImproperlyConfigured documented with check E005."""
    settings.BATCHFRAMEWORK = {**settings.BATCHFRAMEWORK, "DISPATCHER": path}
    with pytest.raises(ImproperlyConfigured, match=message):
        enqueue("test-noop", replace=replace, context_object=Post.objects.create(title="t"))
    assert BatchOperation.objects.count() == 0


def test_check_requires_use_tz():
    messages = _batchframework_messages(USE_TZ=False)
    assert [m.id for m in messages] == ["batchframework.E001"]
    assert "USE_TZ" in messages[0].msg and "USE_TZ = True" in messages[0].hint


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"NO_SUCH_KEY": 1}, "NO_SUCH_KEY"),
        ({"DEFAULT_LEASE": "long"}, "DEFAULT_LEASE"),
        ({"POLL_INTERVAL": float("nan")}, "POLL_INTERVAL"),
        ({"DEFAULT_LEASE": 1e300}, "DEFAULT_LEASE"),
        # Beyond any float: math.isfinite() raised OverflowError, which crashed startup.
        ({"DEFAULT_LEASE": 10**400}, "DEFAULT_LEASE"),
        # A bare string would be a list of one-letter modules: no handler found, no error.
        ({"HANDLER_MODULES": "batch_handlers"}, "HANDLER_MODULES"),
        ({"ROUTES": "x"}, "ROUTES"),
        ({"POLL_DATABASES": "default"}, "POLL_DATABASES"),
        ({"POLL_DATABASES": ["default", "no-such-alias"]}, "no-such-alias"),
        ({"ROUTES": {"test-noop": ""}}, "ROUTES"),
        ({"ALWAYS_SYNCHRONOUS": "False"}, "ALWAYS_SYNCHRONOUS"),  # a truthy string
        ({"PUBLISH_IN_BACKGROUND": 1}, "PUBLISH_IN_BACKGROUND"),
        ({"DEFAULT_QUEUE": None}, "DEFAULT_QUEUE"),
        ({"DEFAULT_QUEUE": "q" * 101}, "DEFAULT_QUEUE"),
        ({"DEFAULT_QUEUE": "q\x00"}, "DEFAULT_QUEUE"),
        ({"ROUTES": {"test-noop": "q\x00"}}, "ROUTES"),
        # Not integers: they failed later, at a claim (TypeError) or an enqueue.
        ({"BATCH_SIZE": "5"}, "BATCH_SIZE"),
        ({"MAX_INPUT_BYTES": "100"}, "MAX_INPUT_BYTES"),
        ({"DEFAULT_MAX_ATTEMPTS": True}, "DEFAULT_MAX_ATTEMPTS"),
        ({"DISPATCHER": ""}, "DISPATCHER"),
        ([], "must be a dict"),  # falsy, but not "no settings"
        ([("BATCH_SIZE", 10)], "must be a dict"),
    ],
)
def test_unreadable_settings_are_reported_as_e002(bad, needle):
    from batchframework.checks import check_settings

    with override_settings(BATCHFRAMEWORK=bad):
        messages = check_settings()
    assert [m.id for m in messages] == ["batchframework.E002"]
    assert needle in messages[0].msg and messages[0].hint


@pytest.mark.parametrize("bad", [{"NO_SUCH_KEY": 1}, {"DEFAULT_LEASE": "long"}])
def test_manage_py_check_reports_unreadable_settings(bad):
    # Every registered check must survive unreadable settings so that E002 is what the user sees.
    with override_settings(BATCHFRAMEWORK=bad), pytest.raises(SystemCheckError) as excinfo:
        call_command("check")
    assert "batchframework.E002" in str(excinfo.value) and "HINT" in str(excinfo.value)
