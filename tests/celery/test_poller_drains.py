"""The poller's drain messages, against a real broker: they wake workers for due operations of
their own queue only, and they don't pile up in a queue no worker consumes (Redis keeps a
message until a consumer comes, however expired it is)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many, handler
from batchframework.clock import forget_clock_offsets
from batchframework.registry import registry
from batchframework_celery.models import PollerWatermark
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


@pytest.mark.parametrize("slow_by", [0.0, 0.8], ids=["clocks-agree", "poller-clock-0.8s-slow"])
def test_every_operation_the_pollers_window_takes_gets_its_eta_message(
    purge_broker, monkeypatch, slow_by
):
    """The window is measured on the database's clock, and the watermark moves past it; what
    it took must be published judged on that clock too. A poller whose process clock is
    behind the database's by over half a poll interval left the window's end unpublished."""
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() - timedelta(seconds=slow_by))
    forget_clock_offsets()
    try:
        with override_settings(
            BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
        ):
            enqueue("test-noop", delay=1.4)  # beyond the horizon, in this tick's window
            first = poll_once()
            second = poll_once()  # its window starts where the first one's ended
    finally:
        forget_clock_offsets()
    assert first["scheduled"] == 1, first
    assert first["scheduled_messages"] + second["scheduled_messages"] == 1, (first, second)
    assert purge_broker.waiting("default") == 1


def test_a_poller_without_an_operations_handler_still_publishes_it(purge_broker):
    """During a rolling deploy, a poller of the older release (no handler for a new type) took
    the window without the new type's operations, and moved the shared watermark past them:
    the newer release's poller never published them, and they ran a tick or more late."""
    handler("test-deploy-new")(lambda operation: None)
    try:
        with override_settings(
            BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
        ):
            enqueue("test-deploy-new", delay=1.4)  # beyond the horizon, in this tick's window
            registry.unregister("test-deploy-new")  # the older release's poller
            counts = poll_once()
    finally:
        registry.unregister("test-deploy-new")
    assert counts["scheduled"] == 1, counts
    assert purge_broker.waiting("default") == 1


def test_an_operation_without_a_message_runs_while_its_queue_never_empties(inprocess_worker):
    """Waiting messages count against the drains a tick sends, but a run_operations message
    runs only the ids it names: an operation due without a message (lost with the broker, or
    put back by lease recovery) must not wait for a busy queue to empty."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        lost = enqueue("test-noop")  # due, and no message will ever name it
    drains: list[int] = []
    work = 0.25  # seconds per operation; the in-process worker runs one at a time
    for _ in range(12):  # about 3 s of work waiting in "default", topped up below
        enqueue("test-sleep", input_data={"seconds": work})
    deadline = time.monotonic() + 10
    next_op = next_tick = time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_op:
            enqueue("test-sleep", input_data={"seconds": work})
            next_op += work
        if now >= next_tick:  # as beat would, every POLL_INTERVAL (1 s in these tests)
            drains.append(poll_once()["drain_messages"])
            next_tick += 1.0
        lost.refresh_from_db()
        if lost.status == BatchOperation.STATUS_FINISHED:
            break
        time.sleep(0.02)
    assert lost.status == BatchOperation.STATUS_FINISHED, f"drains per tick: {drains}"
    assert sum(drains) <= len(drains), "one drain per tick at most, while messages wait"


def test_pollers_ticking_at_once_for_the_first_time_all_succeed():
    """Two beats (a deployment's overlap) tick together on a database no poller has ticked on:
    the watermark both need is created by one of them, and no tick fails. Created under the
    row lock, as it once was, three first ticks deadlocked on MariaDB in about one round in
    four."""

    def tick(start: threading.Barrier, errors: list[BaseException]) -> None:
        try:
            start.wait(10)
            poll_once()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        for _ in range(12):
            PollerWatermark.objects.all().delete()
            start = threading.Barrier(3)
            errors: list[BaseException] = []
            threads = [threading.Thread(target=tick, args=(start, errors)) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert not any(thread.is_alive() for thread in threads)
            assert errors == []
            assert PollerWatermark.objects.count() == 1
