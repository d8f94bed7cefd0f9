"""The Celery transport with an in-process worker (Celery's testing worker, a thread) on Redis:
routing, chunk messages, duplicate and early messages, cancel before the ETA, the poller's
hand-off of far-future operations, and messages an attacker could push onto the queue."""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, CancelOutcome, cancel, enqueue, enqueue_many
from batchframework.testing import run_due
from batchframework_celery import shutdown
from batchframework_celery.poller import poll_once
from batchframework_celery.tasks import (
    DRAIN_TASK,
    MAX_IDS_PER_MESSAGE,
    POLL_TASK,
    RUN_OPERATIONS_TASK,
    drain,
    run_operations,
)
from tests.celery_app import app as celery_app

from .conftest import CELERY_DISPATCHER, NO_DISPATCH
from .helpers import all_finished, assert_never_early, assert_ran_once_each, executions, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def events(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"event={name} ")]


def test_enqueued_operation_runs_on_worker(inprocess_worker):
    op = enqueue("test-echo", input_data={"x": 1})
    assert wait_for(lambda: BatchOperation.objects.successful().filter(pk=op.pk).exists())
    op.refresh_from_db()
    assert op.output_data == {"echo": {"x": 1}}


def test_delayed_operation_runs_on_time_never_early(inprocess_worker):
    op = enqueue("test-noop", delay=timedelta(seconds=2))
    assert wait_for(lambda: BatchOperation.objects.finished().filter(pk=op.pk).exists(), timeout=10)
    op.refresh_from_db()
    assert op.started_running_datetime >= op.run_after
    assert op.started_running_datetime - op.run_after < timedelta(seconds=1)


def test_messages_are_routed_by_operationtype_and_carry_only_ids(
    celery_dispatch, start_inprocess_worker
):
    broker = celery_dispatch
    routed = {**CELERY_DISPATCHER, "ROUTES": {"test-noop": "other"}}
    other = enqueue("test-other-queue")  # the handler declares queue="other"
    with override_settings(BATCHFRAMEWORK=routed):
        noop = enqueue("test-noop")  # the ROUTES setting sends it to "other"
    echo = enqueue("test-echo", input_data={"secret": "never in the message"})
    assert (other.queue, noop.queue, echo.queue) == ("other", "other", "default")
    assert broker.waiting("other") == 2
    assert broker.waiting("default") == 1

    raw = json.loads(broker.redis.lindex("default", 0))
    assert raw["content-type"] == "application/json"
    assert raw["headers"]["task"] == RUN_OPERATIONS_TASK
    args, kwargs, _embed = json.loads(base64.b64decode(raw["body"]))
    # The database is named even when it is "default": a worker's router may say otherwise.
    assert (args, kwargs) == ([[echo.pk]], {"using": "default"}), (
        "a message carries the operation's id and its database alias, nothing else"
    )

    start_inprocess_worker()
    ids = [other.pk, noop.pk, echo.pk]
    assert wait_for(all_finished(ids))
    assert BatchOperation.objects.filter(pk__in=ids).successful().count() == 3


def test_bulk_enqueue_publishes_chunk_messages(celery_dispatch, start_inprocess_worker):
    broker = celery_dispatch
    batch_size = CELERY_DISPATCHER.get("BATCH_SIZE", 50)
    count = 2 * batch_size + 20
    ops = enqueue_many("test-effect", [{} for _ in range(count)], run_after=timezone.now())
    assert broker.waiting("default") == 3, (
        "one message per chunk of BATCH_SIZE ids, not per operation"
    )
    start_inprocess_worker()
    ids = [op.pk for op in ops]
    assert wait_for(all_finished(ids), timeout=20)
    assert_ran_once_each(ids)


@pytest.mark.timeout(120)
def test_a_batch_size_above_what_a_message_may_carry_still_runs_everything(
    celery_dispatch, start_inprocess_worker, caplog
):
    """``BATCH_SIZE`` may exceed the most ids a task accepts in one message: the chunks are
    then cut at that limit, instead of being refused by the worker."""
    caplog.set_level(logging.ERROR, logger="batchframework")
    big = {**CELERY_DISPATCHER, "BATCH_SIZE": 2 * MAX_IDS_PER_MESSAGE}
    with override_settings(BATCHFRAMEWORK=big):
        ops = enqueue_many("test-noop", [{} for _ in range(MAX_IDS_PER_MESSAGE + 1)])
        assert celery_dispatch.waiting("default") == 2
        start_inprocess_worker()
        ids = [op.pk for op in ops]
        assert wait_for(all_finished(ids), timeout=90, interval=0.5)
    assert not events(caplog, "message_rejected")


