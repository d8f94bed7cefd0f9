"""The database is the source of truth: a broker that is down or flushed never fails the caller
and never loses an operation; duplicate messages, a message racing the poller, and two pollers
at once never run an operation twice (each test-effect run writes a unique Effect row)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest
from django.db import close_old_connections, connection, transaction
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework.engine import claim
from batchframework_celery.poller import poll_once
from batchframework_celery.publish import bounded_publishing
from batchframework_celery.tasks import drain, run_operations
from tests.celery_app import app as celery_app

from .conftest import CELERY_DISPATCHER, NO_DISPATCH
from .helpers import (
    all_finished,
    assert_never_early,
    assert_ran_once_each,
    executions,
    use_broker,
    wait_for,
)

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

#: A port nothing listens on: connecting is refused at once.
DEAD_BROKER = "redis://127.0.0.1:1/15"


def poll_until(ids: list[int], timeout: float, interval: float = 1.0) -> None:
    """Do what celery beat does, every ``interval`` seconds, until the operations finished."""
    deadline = time.monotonic() + timeout
    while not all_finished(ids)() and time.monotonic() < deadline:
        poll_once()
        time.sleep(interval)
    assert all_finished(ids)(), list(
        BatchOperation.objects.filter(pk__in=ids).values_list("pk", "status")
    )


def in_threads(*targets, timeout: float = 30) -> None:
    """Run the callables at once (released together by a barrier); re-raise their errors."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target):
        try:
            barrier.wait(timeout=10)
            target()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    if errors:
        raise errors[0]


def test_broker_down_at_enqueue_returns_quickly_and_the_poller_runs_it(
    celery_dispatch, start_inprocess_worker, caplog
):
    broker = celery_dispatch
    caplog.set_level(logging.WARNING, logger="batchframework")
    with use_broker(celery_app, DEAD_BROKER):
        started = time.monotonic()
        with transaction.atomic():  # like a view under ATOMIC_REQUESTS: publish at commit
            now = enqueue("test-effect")
            soon = enqueue("test-effect", delay=timedelta(seconds=1))
            # Three chunk messages in one dispatch round: one attempt, then the round stops.
            many = enqueue_many("test-effect", [{} for _ in range(120)], run_after=timezone.now())
        elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"enqueue blocked {elapsed:.2f}s on a dead broker"
    ids = [now.pk, soon.pk, *(op.pk for op in many)]
    # Committed, and nothing reached the (real) broker.
    assert BatchOperation.objects.filter(pk__in=ids).unprocessed().count() == len(ids)
    failures = [r for r in caplog.records if "event=publish_failed" in r.getMessage()]
    assert failures and all(r.levelno == logging.WARNING for r in failures)
    assert "fallback=poller" in failures[0].getMessage()
    # One connection attempt in all: the first round fails, and the later rounds (the second
    # enqueue, the bulk enqueue) are skipped at once while the broker is known to be down.
    assert len(failures) == 1, [r.getMessage() for r in failures]
    skipped = [r for r in caplog.records if "event=publish_skipped" in r.getMessage()]
    assert len(skipped) == 2 and all(
        "reason=broker_recently_down" in r.getMessage() for r in skipped
    )
    assert broker.total() == 0
    bounded_publishing.reset()

    # The broker is back (the app's own broker): the poller finds the due operations.
    start_inprocess_worker()
    poll_until(ids, timeout=15)
    assert_ran_once_each(ids)
    assert_never_early(ids, late_by=10)


@pytest.mark.parametrize("when", ["before_delivery", "while_the_worker_holds_them"])
def test_redis_flushed_with_100_delayed_operations_pending_all_run_once(
    when, celery_dispatch, start_inprocess_worker
):
    broker = celery_dispatch
    ids = [enqueue("test-effect", delay=timedelta(seconds=2)).pk for _ in range(100)]
    assert broker.waiting("default") == 100
    if when == "while_the_worker_holds_them":
        start_inprocess_worker()
        assert wait_for(lambda: broker.unacked() == 100, timeout=10)
    broker.redis.flushdb()  # the broker lost every message (a restart without persistence)
    assert broker.total() == 0
    if when == "before_delivery":
        start_inprocess_worker()
    poll_until(ids, timeout=30)
    assert_ran_once_each(ids)
    assert_never_early(ids, late_by=15)


