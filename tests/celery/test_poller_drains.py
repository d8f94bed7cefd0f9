"""The poller's drain messages, against a real broker: they wake workers for due operations of
their own queue only, and they don't pile up in a queue no worker consumes (Redis keeps a
message until a consumer comes, however expired it is)."""

from __future__ import annotations

import pytest
from django.test import override_settings

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework_celery.poller import poll_once
from batchframework_celery.tasks import drain

from .conftest import NO_DISPATCH
from .helpers import all_finished, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_drains_wait_in_a_queue_nobody_consumes_without_piling_up(purge_broker):
    broker = purge_broker
    # Five due operations on "other", no worker; NO_DISPATCH: only the poller publishes.
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "BATCH_SIZE": 2}):
        enqueue_many("test-other-queue", [{}] * 5)
        published = [poll_once()["drain_messages"] for _ in range(4)]
        assert published == [3, 0, 0, 0]  # ceil(5 / 2) drains, then those still wait
        assert broker.waiting("other") == 3
        broker.purge()  # messages lost with the broker's state
        assert poll_once()["drain_messages"] == 3  # the database still says what is due
    assert broker.waiting("other") == 3


def test_a_drain_claims_only_operations_of_its_own_queue(inprocess_worker):
    """A drain for a queue runs that queue's due operations and leaves the others' to their
    own workers (which may run elsewhere, with other resources or handlers)."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):  # their messages were lost
        other = enqueue("test-other-queue")
        default = enqueue("test-noop")
    drain.apply_async(args=["other"], kwargs={"using": "default"}, queue="other")
    assert wait_for(all_finished([other.pk]), timeout=15)
    default.refresh_from_db()
    assert (default.status, default.attempts) == (BatchOperation.STATUS_UNPROCESSED, 0)