def test_a_message_runs_all_its_ids_even_beyond_the_workers_batch_size(inprocess_worker):
    """A message's ids are claimed together, whatever ``BATCH_SIZE`` the worker has (a web
    process may have a larger one, or the message came before a change): none is left over
    for the poller, a poll interval later."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        ids = [op.pk for op in enqueue_many("test-noop", [{} for _ in range(5)])]
    with override_settings(BATCHFRAMEWORK={**CELERY_DISPATCHER, "BATCH_SIZE": 2}):
        run_operations.apply_async(args=(ids,), queue="default")
        assert wait_for(all_finished(ids), timeout=10)


def test_a_message_delivered_twice_runs_the_operation_once(inprocess_worker, caplog):
    caplog.set_level(logging.INFO, logger="batchframework")
    op = enqueue("test-effect")
    # The same message again, twice (a broker redelivery, a republish after a lost ack).
    run_operations.apply_async(args=([op.pk],), queue="default")
    run_operations.apply_async(args=([op.pk],), queue="default")
    assert wait_for(all_finished([op.pk]))
    assert wait_for(lambda: len(events(caplog, "message_noop")) == 2, timeout=10)
    assert_ran_once_each([op.pk])


def test_a_retry_is_published_by_the_worker_with_its_eta(inprocess_worker):
    """The back-off (1 s) is shorter than the poller's look-ahead, and no poller runs here: only
    the worker's own dispatch of the retry can run it, and it must run on time, never early."""
    op = enqueue("test-fails-once-soon")
    assert wait_for(all_finished([op.pk]), timeout=10)
    op.refresh_from_db()
    assert (op.result, op.attempts, executions(op.pk)) == (BatchOperation.RESULT_SUCCESSFUL, 2, 2)
    assert op.started_running_datetime >= op.run_after  # the retry's due time
    assert op.started_running_datetime - op.run_after < timedelta(seconds=1)


