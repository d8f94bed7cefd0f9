"""Scenario 14: time → never early, once each.

- Due times across Oslo's DST changes (``TIME_ZONE = "Europe/Oslo"``): ``run_after`` given as an
  aware Oslo datetime on either side of 2026-10-25 (the repeated hour, both folds) and
  2027-03-28 (the skipped hour), judged with ``run_due(now=…)`` microsecond by microsecond
  around each due instant; and a ``delay`` that spans the change is an absolute duration.
- A ``TIME_ZONE`` setting change between enqueue and run changes no due instant.
- Web and worker processes whose clocks disagree (simulated by moving
  ``django.utils.timezone.now`` in one process): workers judge due-ness by the database clock, so
  a worker whose clock is fast never runs early, one whose clock is slow is not late; and a web
  process whose clock is slow must not make a delayed operation run early either.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, enqueue
from batchframework.clock import forget_clock_offsets
from batchframework.engine import claim_due, release
from batchframework.testing import run_due
from tests.testapp.models import Execution

from .pg_private import Processes, subprocess_env, wait_until

pytestmark = [pytest.mark.reliability]

OSLO = ZoneInfo("Europe/Oslo")
US = timedelta(microseconds=1)
_real_now = timezone.now


def _runs(ids) -> dict[int, int]:
    counts = {pk: 0 for pk in ids}
    for key in Execution.objects.filter(key__in=[str(pk) for pk in ids]).values_list(
        "key", flat=True
    ):
        counts[int(key)] += 1
    return counts


# --- In-process: DST and TIME_ZONE changes (every database) ----------------------------------
@pytest.fixture(autouse=True)
def _postgresql_only(request):
    """Overrides the suite's PostgreSQL-only gate for the in-process tests of this module;
    the subprocess tests still need PostgreSQL."""
    from django.db import connection

    db_marker = request.node.get_closest_marker("django_db")
    subprocesses = bool(db_marker and db_marker.kwargs.get("transaction"))
    if subprocesses and connection.vendor != "postgresql":
        pytest.skip("the subprocess time tests run on PostgreSQL")


DUE_TIMES = {
    "before-fall-back": datetime(2026, 10, 25, 1, 59, 59, tzinfo=OSLO),
    "repeated-hour-first": datetime(2026, 10, 25, 2, 30, tzinfo=OSLO, fold=0),  # 00:30 UTC
    "repeated-hour-second": datetime(2026, 10, 25, 2, 30, tzinfo=OSLO, fold=1),  # 01:30 UTC
    "after-fall-back": datetime(2026, 10, 25, 3, 0, tzinfo=OSLO),
    "before-spring-forward": datetime(2027, 3, 28, 1, 59, 59, 999999, tzinfo=OSLO),
    "after-spring-forward": datetime(2027, 3, 28, 3, 0, tzinfo=OSLO),  # 01:00 UTC
}


@pytest.mark.django_db
@pytest.mark.timeout(60)
def test_due_times_across_dst_changes(reliability_report):
    started = time.monotonic()
    ops = {name: enqueue("test-effect", run_after=due) for name, due in DUE_TIMES.items()}
    due_utc = {ops[name].pk: due.astimezone(UTC) for name, due in DUE_TIMES.items()}
    # Stored as the same instants (the two 02:30s of 2026-10-25 are an hour apart).
    for name, op in ops.items():
        op.refresh_from_db()
        assert op.run_after == DUE_TIMES[name].astimezone(UTC), name
    assert due_utc[ops["repeated-hour-second"].pk] - due_utc[
        ops["repeated-hour-first"].pk
    ] == timedelta(hours=1)

    early = 0
    ran: set[int] = set()
    for instant in sorted(due_utc.values()):
        for now in (instant - US, instant):
            # Judge in Oslo time too: the same instant, whatever zone it is expressed in.
            for now_expressed in (now, now.astimezone(OSLO)):
                ran |= {op.pk for op in run_due(now=now_expressed)}
                expected = {pk for pk, due in due_utc.items() if due <= now}
                early += len(ran - expected)
                assert ran == expected, (now_expressed.isoformat(), ran, expected)
    runs = _runs(due_utc)
    reliability_report(
        14,
        operations=len(due_utc),
        runs=sum(runs.values()),
        duplicates=sum(1 for n in runs.values() if n > 1),
        lost=sum(1 for n in runs.values() if n == 0),
        seconds=time.monotonic() - started,
        case="dst",
        early=early,
    )
    assert set(runs.values()) == {1}


@pytest.mark.django_db
def test_delay_across_the_fall_back_is_an_absolute_duration():
    # 02:45 CEST (00:45 UTC), an hour's delay: due 02:45 CET (01:45 UTC), not 03:45.
    web_now = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)
    # A frozen clock: the documented way is to turn the skew correction off meanwhile.
    frozen = {**settings.BATCHFRAMEWORK, "CORRECT_CLOCK_SKEW": False}
    with (
        override_settings(BATCHFRAMEWORK=frozen),
        mock.patch("django.utils.timezone.now", return_value=web_now),
    ):
        op = enqueue("test-effect", delay=timedelta(hours=1))
    op.refresh_from_db()
    assert op.run_after == datetime(2026, 10, 25, 1, 45, tzinfo=UTC)
    assert op.run_after.astimezone(OSLO).strftime("%H:%M %Z") == "02:45 CET"
    assert run_due(now=op.run_after - US) == []
    assert [o.pk for o in run_due(now=op.run_after)] == [op.pk]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "enqueue_zone, run_zone",
    [
        ("Europe/Oslo", "America/New_York"),
        ("Pacific/Kiritimati", "Pacific/Pago_Pago"),
        ("UTC", "Asia/Kolkata"),
    ],
)
def test_time_zone_setting_change_between_enqueue_and_run(enqueue_zone, run_zone):
    base = _real_now()
    with override_settings(TIME_ZONE=enqueue_zone):
        by_delay = enqueue("test-effect", delay=timedelta(hours=2))
        local = timezone.localtime(base + timedelta(hours=2))  # aware, in enqueue_zone
        by_time = enqueue("test-effect", run_after=local)
        soon = enqueue("test-effect", delay=timedelta(seconds=1.5))
    due = {by_delay.pk: by_delay.run_after, by_time.pk: local}
    with override_settings(TIME_ZONE=run_zone):
        for op in (by_delay, by_time):
            op.refresh_from_db()
            assert op.run_after == due[op.pk]
        # Time travel: nothing early, each once.
        assert {
            o.pk
            for o in run_due(
                now=base + timedelta(hours=2) - timedelta(seconds=5), operationtype="test-effect"
            )
        } <= {soon.pk}
        assert BatchOperation.objects.filter(pk__in=list(due)).unprocessed().count() == 2
        later = timezone.localtime(base + timedelta(hours=2, seconds=1))
        assert {o.pk for o in run_due(now=later)} >= set(due)
        # The database clock: the 1.5 s operation is not due at once, and is due after 1.5 s.
        fresh = enqueue("test-effect", delay=timedelta(seconds=1.5))
        assert fresh.pk not in {o.pk for o in claim_due(ids=[fresh.pk])}
        time.sleep(1.7)
        claimed = claim_due(ids=[fresh.pk])
        assert [o.pk for o in claimed] == [fresh.pk]
        release(claimed)
    assert _runs(due) == {pk: 1 for pk in due}


# --- Subprocesses: clocks that disagree (PostgreSQL) ----------------------------------------
def _run_with_worker(
    tmp_path, skew: float, delays: list[float]
) -> tuple[list[BatchOperation], dict, float]:
    processes = Processes(tmp_path, subprocess_env(BF_CLOCK_SKEW_SECONDS=str(skew)))
    try:
        worker = processes.worker("dbworker")
        time.sleep(2.0)  # the worker is up and polling
        ops = [enqueue("test-effect", delay=timedelta(seconds=d)) for d in delays]
        ids = [op.pk for op in ops]
        wait_until(
            lambda: BatchOperation.objects.filter(pk__in=ids).finished().count() == len(ids),
            timeout=30,
            what="all operations to finish",
        )
        assert worker.poll() is None, processes.logs()[-3000:]
        ops = list(BatchOperation.objects.filter(pk__in=ids))
        return (
            ops,
            _runs(ids),
            max((op.started_running_datetime - op.run_after).total_seconds() for op in ops),
        )
    finally:
        processes.cleanup()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "skew", [300.0, -300.0], ids=["worker-clock-5min-fast", "worker-clock-5min-slow"]
)
def test_worker_clock_skew_never_runs_early(tmp_path, reliability_report, skew):
    started = time.monotonic()
    ops, runs, latest = _run_with_worker(tmp_path, skew, [0.5 * i for i in range(1, 9)])
    early = [op.pk for op in ops if op.started_running_datetime < op.run_after]
    reliability_report(
        14,
        operations=len(ops),
        runs=sum(runs.values()),
        duplicates=sum(1 for n in runs.values() if n > 1),
        lost=sum(1 for op in ops if op.result != "successful"),
        seconds=time.monotonic() - started,
        case=f"worker-skew{skew:+.0f}s",
        early=len(early),
        max_late=f"{latest:.2f}s",
    )
    assert not early
    assert set(runs.values()) == {1}
    assert latest < 3.0, f"late by {latest:.2f}s (poll interval 0.2s)"


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_web_clock_behind_does_not_make_a_delayed_operation_run_early(tmp_path, reliability_report):
    """The web process's clock is 5 minutes slow; it enqueues with ``delay=3s``. The operation
    must not start before 3 s have passed on the database's (the shared) clock."""
    started = time.monotonic()
    processes = Processes(tmp_path, subprocess_env())
    try:
        worker = processes.worker("dbworker")
        time.sleep(2.0)
        enqueued_at = datetime.now(UTC)  # this machine's clock is also the database server's
        with mock.patch("django.utils.timezone.now", lambda: _real_now() - timedelta(minutes=5)):
            # A web process whose clock was always slow: it measures its offset afresh.
            forget_clock_offsets()
            op = enqueue("test-effect", delay=timedelta(seconds=3))
        forget_clock_offsets()
        wait_until(
            lambda: BatchOperation.objects.get(pk=op.pk).status == "finished",
            timeout=20,
            what="the operation to finish",
        )
        assert worker.poll() is None
        op.refresh_from_db()
        waited = (op.started_running_datetime - enqueued_at).total_seconds()
        runs = _runs([op.pk])
        reliability_report(
            14,
            operations=1,
            runs=runs[op.pk],
            duplicates=int(runs[op.pk] > 1),
            lost=int(op.result != "successful"),
            seconds=time.monotonic() - started,
            case="web-clock-5min-slow",
            waited=f"{waited:.2f}s",
            asked="3s",
        )
        assert runs[op.pk] == 1
        assert waited >= 3.0 - 0.05, (
            f"enqueue(delay=3s) from a web process whose clock is 5 min slow ran after "
            f"{waited:.2f}s: run_after={op.run_after.isoformat()} was computed from the web "
            "clock, not the database's"
        )
    finally:
        processes.cleanup()
