"""The DB-polling worker's options, through :class:`batchframework.worker.Worker` (what
``batchframework_worker`` runs): ``queues`` and ``max_operations``, and how long it sleeps."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from batchframework import BatchOperation, enqueue
from batchframework.worker import Worker

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]


def test_a_worker_given_queues_runs_only_operations_of_those_queues():
    """``Worker(queues=[...])`` (``batchframework_worker --queue``) claims only from its queues:
    operations of other queues stay unprocessed and unclaimed, for the workers that take them."""
    mine = enqueue("test-other-queue")  # the handler's queue is "other"
    theirs = enqueue("test-noop")  # "default"
    assert Worker(queues=["other"], once=True).run() == 1
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.status == BatchOperation.STATUS_FINISHED
    assert theirs.status == BatchOperation.STATUS_UNPROCESSED and theirs.attempts == 0


def test_max_operations_claims_no_more_than_it_will_run():
    """A worker with ``max_operations`` claims at most what it has left to run: it stops after
    that many, and the rest stay unprocessed and unclaimed (not running under a lease of a
    worker that has exited, for others to wait out)."""
    ops = [enqueue("test-noop") for _ in range(5)]
    assert Worker(max_operations=2, batch_size=10).run() == 2
    statuses = sorted(
        BatchOperation.objects.filter(pk__in=[op.pk for op in ops]).values_list(
            "status", "attempts"
        )
    )
    assert statuses == [("finished", 1)] * 2 + [("unprocessed", 0)] * 3


def test_a_worker_sleeps_until_its_own_next_operation_not_another_queues():
    """Operations due in a queue this worker does not take must not decide how long it sleeps:
    taking them for its own, it would find nothing to claim, back off, and wake late."""
    enqueue("test-noop")  # due now, in "default", which this worker does not take
    mine = enqueue("test-other-queue", delay=timedelta(seconds=2))
    worker = Worker(queues=["other"], max_operations=1, poll_interval=timedelta(seconds=5))
    assert worker.run() == 1
    mine.refresh_from_db()
    lateness = mine.started_running_datetime - mine.run_after
    assert timedelta(0) <= lateness < timedelta(milliseconds=300), lateness


@pytest.mark.parametrize(
    ("operationtype", "signal_name", "options"),
    [
        ("test-noop", "operation_finished", {}),  # a quick success, finished with others
        ("test-noop", "operation_finished", {"FINISH_WINDOW": 0}),  # finished at once
        ("test-always-fails", "operation_retry_scheduled", {}),  # a failure, retried
        ("test-atomic", "operation_finished", {}),  # inside the handler's transaction
    ],
    ids=["grouped-success", "success", "failure", "atomic"],
)
def test_a_signal_receiver_that_raises_is_logged_and_the_worker_goes_on(
    monkeypatch, caplog, settings, operationtype, signal_name, options
):
    """A receiver's bug raised out of the worker's loop and ended the process, and with it
    every queue the worker served. The operation whose run ended in that error still counts
    towards ``max_operations`` (its handler ran): it was not counted once, and the worker
    then ran more operations than it was told to."""
    from batchframework import signals
    from batchframework import worker as worker_module

    monkeypatch.setattr(worker_module, "DATABASE_ERROR_BACKOFF", 0.01)
    settings.BATCHFRAMEWORK = {**settings.BATCHFRAMEWORK, **options}
    for priority in (2, 1, 0):
        enqueue(operationtype, priority=priority)
    raised: list[int] = []
    started: list[int] = []

    def buggy_receiver(sender, operation, **kwargs):
        if not raised:
            raised.append(operation.pk)
            raise RuntimeError("a receiver's bug")

    def count(sender, operation, **kwargs):
        started.append(operation.pk)

    signal = getattr(signals, signal_name)
    signal.connect(buggy_receiver)
    signals.operation_started.connect(count)
    try:
        worker = Worker(max_operations=2, batch_size=1, poll_interval=timedelta(seconds=0.05))
        assert worker.run() == 2
    finally:
        signal.disconnect(buggy_receiver)
        signals.operation_started.disconnect(count)
    assert len(raised) == 1
    assert len(started) == 2, started
    assert "event=worker_error" in caplog.text and "a receiver's bug" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_worker_runs_the_operations_of_a_claim_whose_answer_was_lost(monkeypatch, caplog):
    """The session ends after the claim committed and before its answer arrived (a failover,
    a network blip). The operations were left running under a claim nobody held, and were
    failed as a lost worker's (``max_attempts=1``) once their leases expired, never having
    run. Now the worker finds them by the claim's own name and runs them."""
    from django.db import OperationalError

    from batchframework import worker as worker_module
    from tests.testapp.models import Execution

    monkeypatch.setattr(worker_module, "DATABASE_ERROR_BACKOFF", 0.01)
    ops = [enqueue("test-effect") for _ in range(2)]
    real_claim_due = worker_module.claim_due
    lost: list[BatchOperation] = []

    def claim_then_lose_the_answer(**kwargs):
        claimed = real_claim_due(**kwargs)
        if not lost:
            lost.extend(claimed)
            raise OperationalError("server closed the connection unexpectedly")
        return claimed

    monkeypatch.setattr(worker_module, "claim_due", claim_then_lose_the_answer)
    worker = Worker(max_operations=2, batch_size=5, poll_interval=0.05)
    deadline = threading.Timer(10, worker.stop)  # without the fix it would wait forever
    deadline.start()
    try:
        ran = worker.run()
    finally:
        deadline.cancel()
    assert sorted(op.pk for op in lost) == sorted(op.pk for op in ops)
    assert ran == 2
    for op in ops:
        op.refresh_from_db()
        assert (op.result, op.attempts) == (BatchOperation.RESULT_SUCCESSFUL, 1)
        assert Execution.objects.filter(key=str(op.pk)).count() == 1
    assert "event=claim_adopted count=2 reason=answer_lost" in caplog.text


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"batch_size": -1}, "batch_size must be a whole number from 1"),
        ({"batch_size": 0}, "batch_size must be a whole number from 1"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 10**7}, "at most 1,000,000"),
        ({"max_operations": 0}, "max_operations"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"poll_interval": -1.0}, "poll_interval"),
        ({"poll_interval": float("nan")}, "poll_interval"),
        ({"poll_interval": float("inf")}, "poll_interval"),
        ({"poll_interval": 1e-300}, "poll_interval"),
        ({"poll_interval": timedelta(days=2)}, "poll_interval"),
        ({"poll_interval": "5"}, "poll_interval"),
        ({"name": 5}, "name must be a string"),
        ({"using": "nowhere"}, "using must be a database alias"),
    ],
)
def test_a_worker_refuses_wrong_options_when_it_is_made(options, error):
    """A negative batch size was taken, and failed in every claim's SQL, which the loop took
    for a database outage and retried forever."""
    with pytest.raises(ValueError, match=error):
        Worker(**options)


