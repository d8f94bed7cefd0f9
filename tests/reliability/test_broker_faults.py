"""Reliability scenarios 4-7 (issue E): the broker is down, a transaction rolls back, an ETA
outlives the visibility timeout, the broker loses its state. Each test has a private Redis
(see :mod:`.servers`), so killing, freezing or restarting it touches nobody else.

Invariants 5 (transactional enqueue) and 6 (the database is the source of truth).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from types import SimpleNamespace
from unittest import mock

import pytest
from django.db import transaction
from django.http import HttpResponse
from django.test import RequestFactory

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework.conf import get_settings
from batchframework_celery.publish import Publisher, bounded_publishing
from batchframework_celery.tasks import drain, run_operations
from tests.integration.helpers import wait_for as wait_until
from tests.testapp.models import Effect, Execution

from .conftest import OTHER_ALIAS, celery_on

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

POLL = 1.0
#: Allowance on top of a poll interval for a drain message to reach a worker and be claimed.
GRACE = 2.0


def _runs(ids: list[int]) -> dict[int, int]:
    keys = {str(pk): pk for pk in ids}
    counts = dict.fromkeys(ids, 0)
    for key in Execution.objects.filter(key__in=keys).values_list("key", flat=True):
        counts[keys[key]] += 1
    return counts


def _lateness(ids: list[int]) -> list[float]:
    return [
        (op.started_running_datetime - op.run_after).total_seconds()
        for op in BatchOperation.objects.filter(pk__in=ids)
    ]


def create_post_view(request, *, delay: float) -> HttpResponse:
    """A view as a user writes it: save, and schedule an e-mail, in one transaction."""
    with transaction.atomic():
        operation = enqueue("test-effect", delay=timedelta(seconds=delay))
    return HttpResponse(str(operation.pk), status=201)


def _warm_up(private_redis) -> None:
    """Publish once and see it run, so this process holds a pooled broker connection, as a
    web process that has served requests does."""
    op = enqueue("test-effect")
    wait_until(
        lambda: BatchOperation.objects.finished().filter(pk=op.pk).exists(),
        timeout=20,
        what="the warm-up operation",
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_broker_down_at_commit(fault, private_redis, processes, reliability_report):
    """Scenario 4: Redis is down when a view commits an ``enqueue`` → the view responds
    within 2 s with the row committed; Redis comes back → the operation runs within one poll
    interval (plus a small grace) after it is due, once.

    ``killed``: ``kill -9`` (connections refused). ``frozen``: ``SIGSTOP`` (connections hang:
    the port accepts but nothing answers, like a broker that is overloaded or cut off).
    """
    delay = 5.0
    procs = processes(private_redis.url(), poll_interval=POLL)
    procs.celery_worker(f"broker-{fault}", concurrency=1)
    procs.poller()
    request = RequestFactory().post("/posts/")
    with celery_on(private_redis.url()):
        _warm_up(private_redis)
        getattr(private_redis, {"killed": "kill", "frozen": "freeze"}[fault])()
        try:
            started = time.monotonic()
            response = create_post_view(request, delay=delay)
            response_seconds = time.monotonic() - started
        finally:
            if fault == "killed":
                private_redis.start()
            else:
                private_redis.thaw()
    pk = int(response.content)
    assert response.status_code == 201
    assert BatchOperation.objects.filter(pk=pk).exists(), "the operation was not committed"
    wait_until(
        lambda: BatchOperation.objects.finished().filter(pk=pk).exists(),
        timeout=delay + 20,
        what="the operation to run once the broker is back",
    )
    time.sleep(POLL)
    late = _lateness([pk])[0]
    runs = _runs([pk])[pk]
    reliability_report(
        f"4-{fault}",
        operations=1,
        runs=runs,
        duplicates=max(0, runs - 1),
        lost=int(not BatchOperation.objects.successful().filter(pk=pk).exists()),
        seconds=response_seconds,
        late_by=late,
    )
    assert response_seconds < 2.0, f"enqueue blocked the view for {response_seconds:.2f}s"
    assert runs == 1
    assert 0 <= late <= POLL + GRACE, f"ran {late:.2f}s after it was due"


def _events(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]


#: The back-off after a failed publish (``POLL_INTERVAL``), longer than the tests' 1 s so that
#: a stalled round that comes through does not end it.
BACK_OFF = 3.0


@pytest.mark.timeout(60)
def test_after_a_publish_timed_out_enqueues_skip_the_broker_until_a_poll_interval_passed(
    private_redis, caplog
):
    """A broker that stalls for a moment (frozen: a fork for a snapshot, a network blip)
    makes one enqueue wait ``PUBLISH_TIMEOUT``. Its round gets through once the broker
    answers; but when the broker stalls again within ``POLL_INTERVAL`` of that timeout, the
    next enqueue returns at once and leaves its operation to the poller (``publish_skipped``,
    ``broker_recently_down``) instead of waiting on the broker again. Once ``POLL_INTERVAL``
    has passed, enqueues publish again."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    with celery_on(private_redis.url(), POLL_INTERVAL=BACK_OFF):
        timeout = get_settings().PUBLISH_TIMEOUT.total_seconds()
        enqueue("test-effect")  # this process now holds a pooled connection, as a web one does
        assert private_redis.waiting() == 1
        private_redis.freeze()
        try:
            started = time.monotonic()
            enqueue("test-effect")
            timed_out_at = time.monotonic()
        finally:
            private_redis.thaw()
        bounded_publishing.drain()  # the stalled round, which the broker now answers
        assert timed_out_at - started >= timeout * 0.9
        assert len(_events(caplog, "publish_timeout")) == 1, caplog.text
        assert private_redis.waiting() == 2, "the stalled round got through once it answered"
        assert not _events(caplog, "publish_failed"), caplog.text

        private_redis.freeze()  # stalls again, within the back-off
        try:
            started = time.monotonic()
            skipped = enqueue("test-effect")
            elapsed = time.monotonic() - started
        finally:
            private_redis.thaw()
        assert time.monotonic() - timed_out_at < BACK_OFF
        assert elapsed < 0.5, f"enqueue waited {elapsed:.2f}s on the stalled broker again"
        assert len(_events(caplog, "publish_timeout")) == 1, caplog.text
        skips = _events(caplog, "publish_skipped")
        assert len(skips) == 1 and "reason=broker_recently_down" in skips[0], skips
        assert BatchOperation.objects.unprocessed().filter(pk=skipped.pk).exists()

        time.sleep(max(0.0, timed_out_at + BACK_OFF + 0.2 - time.monotonic()))
        enqueue("test-effect")  # the back-off is over: published at once
        assert private_redis.waiting() == 3
        assert len(_events(caplog, "publish_skipped")) == 1, caplog.text


