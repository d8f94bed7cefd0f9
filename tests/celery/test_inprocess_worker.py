import time
from datetime import timedelta

import pytest
from django.utils import timezone

from batchframework import BatchOperation, enqueue

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True)]


def wait_for(predicate, timeout=15.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


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
