"""What the Celery transport's messages carry (the drain messages' expiry, the chunk messages'
ids and ETAs), read straight from the Redis queue with no worker running, so a message that
would wake a worker at the wrong time or for the wrong operations is seen before any worker
could hide it."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework_celery.dispatcher import publish_operations
from batchframework_celery.poller import poll_once
from batchframework_celery.publish import bounded_publishing
from batchframework_celery.tasks import DRAIN_TASK, RUN_OPERATIONS_TASK, drain, run_operations

from .conftest import CELERY_DISPATCHER, NO_DISPATCH
from .helpers import waiting_messages as messages

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def test_the_pollers_drain_messages_expire_after_two_poll_intervals(purge_broker):
    """A drain that waited in the queue longer than two ticks is stale (a later tick sent fresh
    ones): each drain message carries that expiry, so a worker coming back after an outage
    discards the backlog instead of running one claim per stale message."""
    broker = purge_broker
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        enqueue("test-noop")
        before = timezone.now()
        assert poll_once()["drain_messages"] == 1
        after = timezone.now()
    [drain] = messages(broker)
    assert drain["task"] == DRAIN_TASK
    assert drain["args"] == ["default"] and drain["kwargs"] == {"using": "default"}
    interval = timedelta(seconds=NO_DISPATCH["POLL_INTERVAL"])
    assert drain["expires"] is not None, "a drain message must expire"
    assert before + 2 * interval <= drain["expires"] <= after + 2 * interval


def test_operations_due_within_a_millisecond_share_a_message_whose_eta_is_the_latest(
    celery_dispatch,
):
    """Operations due within ``CHUNK_SPREAD`` (1 ms) of the first of a chunk share its message,
    and that message's ETA is the latest due time among them: a message that arrived before
    one of its operations is due would claim nothing for it, and leave it to the poller, a poll
    interval late. Those due later start a chunk of their own; the items' order does not
    matter, and no chunk names more than ``BATCH_SIZE`` ids."""
    broker = celery_dispatch
    start = timezone.now() + timedelta(seconds=5)
    offsets_us = [0, 400, 1000, 2500, 2600]  # chunks: {0, 400, 1000} and {2500, 2600}
    items = [{"run_after": start + timedelta(microseconds=us)} for us in reversed(offsets_us)]
    ops = enqueue_many("test-noop", items)
    by_due = {op.run_after: op.pk for op in ops}
    due = [start + timedelta(microseconds=us) for us in offsets_us]

    found = messages(broker)
    assert all(m["task"] == RUN_OPERATIONS_TASK for m in found)
    chunks = sorted((m["eta"], sorted(m["args"][0])) for m in found)
    assert chunks == [
        (due[2], sorted(by_due[d] for d in due[:3])),
        (due[4], sorted(by_due[d] for d in due[3:])),
    ]
    for eta, ids in chunks:
        assert all(op.run_after <= eta for op in ops if op.pk in ids), "a message came early"


def test_a_chunk_of_operations_due_together_later_holds_at_most_batch_size_ids(
    purge_broker,
):
    """Operations due at the same future time are cut into chunks of ``BATCH_SIZE`` ids, like
    those due now: a worker claims a message's ids in one batch."""
    broker = purge_broker
    with override_settings(BATCHFRAMEWORK={**CELERY_DISPATCHER, "BATCH_SIZE": 2}):
        run_after = timezone.now() + timedelta(seconds=5)
        ops = enqueue_many("test-noop", [{} for _ in range(5)], run_after=run_after)
    found = messages(broker)
    assert sorted(len(m["args"][0]) for m in found) == [1, 2, 2]
    assert sorted(i for m in found for i in m["args"][0]) == sorted(op.pk for op in ops)
    assert all(m["eta"] == run_after for m in found)


def test_an_operation_to_be_claimed_alone_gets_a_message_of_its_own(
    celery_dispatch, django_assert_num_queries
):
    """Recovery marks the operations of a lost batch to be claimed alone, and a claim stops
    before such an operation: in a message shared with others, it and those after it would
    wait for the poller's drain. Published together (a retry, a replace or a postpone in one
    round with other operations; the poller's window), it gets a message of its own, and
    every message claims and runs what it names."""
    broker = celery_dispatch
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        ops = [enqueue("test-noop") for _ in range(4)]
    ids = [op.pk for op in ops]
    BatchOperation.objects.filter(pk=ids[1]).update(claimed_by="!isolated")
    # Loaded as the poller's window and the relay load them: deciding costs no query.
    loaded = list(
        BatchOperation.objects.filter(pk__in=ids)
        .only("pk", "run_after", "queue", "claimed_by")
        .order_by("pk")
    )
    with django_assert_num_queries(0):
        publish_operations(loaded, using="default")

    found = messages(broker)
    assert sorted(sorted(m["args"][0]) for m in found) == [sorted([ids[0], *ids[2:]]), [ids[1]]]
    assert all(m["eta"] is None for m in found)
    for message in found:
        run_operations(*message["args"], **message["kwargs"])
    finished = BatchOperation.objects.filter(pk__in=ids)
    assert {(op.result, op.attempts) for op in finished} == {(BatchOperation.RESULT_SUCCESSFUL, 1)}


