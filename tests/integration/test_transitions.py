"""What each step of an operation's life writes, column for column.

The engine's other tests check outcomes. These pin, for every transition, the set of columns
it changes and their new values, so that an UPDATE that forgets a column (a retry that keeps
its lease, a finish without ``finished_datetime``, a debounce that keeps the old priority)
fails here; each test compares the whole row before and after the step. They also pin what
the docs promise without a test of their own elsewhere: the order of a claim among equals,
the settings' documented defaults, and the handler registry's refusals.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many, handler
from batchframework.conf import BatchframeworkSettings
from batchframework.engine import (
    BatchRunner,
    RunOutcome,
    claim,
    claim_due,
    must_be_claimed_alone,
    recover_expired,
    release,
    set_progress,
)
from batchframework.engine.run import run_claimed
from batchframework.exceptions import HandlerRegistrationError
from batchframework.registry import registry
from tests.testapp.models import Post

from .helpers import RECORDING_DISPATCHER, RecordingDispatcher, assert_close

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
#: Every setting at its default but the dispatcher (the tests' settings shorten the backoff).
ONLY_NO_DISPATCH = {"DISPATCHER": "batchframework.dispatch.NullDispatcher"}


#: What a successful finish writes; a failed one writes the error too.
SUCCESS_WRITES = {"status", "result", "finished_datetime", "output_data", "lease_expires_at"}
FAILURE_WRITES = SUCCESS_WRITES | {"last_error"}
#: What a retry writes: the operation is due again, unclaimed.
RETRY_WRITES = {"status", "run_after", "last_error", "claimed_by", "lease_expires_at"}


def columns(op: BatchOperation) -> dict[str, Any]:
    return BatchOperation.objects.filter(pk=op.pk).values().get()


def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {name for name in after if after[name] != before[name]}


@pytest.fixture
def fails_for_good() -> Iterator[str]:
    """An operationtype whose handler always fails, with one attempt (the default)."""

    def fails(operation):
        raise LookupError(f"gone {operation.pk}")

    handler("test-transitions-fails")(fails)
    try:
        yield "test-transitions-fails"
    finally:
        registry.unregister("test-transitions-fails")


# --- Claim, run, finish ----------------------------------------------------------------------
def test_a_claim_takes_the_row_and_touches_nothing_else():
    op = enqueue("test-echo", input_data={"n": 1}, priority=4)
    before = columns(op)
    claimed = claim(op.pk)
    assert claimed is not None
    after = columns(op)
    assert changed(before, after) == {
        "status",
        "attempts",
        "claimed_by",
        "started_running_datetime",
        "lease_expires_at",
    }
    assert after["status"] == BatchOperation.STATUS_RUNNING
    assert after["attempts"] == 1
    assert after["claimed_by"] == claimed.claimed_by != ""
    assert_close(after["lease_expires_at"], timezone.now() + timedelta(minutes=5))


def test_a_success_records_finish_output_and_gives_up_the_lease():
    op = enqueue("test-echo", input_data={"n": 1})
    claimed = claim(op.pk)
    before = columns(op)
    assert run_claimed(claimed) is RunOutcome.SUCCEEDED
    after = columns(op)
    assert changed(before, after) == SUCCESS_WRITES
    assert after["status"] == BatchOperation.STATUS_FINISHED
    assert after["result"] == BatchOperation.RESULT_SUCCESSFUL
    assert after["output_data"] == {"echo": {"n": 1}}
    assert after["lease_expires_at"] is None
    assert before["started_running_datetime"] <= after["finished_datetime"] <= timezone.now()
    assert after["claimed_by"] == claimed.claimed_by  # who ran it stays on record


def test_successes_finished_together_write_what_one_finish_writes():
    ops = [enqueue("test-echo", input_data={"n": n}) for n in range(3)]
    claimed = claim_due(ids=[op.pk for op in ops])
    befores = [columns(op) for op in ops]
    with BatchRunner(window=60) as runner:
        assert runner.run_batch(claimed) == 3
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 3
    for n, (op, before) in enumerate(zip(ops, befores, strict=True)):
        after = columns(op)
        assert changed(before, after) == SUCCESS_WRITES, n
        assert after["result"] == BatchOperation.RESULT_SUCCESSFUL
        assert after["output_data"] == {"echo": {"n": n}}  # each its own output
        assert after["lease_expires_at"] is None
        assert after["finished_datetime"] >= before["started_running_datetime"]


def test_a_retry_gives_the_claim_back_and_is_due_after_its_backoff():
    op = enqueue("test-fails-once", input_data={"n": 1})
    claimed = claim(op.pk)
    before = columns(op)
    assert run_claimed(claimed) is RunOutcome.RETRY_SCHEDULED
    after = columns(op)
    assert changed(before, after) == RETRY_WRITES
    assert after["status"] == BatchOperation.STATUS_UNPROCESSED
    assert after["claimed_by"] == "" and after["lease_expires_at"] is None
    assert after["result"] == BatchOperation.RESULT_NOT_AVAILABLE
    assert after["finished_datetime"] is None and after["output_data"] is None
    assert after["attempts"] == 1  # counted by the claim; the next claim counts the second
    assert_close(after["run_after"], timezone.now() + timedelta(seconds=60))
    assert "RuntimeError: first attempt fails" in after["last_error"]


def test_a_failure_with_no_attempts_left_finishes_as_failed(fails_for_good):
    op = enqueue(fails_for_good)
    claimed = claim(op.pk)
    before = columns(op)
    assert run_claimed(claimed) is RunOutcome.FAILED
    after = columns(op)
    assert changed(before, after) == FAILURE_WRITES
    assert after["status"] == BatchOperation.STATUS_FINISHED
    assert after["result"] == BatchOperation.RESULT_FAILED
    assert after["lease_expires_at"] is None
    assert after["claimed_by"] == claimed.claimed_by
    assert before["started_running_datetime"] <= after["finished_datetime"] <= timezone.now()
    assert after["output_data"]["error"]["type"] == "builtins.LookupError"
    assert f"LookupError: gone {op.pk}" in after["last_error"]


def test_a_batch_failure_writes_what_a_single_failure_writes(fails_for_good):
    ops = enqueue_many(fails_for_good, [{}, {}])
    claimed = claim_due(ids=[op.pk for op in ops])
    befores = [columns(op) for op in ops]
    with BatchRunner(window=60) as runner:
        runner.run_batch(claimed)
    assert runner.outcomes == [RunOutcome.FAILED] * 2
    for op, before in zip(ops, befores, strict=True):
        after = columns(op)
        assert changed(before, after) == FAILURE_WRITES
        assert after["result"] == BatchOperation.RESULT_FAILED


def test_release_takes_back_the_claim_and_its_attempt():
    op = enqueue("test-noop")
    before = columns(op)
    claimed = claim(op.pk)
    assert release([claimed]) == 1
    after = columns(op)
    # Only the start time tells that it was claimed once; it runs as if never claimed.
    assert changed(before, after) == {"started_running_datetime"}


def _claimed_alone(path: str, op: BatchOperation) -> BatchOperation:
    """Claim ``op`` (marked to be claimed alone) by id, or as the first due one: with another
    operation due behind it, a batch claim must still take it alone."""
    if path == "by id":
        claimed = claim(op.pk)
        assert claimed is not None
        return claimed
    [claimed] = claim_due(limit=10)
    assert claimed.pk == op.pk
    return claimed


@pytest.mark.parametrize("path", ["by id", "batch claim"])
def test_release_gives_back_the_mark_to_be_claimed_alone(path):
    """A worker that stops gives back the operations it has not started as if it never claimed
    them, and that includes the mark recovery set: released without it, an operation that may
    have killed a worker would be claimed in a batch again, and the next death would cost its
    batch an uncounted attempt each instead of costing it its own."""
    op = enqueue("test-noop", run_after=timezone.now() - timedelta(minutes=1))
    enqueue("test-noop")
    BatchOperation.objects.filter(pk=op.pk).update(claimed_by="!isolated")
    before = columns(op)
    assert release([_claimed_alone(path, op)]) == 1
    after = columns(op)
    assert changed(before, after) == {"started_running_datetime"}
    assert [o.pk for o in claim_due(limit=10)] == [op.pk]


@pytest.mark.parametrize("path", ["by id", "batch claim"])
def test_a_retry_of_an_operation_claimed_alone_stays_alone(
    path, django_capture_on_commit_callbacks
):
    op = enqueue("test-fails-once", run_after=timezone.now() - timedelta(minutes=1))
    BatchOperation.objects.filter(pk=op.pk).update(claimed_by="!isolated")
    enqueue("test-noop")
    claimed = _claimed_alone(path, op)
    before = columns(op)
    RecordingDispatcher.operations.clear()
    recording = {**settings.BATCHFRAMEWORK, "DISPATCHER": RECORDING_DISPATCHER}
    with (
        override_settings(BATCHFRAMEWORK=recording),
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert run_claimed(claimed) is RunOutcome.RETRY_SCHEDULED
    after = columns(op)
    assert changed(before, after) == RETRY_WRITES
    assert after["claimed_by"] == "!isolated" and after["lease_expires_at"] is None
    # Its retry's message must name it alone; the instance keeps its claim.
    [retry] = RecordingDispatcher.operations
    assert retry.pk == op.pk and must_be_claimed_alone(retry)
    assert claimed.claimed_by.endswith("/alone")


# --- Recovery --------------------------------------------------------------------------------
def test_recovering_an_operation_claimed_alone_retries_it_alone():
    op = enqueue("test-always-fails")  # three attempts
    claimed = claim(op.pk)
    before = columns(op)
    assert recover_expired(now=timezone.now() + timedelta(minutes=6)) == 1
    after = columns(op)
    assert changed(before, after) == RETRY_WRITES
    assert after["status"] == BatchOperation.STATUS_UNPROCESSED
    assert after["attempts"] == 1  # the lost attempt counts
    assert after["claimed_by"] == "!isolated" and after["lease_expires_at"] is None
    assert "will retry alone" in after["last_error"]
    assert after["last_error"].endswith(claimed.claimed_by)


def test_recovering_an_operation_held_in_a_batch_does_not_count_its_attempt():
    ops = enqueue_many("test-always-fails", [{}, {}])
    claimed = claim_due(ids=[op.pk for op in ops])
    befores = [columns(op) for op in ops]
    assert recover_expired(now=timezone.now() + timedelta(minutes=6)) == 2
    for op, before in zip(ops, befores, strict=True):
        after = columns(op)
        assert changed(before, after) == RETRY_WRITES | {"attempts"}
        assert after["attempts"] == 0
        assert after["claimed_by"] == "!isolated"
        assert "attempt not counted" in after["last_error"]
        assert after["last_error"].endswith(claimed[0].claimed_by)


def test_recovering_an_operation_with_no_attempts_left_fails_it():
    op = enqueue("test-noop")  # one attempt
    claimed = claim(op.pk)
    before = columns(op)
    assert recover_expired(now=timezone.now() + timedelta(minutes=6)) == 1
    after = columns(op)
    assert changed(before, after) == FAILURE_WRITES | {"claimed_by"}
    assert after["result"] == BatchOperation.RESULT_FAILED
    assert after["output_data"]["error"]["type"] == "batchframework.WorkerLost"
    assert after["claimed_by"] == "" and after["lease_expires_at"] is None
    assert "attempts spent" in after["last_error"]
    assert after["last_error"].endswith(claimed.claimed_by)


# --- Debounce, bulk enqueue, progress --------------------------------------------------------
def test_replace_true_replaces_every_value_the_caller_gives():
    post = Post.objects.create(title="p")
    user = get_user_model().objects.create(username="second")
    first = enqueue("test-echo", context_object=post, input_data={"v": 1}, replace=True)
    before = columns(first)
    due = timezone.now() + timedelta(minutes=3)
    second = enqueue(
        "test-echo",
        context_object=post,
        input_data={"v": 2},
        run_after=due,
        started_by=user,
        queue="elsewhere",
        priority=7,
        replace=True,
    )
    assert second.pk == first.pk
    after = columns(first)
    assert changed(before, after) == {
        "input_data",
        "run_after",
        "started_by_id",
        "queue",
        "priority",
    }
    assert after["input_data"] == {"v": 2} and after["run_after"] == due
    assert after["started_by_id"] == user.pk
    assert after["queue"] == "elsewhere" and after["priority"] == 7
    # The instance returned is the row as stored.
    assert (second.queue, second.priority, second.started_by_id) == ("elsewhere", 7, user.pk)


def test_enqueue_many_items_keep_their_own_due_time_and_priority():
    now = timezone.now()
    at = now + timedelta(hours=2)
    created = enqueue_many(
        "test-noop",
        [{"run_after": at, "priority": -5}, {"priority": 9}, {}],
        delay=timedelta(minutes=1),
        priority=2,
    )
    stored = [columns(op) for op in created]
    assert [row["priority"] for row in stored] == [-5, 9, 2]
    assert stored[0]["run_after"] == at
    assert_close(stored[1]["run_after"], now + timedelta(minutes=1))
    assert stored[1]["run_after"] == stored[2]["run_after"]


def test_progress_changes_only_progress_and_the_lease():
    # Claimed a minute ago: the renewed lease differs from the claim's even where the
    # database's clock reads only milliseconds (SQLite).
    a_minute_ago = timezone.now() - timedelta(minutes=1)
    op = enqueue("test-sleep", run_after=a_minute_ago)
    claimed = claim(op.pk, now=a_minute_ago)
    before = columns(op)
    assert set_progress(claimed, 2, 5, "two") is True
    after = columns(op)
    assert changed(before, after) == {
        "progress_done",
        "progress_total",
        "progress_message",
        "lease_expires_at",
    }
    assert (after["progress_done"], after["progress_total"]) == (2, 5)


def test_progress_from_a_stale_claim_changes_nothing():
    """The successor's claim is running; a stale copy of the operation must not write."""
    op = enqueue("test-always-fails")
    stale = claim(op.pk)
    later = timezone.now() + timedelta(minutes=6)
    recover_expired(now=later)
    successor = claim(op.pk, now=later)
    assert successor is not None and successor.claimed_by != stale.claimed_by
    before = columns(op)
    assert set_progress(stale, 1, 2, "stale") is False
    assert columns(op) == before
    assert stale.progress_done is None  # the instance is not updated either