@pytest.mark.timeout(60)
def test_after_a_publish_round_failed_with_a_bug_enqueues_skip_the_broker_for_a_poll_interval(
    private_redis, caplog
):
    """A publish round that fails with something other than a broker error (a bug: here
    injected into the round) never reaches the caller: it is logged as ``publish_failed``, and
    like a broker failure it leaves the enqueues of the next ``POLL_INTERVAL`` to the poller at
    once (``publish_skipped``, ``broker_recently_down``), though the broker is up. After that,
    enqueues publish again."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    bug = RuntimeError("a bug in the publish round")
    with celery_on(private_redis.url(), POLL_INTERVAL=BACK_OFF):
        with mock.patch(
            "batchframework_celery.dispatcher.publish_operations", side_effect=bug
        ) as round_:
            failed = enqueue("test-effect")
            failed_at = time.monotonic()
        assert round_.call_count == 1
        failures = _events(caplog, "publish_failed")
        assert len(failures) == 1 and "a bug in the publish round" in failures[0], failures

        started = time.monotonic()
        skipped = enqueue("test-effect")
        elapsed = time.monotonic() - started
        assert time.monotonic() - failed_at < BACK_OFF
        assert elapsed < 0.5, f"enqueue took {elapsed:.2f}s"
        skips = _events(caplog, "publish_skipped")
        assert len(skips) == 1 and "reason=broker_recently_down" in skips[0], skips
        assert private_redis.messages() == 0, "published within the back-off"
        unprocessed = BatchOperation.objects.unprocessed().filter(pk__in=[failed.pk, skipped.pk])
        assert unprocessed.count() == 2, "both are left to the poller"

        time.sleep(max(0.0, failed_at + BACK_OFF + 0.2 - time.monotonic()))
        enqueue("test-effect")  # the back-off is over: published at once
        assert private_redis.waiting() == 1
        assert len(_events(caplog, "publish_skipped")) == 1, caplog.text


ENQUEUE_AND_EXIT = """
import time, django
django.setup()
from tests.celery_app import app
# Celery's defaults (no socket timeout): a read from a frozen broker then blocks for good.
app.conf.broker_transport_options = {}
from batchframework import enqueue
started = time.monotonic()
enqueue("test-effect")
print(f"enqueue returned after {time.monotonic() - started:.2f}s", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_process_that_enqueued_to_a_frozen_broker_exits(private_redis, processes):
    """A management command or script enqueues while the broker is frozen: ``enqueue``
    returns within ``PUBLISH_TIMEOUT``, and the process exits within it again (the wait at
    exit for a round still publishing), not when the broker answers (never, here)."""
    private_redis.freeze()
    proc = processes(private_redis.url()).start("enqueue", [sys.executable, "-c", ENQUEUE_AND_EXIT])
    proc.wait_log("enqueue returned", timeout=30)
    returned = time.monotonic()
    try:
        code = proc.popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after enqueue returned:\n{proc.log()}") from None
    exited_after = time.monotonic() - returned
    assert code == 0, proc.log()
    bound = get_settings().PUBLISH_TIMEOUT.total_seconds() + 2.0  # the same in the child
    assert exited_after < bound, f"exited {exited_after:.1f}s after enqueue returned"
    assert BatchOperation.objects.unprocessed().count() == 1  # committed, left to the poller


ENQUEUE_ONCE_IN_BACKGROUND = """
import django
django.setup()
from django.conf import settings
from django.test import override_settings
from tests.celery_app import app
from batchframework import enqueue
with override_settings(BATCHFRAMEWORK={**settings.BATCHFRAMEWORK, "PUBLISH_IN_BACKGROUND": True}):
    enqueue("test-effect")
    print("enqueued", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_processs_first_enqueue_in_background_is_published(private_redis, processes):
    """A new process (a script, a command, each web worker) enqueues once with
    ``PUBLISH_IN_BACKGROUND``: that first operation is published (by the background thread,
    or at the latest when the process exits), not left to the poller's next drain."""
    proc = processes(private_redis.url()).start(
        "enqueue", [sys.executable, "-c", ENQUEUE_ONCE_IN_BACKGROUND]
    )
    assert proc.popen.wait(timeout=30) == 0, proc.log()
    assert "enqueued" in proc.log()
    assert private_redis.waiting() == 1, proc.log()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_inherit_its_parents_pending_publishes(settings):
    """A process forks (prefork web server, ``multiprocessing``) while a publish round of its
    own is still waiting on the broker. That round lives on the parent's thread, which the
    child does not have: the child must publish its own rounds, not judge them stuck behind
    a round it will never see finish."""
    from batchframework_celery.publish import BoundedPublishing

    settings.BATCHFRAMEWORK = {**settings.BATCHFRAMEWORK, "PUBLISH_IN_BACKGROUND": True}
    publishing = BoundedPublishing()
    broker_answers = threading.Event()

    def stalled(ops, using):
        broker_answers.wait()
        return SimpleNamespace(broker_down=False)

    def piped(ops, using):
        os.write(write_end, ",".join(ops).encode())
        return SimpleNamespace(broker_down=False)

    publishing.run(["parent"], using="default", publish=stalled)
    timeout = get_settings().PUBLISH_TIMEOUT.total_seconds()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no database, no broker, only the publishing machinery
        try:
            time.sleep(timeout + 0.2)  # the parent's round now looks stuck
            settings.BATCHFRAMEWORK = {**settings.BATCHFRAMEWORK, "PUBLISH_IN_BACKGROUND": False}
            publishing.run(["child"], using="default", publish=piped)
        finally:
            os._exit(0)
    try:
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        published = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
        broker_answers.set()
        publishing.drain()
    assert os.waitstatus_to_exitcode(status) == 0
    assert published == "child", "the child skipped its publish behind the parent's round"


@pytest.mark.timeout(60)
@pytest.mark.django_db(transaction=True, databases=["default", OTHER_ALIAS])
@pytest.mark.parametrize("alias", ["default", OTHER_ALIAS])
def test_rollback_leaves_no_row_and_publishes_nothing(alias, private_redis, reliability_report):
    """Scenario 5: ``enqueue`` then an exception in the same transaction (also: a rolled-back
    savepoint inside a committed transaction, and ``enqueue_many``) → no row, no message in
    the broker, nothing runs; on the default and on a second database alias."""
    started = time.monotonic()
    pks: list[int] = []
    with celery_on(private_redis.url()):
        with pytest.raises(RuntimeError), transaction.atomic(using=alias):
            pks.append(enqueue("test-effect", using=alias).pk)
            raise RuntimeError("the view failed after enqueue")
        with pytest.raises(RuntimeError), transaction.atomic(using=alias):
            pks += [op.pk for op in enqueue_many("test-effect", [{}] * 3, using=alias)]
            raise RuntimeError("the view failed after enqueue_many")
        with transaction.atomic(using=alias):
            try:
                with transaction.atomic(using=alias):
                    pks.append(enqueue("test-effect", using=alias).pk)
                    raise RuntimeError("the savepoint rolls back")
            except RuntimeError:
                pass
        time.sleep(0.2)
        rows = BatchOperation.objects.using(alias).filter(pk__in=pks).count()
        messages = private_redis.messages()
        ran = drain("default", using=None if alias == "default" else alias)
        # The probe sees a message when there is one: the same enqueue, committed.
        with transaction.atomic(using=alias):
            committed = enqueue("test-effect", using=alias)
        control_messages = private_redis.messages()
        control_rows = BatchOperation.objects.using(alias).filter(pk=committed.pk).count()
    reliability_report(
        f"5-{alias}",
        operations=len(pks),
        runs=ran + Execution.objects.count(),
        duplicates=0,
        lost=0,
        seconds=time.monotonic() - started,
        rows=rows,
        messages=messages,
        control_messages=control_messages,
    )
    assert rows == 0
    assert messages == 0
    assert ran == 0 and not Execution.objects.exists() and not Effect.objects.exists()
    assert (control_rows, control_messages) == (1, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker_dies", [False, True])
def test_a_publish_round_reaches_the_broker_in_one_exchange_at_its_end(
    broker_dies, private_redis, caplog
):
    """The messages of a round (a poller tick, an ``enqueue_many``) are sent together when the
    round ends: none is in the broker before, all are after. A broker that dies before the end
    loses the whole round, which is counted failed and logged once, for the poller to redo."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    with celery_on(private_redis.url()):
        with Publisher() as publisher:
            for ids in ([1, 2], [3], [4, 5, 6]):
                assert publisher.publish(run_operations, [ids], queue="default")
            assert private_redis.messages() == 0  # buffered, not sent one by one
            if broker_dies:
                private_redis.kill()
        failures = [r.getMessage() for r in caplog.records if "publish_failed" in r.getMessage()]
        if broker_dies:
            assert (publisher.published, publisher.failed, publisher.broker_down) == (0, 3, True)
            assert len(failures) == 1 and "count=3" in failures[0], failures
        else:
            assert (publisher.published, publisher.failed, publisher.broker_down) == (3, 0, False)
            assert private_redis.waiting("default") == 3 and not failures


RECEIVED = re.compile(r"Task batchframework\.run_operations\[([0-9a-f-]+)\] received")


@pytest.mark.timeout(90)
def test_eta_longer_than_visibility_timeout_runs_once(private_redis, processes, reliability_report):
    """Scenario 6: a visibility timeout of 3 s, and a message whose ETA lies 12 s ahead (a
    dispatch horizon set far beyond the visibility timeout, which the system check warns
    about) → Redis hands the unacknowledged message out again, more than one worker holds it
    until its ETA; the operation runs exactly once."""
    visibility = 3.0
    delay = 12.0
    procs = processes(
        private_redis.url(), poll_interval=POLL, visibility_timeout=visibility, restore_interval=1
    )
    workers = [procs.celery_worker(f"eta{i}", concurrency=1, ready=False) for i in range(2)]
    for worker in workers:
        worker.wait_log(r"\bready\.", timeout=90)
    started = time.monotonic()
    with celery_on(
        private_redis.url(),
        transport_options={"visibility_timeout": visibility},
        DISPATCH_HORIZON=60,
    ):
        op = enqueue("test-effect", delay=timedelta(seconds=delay))
    wait_until(
        lambda: BatchOperation.objects.finished().filter(pk=op.pk).exists(),
        timeout=delay + 30,
        what="the operation to run",
    )
    time.sleep(2)  # every held copy has fired by now
    logs = procs.logs()
    deliveries = len(RECEIVED.findall(logs))
    message_ids = set(RECEIVED.findall(logs))
    noops = logs.count("event=message_noop")
    runs = _runs([op.pk])[op.pk]
    reliability_report(
        6,
        operations=1,
        runs=runs,
        duplicates=max(0, runs - 1),
        lost=int(not BatchOperation.objects.successful().filter(pk=op.pk).exists()),
        seconds=time.monotonic() - started,
        deliveries=deliveries,
        messages=len(message_ids),
        noops=noops,
        late_by=_lateness([op.pk])[0],
    )
    assert len(message_ids) == 1
    assert deliveries >= 2, "the broker should have delivered the ETA message again"
    assert runs == 1
    assert Effect.objects.filter(key=str(op.pk)).count() == 1
    assert noops >= 1, "a duplicate delivery that ran nothing should say so"
    assert _lateness([op.pk])[0] >= 0


class _Supervisor:
    """Restarts a Celery worker that exits, as systemd's ``Restart=always`` would: kombu
    5.7's Redis transport crashes the worker ("Unrecoverable error: AttributeError(\"'NoneType'
    object has no attribute 'hostname'\")" in ``restore_unacked``) when the broker connection
    drops while it holds unacknowledged (ETA) messages."""

    def __init__(self, procs, name: str) -> None:
        self.procs, self.name = procs, name
        self.worker = procs.celery_worker(name, concurrency=2)
        self.restarts = 0
        self.crash_lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            if not self.worker.alive():
                self.crash_lines += [
                    line for line in self.worker.log().splitlines() if "Unrecoverable error" in line
                ]
                self.restarts += 1
                self.worker = self.procs.celery_worker(
                    f"{self.name}-r{self.restarts}", concurrency=2, ready=False
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.mark.timeout(120)
def test_broker_state_lost_every_operation_runs_once(private_redis, processes, reliability_report):
    """Scenario 7: 100 delayed operations published (ETA messages, held by the worker), then
    the broker restarted without persistence → all 100 run, once each, no later than their
    due time + a poll interval + a small grace. The worker runs under a supervisor (see
    :class:`_Supervisor`); ``worker_crashes`` in the figure counts its restarts."""
    total = 100
    procs = processes(private_redis.url(), poll_interval=POLL)
    supervisor = _Supervisor(procs, "lost-state")
    procs.poller()
    started = time.monotonic()
    try:
        with celery_on(private_redis.url()):
            ops = enqueue_many("test-effect", [{"delay": 8 + i * 0.04} for i in range(total)])
        ids = [op.pk for op in ops]
        wait_until(
            lambda: private_redis.unacked() > 0 and private_redis.waiting() == 0,
            timeout=10,
            what="the worker to take the ETA messages",
        )
        held = private_redis.unacked()
        private_redis.restart()
        assert private_redis.messages() == 0
        wait_until(
            lambda: BatchOperation.objects.finished().filter(pk__in=ids).count() == total,
            timeout=40,
            what="all 100 operations to run",
        )
        time.sleep(POLL + 0.5)
    finally:
        supervisor.stop()
    runs = _runs(ids)
    late = _lateness(ids)
    successful = BatchOperation.objects.filter(pk__in=ids).successful().count()
    reliability_report(
        7,
        operations=total,
        runs=sum(runs.values()),
        duplicates=sum(n - 1 for n in runs.values() if n > 1),
        lost=total - successful,
        seconds=time.monotonic() - started,
        held_before_restart=held,
        max_late_by=max(late),
        early=sum(1 for x in late if x < 0),
        worker_crashes=supervisor.restarts,
    )
    if supervisor.crash_lines:
        print("worker crash on broker restart:", supervisor.crash_lines[0], flush=True)
    assert set(runs.values()) == {1}, {k: v for k, v in runs.items() if v != 1}
    assert successful == total
    assert min(late) >= 0
    assert max(late) <= POLL + GRACE, f"latest ran {max(late):.2f}s after it was due"
