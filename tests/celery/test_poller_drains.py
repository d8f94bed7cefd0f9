"""The poller's drain messages, against a real broker: they wake workers for due operations,
and they don't pile up in a queue no worker consumes (Redis keeps a message until a consumer
comes, however expired it is)."""

from __future__ import annotations

import pytest
from django.test import override_settings

from batchframework import enqueue_many
from batchframework_celery.poller import poll_once

from .conftest import NO_DISPATCH

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