# --- Claim order -----------------------------------------------------------------------------
def test_among_equal_priorities_the_earliest_due_is_claimed_first_then_the_oldest():
    now = timezone.now()
    late = enqueue("test-noop", run_after=now - timedelta(minutes=1))
    early = enqueue("test-noop", run_after=now - timedelta(minutes=3))
    same_a = enqueue("test-noop", run_after=now - timedelta(minutes=2))
    same_b = enqueue("test-noop", run_after=now - timedelta(minutes=2))
    urgent = enqueue("test-noop", run_after=now, priority=1)
    claimed = claim_due(limit=3)
    assert [op.pk for op in claimed] == [urgent.pk, early.pk, same_a.pk]
    assert [op.pk for op in claim_due()] == [same_b.pk, late.pk]


def test_an_operation_to_be_claimed_alone_cuts_the_batch_where_it_falls_in_claim_order():
    now = timezone.now()
    alone = enqueue("test-noop", run_after=now - timedelta(minutes=1))  # oldest, due last
    first = enqueue("test-noop", run_after=now - timedelta(minutes=3))
    second = enqueue("test-noop", run_after=now - timedelta(minutes=2))
    BatchOperation.objects.filter(pk=alone.pk).update(claimed_by="!isolated")
    assert [op.pk for op in claim_due()] == [first.pk, second.pk]
    assert [op.pk for op in claim_due()] == [alone.pk]