def test_postponing_a_stale_instance_sends_what_the_database_holds(purge_broker):
    """A view postpones an operation it read before recovery marked it to be claimed alone.
    Published in one round with another operation (``PUBLISH_IN_BACKGROUND`` shares messages
    between the enqueues of a moment), it must still get a message of its own: the dispatcher
    is given the row, not the caller's stale instance."""
    broker = purge_broker
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        stale = enqueue("test-noop", delay=timedelta(hours=1))
    BatchOperation.objects.filter(pk=stale.pk).update(claimed_by="!isolated")
    background = {**CELERY_DISPATCHER, "PUBLISH_IN_BACKGROUND": True}
    with override_settings(BATCHFRAMEWORK=background), transaction.atomic():
        other = enqueue("test-noop")
        assert stale.postpone() is True
    bounded_publishing.drain()
    found = messages(broker)
    assert sorted(m["args"][0] for m in found) == [[stale.pk], [other.pk]]
    for message in found:
        run_operations(*message["args"], **message["kwargs"])
    ran = BatchOperation.objects.filter(pk__in=[stale.pk, other.pk])
    assert {op.result for op in ran} == {BatchOperation.RESULT_SUCCESSFUL}


def test_an_operation_cancelled_in_its_enqueuing_transaction_is_left_out_of_the_chunk(
    celery_dispatch,
):
    """Deleting an operation in the transaction that enqueued it sets the instance's ``pk`` to
    ``None`` before the round publishes, at commit. It is left out of the chunk message: a
    ``None`` among the ids would make the worker reject the whole message, and the chunk's
    other operations would wait for the poller."""
    broker = celery_dispatch
    with transaction.atomic():
        ops = enqueue_many("test-noop", [{} for _ in range(3)])
        ops[1].delete()
    kept = sorted([ops[0].pk, ops[2].pk])
    found = messages(broker)
    assert [sorted(m["args"][0]) for m in found] == [kept]
    for message in found:
        assert run_operations(*message["args"], **message["kwargs"]) == 2
    ran = BatchOperation.objects.filter(pk__in=kept)
    assert {op.result for op in ran} == {BatchOperation.RESULT_SUCCESSFUL}


def test_publishing_in_the_background_reads_no_instance_after_enqueue_returned(
    purge_broker, monkeypatch, caplog
):
    """``PUBLISH_IN_BACKGROUND`` publishes after ``enqueue`` returned, and the caller may have
    cancelled (deleted) the operation by then: the round publishes what the instances held at
    commit, not what they hold when it runs. The cancelled operation's message claims nothing;
    the one it shares with another still runs that one."""
    broker = purge_broker
    caplog.set_level(logging.INFO, logger="batchframework")
    # The round waits a moment for more enqueues to share its message; here long enough for
    # the cancel below to come first, as it may in any busy process.
    monkeypatch.setattr(bounded_publishing, "LINGER_SECONDS", 0.3)
    background = {**CELERY_DISPATCHER, "PUBLISH_IN_BACKGROUND": True}
    with override_settings(BATCHFRAMEWORK=background):
        keep = enqueue("test-noop")
        cancelled = enqueue("test-noop")
        cancelled_pk = cancelled.pk
        cancelled.delete()
        bounded_publishing.drain()
    found = messages(broker)
    assert [sorted(m["args"][0]) for m in found] == [sorted([keep.pk, cancelled_pk])]
    for message in found:
        assert run_operations(*message["args"], **message["kwargs"]) == 1
    keep.refresh_from_db()
    assert keep.result == BatchOperation.RESULT_SUCCESSFUL
    assert not [r for r in caplog.records if "event=message_rejected" in r.getMessage()]


def test_a_message_naming_an_id_no_operation_can_have_is_rejected_and_runs_nothing(caplog):
    """Ids must fit the id column (a signed 64-bit integer): one beyond it would fail the
    claim's query (SQLite: ``OverflowError``). The message is rejected with a log line, as
    one with any other malformed id; the largest id there can be is still accepted."""
    caplog.set_level(logging.ERROR, logger="batchframework")
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        op = enqueue("test-noop")
    assert run_operations([op.pk, 2**63]) == 0
    rejected = [
        r.getMessage() for r in caplog.records if "event=message_rejected" in r.getMessage()
    ]
    assert len(rejected) == 1 and "ids must be integers from 1 to" in rejected[0], rejected
    assert BatchOperation.objects.unprocessed().filter(pk=op.pk).exists()

    assert run_operations([op.pk, 2**63 - 1]) == 1
    op.refresh_from_db()
    assert op.result == BatchOperation.RESULT_SUCCESSFUL


