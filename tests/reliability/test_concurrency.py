"""Reliability scenarios 1 and 2 (issue E): many claimers at once, and a message racing the
poller. Invariant 1: one claim per attempt; whoever loses does nothing and says so."""

from __future__ import annotations

import logging
import random
import re
import threading
import time

import pytest
from django.db import connection
from django.db.models import Count

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework_celery.tasks import drain, run_operations
from tests.integration.helpers import wait_for as wait_until
from tests.testapp.models import Effect, Execution

from .conftest import celery_on

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

DEADLOCK = re.compile(r"deadlock", re.IGNORECASE)


def _run_counts(ids: list[int]) -> dict[str, int]:
    """How often the handler was called for each of ``ids`` (Execution rows, duplicates kept)."""
    keys = [str(pk) for pk in ids]
    counts = dict(
        Execution.objects.filter(key__in=keys)
        .values_list("key")
        .annotate(n=Count("pk"))
        .values_list("key", "n")
    )
    return {key: counts.get(key, 0) for key in keys}


@pytest.mark.timeout(240)
def test_concurrent_claimers_run_each_operation_once(private_redis, processes, reliability_report):
    """Scenario 1: 2,000 due operations; 4 DB workers, 2 Celery workers (each fed by the
    dispatcher's chunk messages and the pollers' drains) and 2 pollers, all at once →
    exactly 2,000 effects, no deadlock in any log, nothing left running."""
    total = 2000
    procs = processes(private_redis.url(), poll_interval=1, default_lease=60)
    celery_workers = [procs.celery_worker(f"claimers{i}", ready=False) for i in range(2)]
    pollers = [procs.poller(f"poller{i}", ready=False) for i in range(2)]
    db_workers = [procs.db_worker(f"db{i}") for i in range(4)]
    for proc in celery_workers:
        proc.wait_log(r"\bready\.", timeout=90)
    for proc in pollers:
        proc.wait_log("poller ready", timeout=90)
    for proc in db_workers:
        proc.wait_log("worker started", timeout=90)

    started = time.monotonic()
    ids: list[int] = []
    with celery_on(private_redis.url()):
        # Four commits of 500: each publishes its chunk messages while the DB workers and
        # the pollers' drains already claim the same rows.
        for _ in range(4):
            ids += [op.pk for op in enqueue_many("test-effect", [{}] * (total // 4))]
    assert len(ids) == total

    operations = BatchOperation.objects.filter(pk__in=ids)
    try:
        wait_until(
            lambda: operations.finished().count() == total,
            timeout=150,
            interval=0.5,
            what="all operations to finish",
        )
    finally:
        elapsed = time.monotonic() - started
        time.sleep(1.5)  # late duplicates, if any, would land now
        runs = _run_counts(ids)
        logs = procs.logs()
        successful = operations.successful().count()
        by_db_workers = operations.filter(claimed_by__regex=r"^db[0-9]:").count()
        reliability_report(
            1,
            operations=total,
            runs=sum(runs.values()),
            duplicates=sum(n - 1 for n in runs.values() if n > 1),
            lost=total - successful,
            seconds=elapsed,
            effects=Effect.objects.count(),
            by_db_workers=by_db_workers,
            by_celery=successful - by_db_workers,
            deadlocks=len(DEADLOCK.findall(logs)),
            left_running=operations.running().count(),
        )
    assert Effect.objects.count() == total
    assert set(runs.values()) == {1}, {k: v for k, v in runs.items() if v != 1}
    assert successful == total, list(
        operations.exclude(result=BatchOperation.RESULT_SUCCESSFUL).values_list(
            "pk", "status", "last_error"
        )[:5]
    )
    assert not operations.running().exists() and not operations.unprocessed().exists()
    assert not operations.filter(attempts__gt=1).exists()
    deadlock_lines = [line for line in logs.splitlines() if DEADLOCK.search(line)]
    assert not deadlock_lines, deadlock_lines[:5]
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 500 :][:3000]
    for proc in procs.started:
        assert proc.alive(), f"{proc.label} died:\n{proc.log()[-2000:]}"


class _Recorder(logging.Handler):
    """Keeps ``(thread name, message)`` of every batchframework log record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append((record.threadName, record.getMessage()))

    def take(self) -> list[tuple[str, str]]:
        with self.lock_:
            taken, self.records = self.records, []
        return taken


@pytest.mark.timeout(180)
def test_message_and_poller_race_run_once(reliability_report):
    """Scenario 2: 500 times, an operation due now is claimed at the same moment by its
    Celery message (``run_operations`` with its id, as a worker runs it) and by the poller's
    ``drain`` of its queue, in two threads with their own database connections, released
    together by a barrier → exactly one runs it; the loser logs a no-op."""
    rounds = 500
    start, done = threading.Barrier(3, timeout=30), threading.Barrier(3, timeout=30)
    current: dict[str, int | None] = {"pk": None}
    results: dict[str, list[int]] = {"message": [], "poller": []}
    errors: list[BaseException] = []

    def contender(name: str, call) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                start.wait()
                pk = current["pk"]
                if pk is None:
                    return
                time.sleep(random.random() * 0.002)  # either side may win
                results[name].append(call(pk))
                done.wait()
        except BaseException as exc:
            errors.append(exc)
            start.abort()
            done.abort()
        finally:
            connection.close()

    threads = [
        threading.Thread(
            target=contender, name="message", args=("message", lambda pk: run_operations([pk]))
        ),
        threading.Thread(
            target=contender, name="poller", args=("poller", lambda pk: drain("default"))
        ),
    ]
    recorder = _Recorder()
    logger = logging.getLogger("batchframework")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(recorder)
    ids: list[int] = []
    silent_losers: dict[str, int] = {"message": 0, "poller": 0}
    wins = {"message": 0, "poller": 0}
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for _ in range(rounds):
            op = enqueue("test-effect")  # tests' default dispatcher publishes nothing
            ids.append(op.pk)
            current["pk"] = op.pk
            recorder.take()
            start.wait()
            done.wait()
            message_ran, poller_ran = results["message"][-1], results["poller"][-1]
            log = recorder.take()
            if message_ran + poller_ran == 1:
                winner, loser = ("message", "poller") if message_ran else ("poller", "message")
                wins[winner] += 1
                if not any(
                    thread == loser and ("noop" in msg or "skipped" in msg or "lost" in msg)
                    for thread, msg in log
                ):
                    silent_losers[loser] += 1
        current["pk"] = None
        start.wait()
    finally:
        if current["pk"] is not None:
            start.abort()
            done.abort()
        for thread in threads:
            thread.join(timeout=30)
        logger.removeHandler(recorder)
        logger.setLevel(old_level)
    elapsed = time.monotonic() - started
    assert not errors, errors
    runs = _run_counts(ids)
    per_round = [m + p for m, p in zip(results["message"], results["poller"], strict=True)]
    successful = BatchOperation.objects.filter(pk__in=ids).successful().count()
    reliability_report(
        2,
        operations=rounds,
        runs=sum(runs.values()),
        duplicates=sum(n - 1 for n in runs.values() if n > 1),
        lost=rounds - successful,
        seconds=elapsed,
        message_won=wins["message"],
        poller_won=wins["poller"],
        silent_message_losses=silent_losers["message"],
        silent_poller_losses=silent_losers["poller"],
    )
    assert per_round == [1] * rounds, [i for i, n in enumerate(per_round) if n != 1][:10]
    assert set(runs.values()) == {1}
    assert successful == rounds
    assert Effect.objects.filter(key__in=[str(pk) for pk in ids]).count() == rounds
    # Invariant 1: "the others do nothing and say so in the log".
    assert silent_losers == {"message": 0, "poller": 0}, (
        f"losers that logged nothing: {silent_losers} (wins: {wins})"
    )