# --- The documented defaults and refusals ----------------------------------------------------
def _documented_default(text: str) -> Any:
    literal = re.fullmatch(r"``(.+)``", text)
    if literal:
        return ast.literal_eval(literal.group(1))
    amount, unit = text.split()
    unit = {"ms": "milliseconds", "second": "seconds", "minute": "minutes", "day": "days"}.get(
        unit, unit
    )
    return timedelta(**{unit: int(amount)})


def test_every_setting_has_the_default_its_documentation_gives():
    text = (ROOT / "docs" / "settings.rst").read_text()
    documented = {
        name: _documented_default(value)
        for name, value in re.findall(r"^``([A-Z_]+)`` — default (.+)$", text, re.MULTILINE)
    }
    actual = BatchframeworkSettings()
    fields = {name: getattr(actual, name) for name in BatchframeworkSettings.__dataclass_fields__}
    assert documented == fields


def test_the_defaults_are_what_an_operation_gets_without_settings(fails_for_good):
    """Nothing set but the dispatcher: queue, lease, a single attempt, batch size."""
    with override_settings(BATCHFRAMEWORK=ONLY_NO_DISPATCH):
        op = enqueue(fails_for_good)
        assert op.queue == "default"
        claimed = claim(op.pk)
        assert claimed is not None
        assert_close(columns(op)["lease_expires_at"], timezone.now() + timedelta(minutes=5))
        assert run_claimed(claimed) is RunOutcome.FAILED  # one attempt: no retry
        enqueue_many("test-noop", [{} for _ in range(51)])
        assert len(claim_due()) == 50