def test_a_worker_without_the_handler_says_so(caplog):
    """A worker started before a handler was added (Celery does not reload) skipped its
    operations with an INFO line that named every reason but that one."""
    caplog.set_level(logging.INFO, logger="batchframework")
    unhandled = [
        BatchOperation.objects.create_asynchronous(operationtype="added-after-start")
        for _ in range(2)
    ]
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        handled = enqueue("test-noop")
        gone = enqueue("test-noop")
    gone.cancel()
    assert run_operations([*(op.pk for op in unhandled), handled.pk, gone.pk]) == 1
    warned = [r for r in caplog.records if "event=no_handler" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "operationtypes=added-after-start " in warned[0].getMessage()  # named once
    assert (
        BatchOperation.objects.unprocessed().filter(operationtype="added-after-start").count() == 2
    )

    caplog.clear()
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        cancelled = enqueue("test-noop")
    cancelled.cancel()
    assert run_operations([cancelled.pk]) == 0
    assert "event=no_handler" not in caplog.text  # gone: nothing waits for a handler


def test_a_drain_message_naming_a_queue_with_a_nul_is_rejected(caplog):
    """A queue name ``enqueue`` would refuse (here with a NUL, which PostgreSQL refuses in a
    query) is rejected with a log line, not run into a database error."""
    caplog.set_level(logging.ERROR, logger="batchframework")
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        op = enqueue("test-noop")
    assert drain(f"{op.queue}\x00") == 0
    rejected = [
        r.getMessage() for r in caplog.records if "event=message_rejected" in r.getMessage()
    ]
    assert len(rejected) == 1 and "bad queue name" in rejected[0], rejected
    assert BatchOperation.objects.unprocessed().filter(pk=op.pk).exists()


def test_an_operation_from_a_web_server_whose_clock_runs_ahead_still_gets_a_message(
    purge_broker, monkeypatch
):
    """The web process writes the operation's ``created_datetime``; the poller's window leaves
    to the publishers what falls due within the horizon of it. From a web server whose clock
    ran 3 s ahead, the relay (judging by a correct clock) left an operation due just beyond
    the horizon to the window, and the window left it to the relay: it waited for a drain."""
    from batchframework.clock import forget_clock_offsets

    quick = {**NO_DISPATCH, "DISPATCH_HORIZON": 2, "POLL_INTERVAL": 1}
    real_now = timezone.now
    with override_settings(BATCHFRAMEWORK=quick):
        ahead = timedelta(seconds=3)
        monkeypatch.setattr(timezone, "now", lambda: real_now() + ahead)
        # The model's default holds Django's own function, which the line above doesn't reach.
        created = BatchOperation._meta.get_field("created_datetime")
        monkeypatch.setattr(created, "_get_default", lambda: real_now() + ahead)
        forget_clock_offsets()  # measured again: the database is 3 s behind this "process"
        op = enqueue("test-noop", delay=timedelta(seconds=3.5))  # nothing published here
        monkeypatch.undo()
        forget_clock_offsets()
        # What a relay whose clock is right publishes of it: nothing, it is beyond the horizon.
        assert publish_operations([op]).published == 0
        scheduled = 0
        while timezone.now() < op.run_after:
            scheduled += poll_once()["scheduled"]
            time.sleep(0.5)
    assert scheduled == 1, "no message: the operation waits for a poller's drain"
    [message] = messages(purge_broker)
    assert message["args"] == [[op.pk]]


def test_a_worker_whose_clock_is_behind_still_publishes_what_the_poller_leaves_to_it(
    purge_broker, monkeypatch
):
    """The relay and a retry publish from a worker, judging the horizon by ``now``. On a worker
    whose clock is behind the database's, an operation due just inside the horizon looked
    beyond it, while the poller's window (on the database's clock) counted it as published:
    nobody sent it an ETA message, and it waited for a drain, up to a poll interval late. The
    horizon counts from the later of the two clocks (the offset the worker measured)."""
    from batchframework import clock
    from batchframework.conf import get_settings

    behind = timedelta(seconds=2)
    real_read = clock._read_database_time
    monkeypatch.setattr(clock, "_read_database_time", lambda using: real_read(using) + behind)
    clock.forget_clock_offsets()
    try:
        assert clock.clock_offset("default") >= behind - timedelta(milliseconds=50)
        horizon = get_settings().DISPATCH_HORIZON
        with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
            op = enqueue(
                "test-noop", run_after=clock.database_now() + horizon - timedelta(seconds=1)
            )
            publisher = publish_operations([op], using="default")
    finally:
        clock.forget_clock_offsets()
    assert publisher.published == 1
    [message] = messages(purge_broker)
    assert message["args"] == [[op.pk]]
