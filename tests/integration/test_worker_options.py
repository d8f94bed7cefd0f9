"""The DB-polling worker's options, through :class:`batchframework.worker.Worker` (what
``batchframework_worker`` runs): ``queues`` and ``max_operations``, and how long it sleeps."""

from __future__ import annotations

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