def test_the_poller_publishes_only_retries_the_worker_could_not(celery_dispatch):
    """A retry due within the horizon of its failed attempt was published by that attempt's
    worker; the poller's window takes only those the back-off put beyond the horizon."""
    now = timezone.now()
    horizon = {**CELERY_DISPATCHER, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
    failed = {
        "operationtype": "test-noop",
        "attempts": 1,
        "last_error": "RuntimeError: first attempt fails",
        "run_after": now + timedelta(seconds=0.5),
    }
    published_by_worker = BatchOperation.objects.create(
        **failed, started_running_datetime=now - timedelta(seconds=0.1)
    )
    beyond_horizon = BatchOperation.objects.create(
        **failed, started_running_datetime=now - timedelta(seconds=2)
    )
    with override_settings(BATCHFRAMEWORK=horizon):
        scheduled = poll_once()["scheduled"]
    assert scheduled == 1
    assert celery_dispatch.total() == 1
    raw = json.loads(celery_dispatch.redis.lindex("default", 0))
    args, _kwargs, _embed = json.loads(base64.b64decode(raw["body"]))
    assert args == [[beyond_horizon.pk]]
    assert published_by_worker.pk != beyond_horizon.pk


def test_an_early_message_does_not_run_the_operation_early(inprocess_worker, caplog):
    caplog.set_level(logging.INFO, logger="batchframework")
    op = enqueue("test-effect", delay=timedelta(seconds=60))  # beyond the horizon: no message
    run_operations.apply_async(args=([op.pk],), queue="default")  # no ETA: delivered at once
    assert wait_for(lambda: events(caplog, "message_noop"), timeout=10)
    op.refresh_from_db()
    assert (op.status, op.attempts, executions(op.pk)) == (BatchOperation.STATUS_UNPROCESSED, 0, 0)


def test_cancel_after_publish_before_the_eta_never_runs(inprocess_worker, purge_broker, caplog):
    broker = purge_broker
    caplog.set_level(logging.INFO, logger="batchframework")
    op = enqueue("test-effect", delay=timedelta(seconds=1.5))
    keep = enqueue("test-effect", delay=timedelta(seconds=1.5))
    # The worker has received the ETA message and holds it in memory, unacknowledged.
    assert wait_for(lambda: broker.unacked() == 2, timeout=5)
    assert cancel(op) is CancelOutcome.CANCELLED
    assert wait_for(all_finished([keep.pk]), timeout=10)
    assert wait_for(lambda: broker.total() == 0, timeout=5), "the ETA message was consumed"
    assert wait_for(lambda: events(caplog, "message_noop"), timeout=5)
    assert not BatchOperation.objects.filter(pk=op.pk).exists()
    assert executions(op.pk) == 0
    assert_ran_once_each([keep.pk])


def test_poller_hands_far_future_operations_to_celery_on_time(inprocess_worker, purge_broker):
    broker = purge_broker
    short_horizon = {**CELERY_DISPATCHER, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
    with override_settings(BATCHFRAMEWORK=short_horizon):
        ids = [enqueue("test-effect", delay=timedelta(seconds=s)).pk for s in (2.5, 3.5)]
        assert broker.total() == 0, "beyond the horizon: nothing is published at enqueue"
        scheduled = 0
        deadline = time.monotonic() + 10
        while not all_finished(ids)() and time.monotonic() < deadline:
            scheduled += poll_once()["scheduled_messages"]  # what beat would do every second
            time.sleep(1)
    assert all_finished(ids)()
    assert scheduled >= 2
    assert_ran_once_each(ids)
    assert_never_early(ids, late_by=1.0)


def test_late_and_early_poller_ticks_publish_each_far_operation_once(
    inprocess_worker, purge_broker
):
    """Beat ticks are not punctual: a tick that comes late must leave no gap between its
    window and the previous one (an operation in a gap would wait for a drain, a poll
    interval late), and one that comes early must not publish anything twice."""
    short_horizon = {**CELERY_DISPATCHER, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
    with override_settings(BATCHFRAMEWORK=short_horizon):
        ids = [enqueue("test-effect", delay=timedelta(seconds=1.2 + 0.4 * i)).pk for i in range(12)]
        assert purge_broker.total() == 0, "beyond the horizon: nothing published yet"
        scheduled = 0
        # Seconds between ticks (the interval is 1). A window reaches 1.5 intervals ahead, so
        # a tick 1.3 late still meets the previous one. Ticks start on a plan, not a fixed
        # sleep after the last one ended, so that a slow tick on a busy machine doesn't make
        # the next one later than intended.
        tick_at = time.monotonic()
        for gap in (0.3, 1.3, 0.5, 1.3, 1.2, 0.2, 1.3, 0.1):
            scheduled += poll_once()["scheduled"]
            tick_at += gap
            time.sleep(max(0.0, tick_at - time.monotonic()))
    assert scheduled == len(ids)
    assert wait_for(all_finished(ids), timeout=15)
    assert_ran_once_each(ids)
    assert_never_early(ids, late_by=0.5)  # each had its own ETA message: none waited for a drain


def test_hostile_messages_are_rejected_and_run_nothing(inprocess_worker, purge_broker, caplog):
    broker = purge_broker
    # (After the worker started: its Django fixup re-applies LOGGING, which resets levels.)
    caplog.set_level(logging.INFO, logger="batchframework")
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):  # no dispatch: no real message for it
        target = enqueue("test-effect")
        sentinel = enqueue("test-effect")
    pk = target.pk
    malformed = [
        (RUN_OPERATIONS_TASK, [f"{pk}"], {}),
        (RUN_OPERATIONS_TASK, [pk], {}),
        (RUN_OPERATIONS_TASK, [{"ids": [pk]}], {}),
        (RUN_OPERATIONS_TASK, [[]], {}),
        (RUN_OPERATIONS_TASK, [[0]], {}),
        (RUN_OPERATIONS_TASK, [[-pk]], {}),
        (RUN_OPERATIONS_TASK, [[True]], {}),
        (RUN_OPERATIONS_TASK, [[str(pk)]], {}),
        (RUN_OPERATIONS_TASK, [[float(pk)]], {}),
        (RUN_OPERATIONS_TASK, [[None]], {}),
        (RUN_OPERATIONS_TASK, [[pk, [pk]]], {}),
        (RUN_OPERATIONS_TASK, [list(range(1, 10_002))], {}),
        (RUN_OPERATIONS_TASK, [[pk]], {"using": "nope"}),
        (RUN_OPERATIONS_TASK, [[pk]], {"using": ["default"]}),
        (DRAIN_TASK, [""], {}),
        (DRAIN_TASK, [7], {}),
        (DRAIN_TASK, ["x" * 101], {}),
        (DRAIN_TASK, ["default"], {"using": "nope"}),
        (POLL_TASK, [], {"using": "nope"}),
    ]
    for name, args, kwargs in malformed:
        celery_app.send_task(name, args=args, kwargs=kwargs, queue="default")
    # Well-formed but pointless: an id that does not exist.
    celery_app.send_task(RUN_OPERATIONS_TASK, args=[[2**62]], queue="default")
    # Not our arguments at all: Celery refuses the call (TypeError), nothing is looked up.
    celery_app.send_task(
        RUN_OPERATIONS_TASK, args=[[pk]], kwargs={"handler": "os.system"}, queue="default"
    )
    # A pickled message: the worker accepts JSON only.
    celery_app.send_task(RUN_OPERATIONS_TASK, args=[[pk]], queue="default", serializer="pickle")
    # An unknown task name: Celery discards it.
    celery_app.send_task("batchframework.run_anything", args=["os.system", "id"], queue="default")
    # Last, a good message for another operation: once it ran, the worker read all the above
    # (one solo worker consumes one queue in order).
    celery_app.send_task(RUN_OPERATIONS_TASK, args=[[sentinel.pk]], queue="default")

    assert wait_for(all_finished([sentinel.pk]), timeout=15)
    rejected = events(caplog, "message_rejected")
    assert len(rejected) == len(malformed), rejected
    assert any("named=1 claimed=0" in m for m in events(caplog, "message_noop"))
    target.refresh_from_db()
    assert (target.status, target.attempts, executions(pk)) == (
        BatchOperation.STATUS_UNPROCESSED,
        0,
        0,
    )
    assert wait_for(lambda: broker.total() == 0, timeout=5)
    # The target was due and runnable all along: only the messages were refused.
    assert [op.pk for op in run_due()] == [pk]
    assert_ran_once_each([pk, sentinel.pk])


@pytest.mark.parametrize("fast_ms", [0, 50])
def test_an_eta_message_that_fires_early_by_the_workers_clock_still_runs_its_operation(
    inprocess_worker, monkeypatch, caplog, fast_ms
):
    """Celery fires an ETA by the worker's clock, the claim judges "due" by the database's. A
    worker whose clock runs a little ahead (NTP error between hosts) gets every ETA message
    that early: the message waits for its operations instead of leaving them to the poller's
    drain, a poll interval late (no poller runs here: only the message can run it), and still
    never runs one early."""
    import kombu.asynchronous.timer as kombu_timer

    caplog.set_level(logging.INFO, logger="batchframework")
    real_time = kombu_timer._time
    monkeypatch.setattr(kombu_timer, "_time", lambda: real_time() + fast_ms / 1000)
    with override_settings(BATCHFRAMEWORK=CELERY_DISPATCHER):
        ids = [enqueue("test-effect", delay=timedelta(seconds=1)).pk for _ in range(2)]
    assert wait_for(all_finished(ids), timeout=5), "the early message left them to a drain"
    assert_ran_once_each(ids)
    assert_never_early(ids, late_by=0.5)
    if fast_ms:  # the message waited for them (without skew, Celery fires on time or after)
        assert "event=message_early" in caplog.text


def test_an_early_operation_falls_due_while_the_message_runs_a_long_batch(caplog):
    """A message names one operation that is due and one due a moment later. The due one's
    handler outlasts that moment: the early one must still be claimed when the batch is done,
    not judged "already due, so not early" and left to the poller's drain."""
    caplog.set_level(logging.INFO, logger="batchframework")
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        slow = enqueue("test-sleep", input_data={"seconds": 0.8})
        soon = enqueue("test-effect", delay=timedelta(milliseconds=300))
    assert run_operations([slow.pk, soon.pk]) == 2
    assert "event=message_early" in caplog.text
    slow.refresh_from_db()
    assert (slow.result, executions(slow.pk)) == (BatchOperation.RESULT_SUCCESSFUL, 1)
    assert_ran_once_each([soon.pk])
    assert_never_early([soon.pk], late_by=1.0)


@pytest.mark.parametrize("atomic", [False, True], ids=["plain", "atomic"])
def test_a_soft_time_limit_inside_a_handler_ends_the_message_without_failing_anything(atomic):
    """Celery raises ``SoftTimeLimitExceeded`` inside whichever handler runs when the task's
    soft limit fires: the interrupted operation is not failed (its handler did not fail, the
    task's time ran out), the rest of the message is given back unstarted, the exception
    reaches Celery, and the next recovery puts the interrupted one back to run alone."""
    from celery.exceptions import SoftTimeLimitExceeded

    from batchframework import handler
    from batchframework.engine import recover_expired
    from batchframework.registry import registry
    from tests.testapp.models import Execution

    @handler("limit-interrupted", atomic=atomic)
    def interrupted(operation):
        Execution.objects.create(key=f"interrupted-{operation.pk}")
        raise SoftTimeLimitExceeded()

    @handler("limit-next")
    def after(operation):
        Execution.objects.create(key=f"next-{operation.pk}")

    try:
        with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
            first = enqueue("limit-interrupted", priority=1)
            rest = [enqueue("limit-next").pk for _ in range(2)]
        with pytest.raises(SoftTimeLimitExceeded):
            run_operations([first.pk, *rest])

        assert not Execution.objects.filter(key__startswith="next-").exists()
        unstarted = BatchOperation.objects.filter(pk__in=rest)
        assert {(op.status, op.attempts) for op in unstarted} == {
            (BatchOperation.STATUS_UNPROCESSED, 0)
        }
        first.refresh_from_db()
        assert first.status == BatchOperation.STATUS_RUNNING  # until the next recovery...
        assert recover_expired() == 1  # ...which needs no lease to run out first
        first.refresh_from_db()
        assert (first.status, first.result, first.attempts, first.claimed_by) == (
            BatchOperation.STATUS_UNPROCESSED,
            BatchOperation.RESULT_NOT_AVAILABLE,
            0,
            "!isolated",
        )
        # An atomic handler's writes went with its transaction.
        assert Execution.objects.filter(key__startswith="interrupted-").count() == (not atomic)
    finally:
        registry.unregister("limit-interrupted")
        registry.unregister("limit-next")


def test_a_task_starting_once_its_worker_is_shutting_down_claims_nothing(monkeypatch):
    """Once the worker has begun to shut down, a message or drain that still starts claims
    nothing (it would only give it back): the operations stay as they were, an operation
    marked to be claimed alone keeps its mark, and the poller's drain hands them to a worker
    that is not stopping."""
    monkeypatch.setattr(shutdown, "_flag", None)  # restored after the test
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        ops = [enqueue("test-effect") for _ in range(3)]
    shutdown.create_flag()
    assert run_operations([op.pk for op in ops]) == 3  # the flag is down: they run ...
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        more = [enqueue("test-effect") for _ in range(3)]
    more_ids = [op.pk for op in more]
    BatchOperation.objects.filter(pk=more_ids[0]).update(claimed_by="!isolated")
    shutdown.raise_flag()
    assert run_operations(more_ids) == 0  # ... and once it is up, nothing is claimed
    assert drain("default") == 0
    stored = {op.pk: op for op in BatchOperation.objects.filter(pk__in=more_ids)}
    assert [(stored[pk].status, stored[pk].attempts, stored[pk].claimed_by) for pk in more_ids] == [
        (BatchOperation.STATUS_UNPROCESSED, 0, "!isolated"),
        (BatchOperation.STATUS_UNPROCESSED, 0, ""),
        (BatchOperation.STATUS_UNPROCESSED, 0, ""),
    ]