def test_backoff_doubles_from_the_default_base():
    def fails(operation):
        raise RuntimeError("again")

    handler("test-transitions-backoff", max_attempts=4)(fails)
    try:
        with override_settings(BATCHFRAMEWORK=ONLY_NO_DISPATCH):
            registered = registry["test-transitions-backoff"]
            assert [registered.backoff_for(attempt) for attempt in (1, 2, 3)] == [
                timedelta(seconds=10),
                timedelta(seconds=20),
                timedelta(seconds=40),
            ]
            op = enqueue("test-transitions-backoff")
            assert run_claimed(claim(op.pk)) is RunOutcome.RETRY_SCHEDULED
            assert_close(columns(op)["run_after"], timezone.now() + timedelta(seconds=10))
    finally:
        registry.unregister("test-transitions-backoff")


def test_backoff_stops_growing_at_max_retry_backoff():
    """Without a cap the doubling reaches dates no database stores (and Python's datetime
    overflows): the 60th attempt's retry would strand its failure."""

    def fails(operation):
        raise RuntimeError("again")

    handler("test-transitions-capped", max_attempts=100)(fails)
    try:
        with override_settings(BATCHFRAMEWORK=ONLY_NO_DISPATCH):
            registered = registry["test-transitions-capped"]
            assert registered.backoff_for(14) == timedelta(seconds=10 * 2**13)  # 22.8 hours
            assert registered.backoff_for(15) == timedelta(days=1)
            assert registered.backoff_for(10_000) == timedelta(days=1)
            op = enqueue("test-transitions-capped")
            BatchOperation.objects.filter(pk=op.pk).update(attempts=59)
            assert run_claimed(claim(op.pk)) is RunOutcome.RETRY_SCHEDULED
            assert_close(columns(op)["run_after"], timezone.now() + timedelta(days=1))
        capped = {**ONLY_NO_DISPATCH, "MAX_RETRY_BACKOFF": 30}
        with override_settings(BATCHFRAMEWORK=capped):
            assert registry["test-transitions-capped"].backoff_for(3) == timedelta(seconds=30)
    finally:
        registry.unregister("test-transitions-capped")