def test_messages_racing_the_poller_and_another_worker_run_each_operation_once(
    celery_dispatch, start_inprocess_worker
):
    ops = enqueue_many("test-effect", [{} for _ in range(120)])  # chunk messages are waiting
    ids = [op.pk for op in ops]
    start_inprocess_worker()  # consumes the chunk messages, and the poller's drains

    def poller():
        for _ in range(3):
            poll_once()
            drain("default")

    def second_worker():  # got the same chunk messages (a redelivery) and runs them itself
        for start in range(0, len(ids), 50):
            run_operations(ids[start : start + 50])

    in_threads(poller, second_worker, lambda: drain("default"))
    assert wait_for(all_finished(ids), timeout=20)
    assert_ran_once_each(ids)


def test_two_pollers_at_once_run_each_operation_once(celery_dispatch, start_inprocess_worker):
    broker = celery_dispatch
    short_horizon = {**CELERY_DISPATCHER, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):  # only the pollers know about these
        due = [op.pk for op in enqueue_many("test-effect", [{} for _ in range(60)])]
        # A running operation whose worker died ten minutes ago: its lease has expired.
        lost = enqueue(
            "test-sleep",
            input_data={"seconds": 0.1},
            run_after=timezone.now() - timedelta(minutes=20),
        )
        assert claim(lost.pk, now=timezone.now() - timedelta(minutes=10)) is not None
    with override_settings(BATCHFRAMEWORK=short_horizon):
        # Beyond the (1 s) horizon when enqueued, due before the pollers' next tick.
        soon = [enqueue("test-effect", delay=timedelta(seconds=1.5)).pk for _ in range(5)]
        assert broker.total() == 0
        results: list[dict[str, int]] = []

        def poller():
            close_old_connections()
            results.append(poll_once())

        in_threads(poller, poller)
    assert sum(r["recovered"] for r in results) == 1, results
    assert sum(r["drain_messages"] for r in results) >= 2
    assert sum(r["scheduled"] for r in results) == len(soon), "the window is taken once"

    start_inprocess_worker()
    ids = [*due, *soon, lost.pk]
    assert wait_for(all_finished(ids), timeout=20)
    assert_ran_once_each([*due, *soon])
    assert_never_early(soon, late_by=1.0)
    lost.refresh_from_db()
    assert (lost.result, lost.attempts, executions(lost.pk)) == (
        BatchOperation.RESULT_SUCCESSFUL,
        2,
        1,
    )


def test_publishing_in_the_background_returns_at_once_and_still_publishes(
    celery_dispatch, start_inprocess_worker
):
    broker = celery_dispatch
    background = {**CELERY_DISPATCHER, "PUBLISH_IN_BACKGROUND": True}
    with override_settings(BATCHFRAMEWORK=background):
        # A dead broker: the caller does not even wait for the failed connection attempt.
        with use_broker(celery_app, DEAD_BROKER):
            started = time.monotonic()
            with transaction.atomic():
                lost = enqueue("test-effect")
            elapsed = time.monotonic() - started
            bounded_publishing.drain()
        assert elapsed < 0.5, f"enqueue waited {elapsed:.2f}s with PUBLISH_IN_BACKGROUND"
        assert broker.total() == 0
        bounded_publishing.reset()
        # A live broker: the message is published once the background round has run.
        with transaction.atomic():
            sent = enqueue("test-effect")
        bounded_publishing.drain()
        assert broker.total() == 1
    start_inprocess_worker()
    poll_until([lost.pk, sent.pk], timeout=15)  # the lost message's operation via the poller
    assert_ran_once_each([lost.pk, sent.pk])