def test_a_worker_takes_its_poll_interval_in_seconds_too():
    assert Worker(poll_interval=5).poll_interval == 5.0
    assert Worker(poll_interval=timedelta(milliseconds=250)).poll_interval == 0.25


def test_a_receiver_error_costs_no_other_operation_of_the_batch_its_signal(monkeypatch, caplog):
    """The batch records quick successes together; a receiver that raised for the first one
    left the others finished but never announced."""
    from batchframework import signals
    from batchframework import worker as worker_module

    monkeypatch.setattr(worker_module, "DATABASE_ERROR_BACKOFF", 0.01)
    ops = [enqueue("test-noop") for _ in range(4)]
    announced: list[int] = []

    def buggy_receiver(sender, operation, **kwargs):
        announced.append(operation.pk)
        if len(announced) == 1:
            raise RuntimeError("a receiver's bug")

    signals.operation_finished.connect(buggy_receiver)
    try:
        assert Worker(max_operations=4, batch_size=4, poll_interval=0.05).run() == 4
    finally:
        signals.operation_finished.disconnect(buggy_receiver)
    assert sorted(announced) == sorted(op.pk for op in ops)
    assert BatchOperation.objects.successful().count() == 4
    assert "event=worker_error" in caplog.text and "a receiver's bug" in caplog.text