def _raises(attempt: int) -> timedelta:
    raise ZeroDivisionError("a bug in the schedule")


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (lambda attempt: 30 * attempt, timedelta(seconds=30)),  # seconds, as numbers are
        (lambda attempt: timedelta(minutes=attempt), timedelta(minutes=1)),
        (lambda attempt: "30", timedelta(seconds=10)),  # not a backoff: the default's
        (lambda attempt: -5, timedelta(seconds=10)),
        (_raises, timedelta(seconds=10)),
    ],
    ids=["seconds", "timedelta", "text", "negative", "raises"],
)
def test_a_callable_backoff_schedules_the_retry_and_never_strands_the_failure(
    schedule, expected, caplog
):
    """Whatever the schedule returns, the failed attempt is recorded and retried: a bad value
    (or an exception) falls back to the default backoff with a warning, instead of escaping
    the finish and leaving the operation running until its lease expires."""

    def fails(operation):
        raise RuntimeError("again")

    handler("test-transitions-schedule", max_attempts=2, retry_backoff=schedule)(fails)
    try:
        with override_settings(BATCHFRAMEWORK=ONLY_NO_DISPATCH):
            op = enqueue("test-transitions-schedule")
            assert run_claimed(claim(op.pk)) is RunOutcome.RETRY_SCHEDULED
            after = columns(op)
            assert after["status"] == BatchOperation.STATUS_UNPROCESSED
            assert "again" in after["last_error"]
            assert_close(after["run_after"], timezone.now() + expected)
        warned = "event=retry_backoff_invalid" in caplog.text
        assert warned is (expected == timedelta(seconds=10))
    finally:
        registry.unregister("test-transitions-schedule")


