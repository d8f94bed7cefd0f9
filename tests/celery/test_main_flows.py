"""The main flows against both real brokers, Redis and RabbitMQ: an operation enqueued in a
view runs on a worker; delayed operations run on time and never early; a rolled-back enqueue
publishes nothing (we look into the broker's queue) and runs nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many
from tests.testapp.models import Execution

from .helpers import all_finished, assert_never_early, assert_ran_once_each, wait_for

pytestmark = [
    pytest.mark.celery,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(60),
    pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True),
]


def test_enqueued_operations_run_on_worker(broker, inprocess_worker):
    echo = enqueue("test-echo", input_data={"x": [1, "two"]})
    other = enqueue("test-other-queue")
    effects = [enqueue("test-effect").pk for _ in range(3)]
    ids = [echo.pk, other.pk, *effects]
    assert wait_for(all_finished(ids), timeout=15)
    echo.refresh_from_db()
    other.refresh_from_db()
    assert echo.output_data == {"echo": {"x": [1, "two"]}}
    assert other.output_data == "other" and other.queue == "other"
    assert_ran_once_each(effects)
    assert BatchOperation.objects.successful().count() == len(ids)


def test_delayed_operations_run_on_time_never_early(broker, inprocess_worker):
    due_in = [0.5, 1.0, 2.0]
    ids = [enqueue("test-effect", delay=timedelta(seconds=s)).pk for s in due_in]
    # A bulk enqueue due together: chunk messages, each with the chunk's due time as ETA.
    chunk = enqueue_many(
        "test-effect", [{} for _ in range(5)], run_after=timezone.now() + timedelta(seconds=1.5)
    )
    ids += [op.pk for op in chunk]
    # Nothing runs before it is due.
    assert BatchOperation.objects.filter(pk__in=ids).unprocessed().count() == len(ids)
    assert wait_for(all_finished(ids), timeout=10)
    assert_ran_once_each(ids)
    assert_never_early(ids, late_by=1.0)


def test_rollback_after_enqueue_publishes_nothing_and_runs_nothing(
    broker, celery_dispatch, start_inprocess_worker
):
    with pytest.raises(RuntimeError), transaction.atomic():
        enqueue("test-effect")
        enqueue("test-effect", delay=timedelta(seconds=1))
        enqueue_many("test-effect", [{}, {}])
        raise RuntimeError("the view failed after enqueueing")
    assert not BatchOperation.objects.exists()
    assert broker.total() == 0, "a rolled-back enqueue published a message"

    # The control: a committed enqueue does put a message where the probe looks.
    control = enqueue("test-effect")
    assert wait_for(lambda: broker.waiting("default") == 1, timeout=5)
    assert broker.total() == 1

    start_inprocess_worker()
    assert wait_for(all_finished([control.pk]), timeout=15)
    assert_ran_once_each([control.pk])
    # Only the control ran. (Not checked per rolled-back id: SQLite hands a rolled-back id
    # to the next insert, here the control.)
    assert Execution.objects.count() == 1
    assert wait_for(lambda: broker.total() == 0, timeout=5)