@pytest.mark.parametrize(
    ("options", "target", "message"),
    [
        ({}, "not a function", "must decorate a callable"),
        ({"lease": 0}, None, "lease must be at least a second"),
        ({"lease": timedelta(0)}, None, "lease must be at least a second"),
        # Shorter than the lease keeper can renew (every third of it, at most every 0.2 s):
        # the lease would run out under a live worker, and the operation run twice.
        ({"lease": 0.5}, None, "lease must be at least a second"),
        ({"max_attempts": -2}, None, "max_attempts"),
        ({"max_attempts": 1.5}, None, "max_attempts"),
        ({"lease": "300"}, None, "lease must be at least a second"),
        ({"retry_backoff": "10"}, None, "retry_backoff must be"),
        ({"retry_backoff": -1}, None, "retry_backoff must be"),
        ({"retry_backoff": timedelta(seconds=-1)}, None, "retry_backoff must be"),
        ({"retry_backoff": float("nan")}, None, "retry_backoff must be"),
        ({"retry_backoff": True}, None, "retry_backoff must be"),
    ],
)
def test_the_registry_refuses_a_handler_that_could_not_run(options, target, message):
    with pytest.raises(HandlerRegistrationError, match=message):
        decorator = handler("test-transitions-refused", **options)
        decorator(target if target is not None else (lambda operation: None))
    assert "test-transitions-refused" not in registry


@pytest.mark.parametrize(
    ("operationtype", "accepted"),
    [
        ("a" * 255, True),
        ("a" * 256, False),
        ("", False),
        ("x.y:z_w-1", True),
        ("new blogpost", False),
        ("ünïcode", False),
        (42, False),
    ],
)
def test_operationtype_names_are_refused_when_the_column_could_not_hold_them(
    operationtype, accepted
):
    def noop(operation):
        return None

    try:
        if accepted:
            handler(operationtype)(noop)
            assert registry[operationtype].function is noop
        else:
            with pytest.raises(HandlerRegistrationError, match="Invalid operationtype"):
                handler(operationtype)
            assert operationtype not in registry
    finally:
        if isinstance(operationtype, str):
            registry.unregister(operationtype)


def test_routes_override_the_queue_a_handler_declares():
    with override_settings(BATCHFRAMEWORK={"ROUTES": {"test-other-queue": "rerouted"}}):
        op = enqueue("test-other-queue")
        assert columns(op)["queue"] == "rerouted"
        assert claim_due(queues=["other"]) == []
        assert [claimed.pk for claimed in claim_due(queues=["rerouted"])] == [op.pk]
    # An explicit queue wins over both.
    assert enqueue("test-other-queue", queue="mine").queue == "mine"
