"""Reliability scenario 3 (issue E): workers killed with real signals, and leases.

``test-sleep`` has a 2 s lease and 3 attempts. A Celery worker (prefork) and a poller loop
(``poll_once`` every second: it recovers expired leases and drains due operations) run as
subprocesses on a private Redis.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from batchframework import BatchOperation, enqueue, enqueue_many
from tests.integration.helpers import wait_for as wait_until
from tests.testapp.models import Effect, Execution

from .conftest import celery_on

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

LEASE = 2.0
POLL = 1.0
#: Shorter than the lease (a healthy attempt keeps it), long enough to be killed mid-way.
SLEEP = 1.5
#: Short enough that the waiting operations of a batch are not given back by the keeper.
QUICK = 0.8


def _claimer_pid(operation: BatchOperation) -> int:
    """The pid in a claim token (``host:pid:...``): the process that runs the handler."""
    return int(operation.claimed_by.split(":")[1])


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _executions(pk: int) -> int:
    return Execution.objects.filter(key=str(pk)).count()


def _started(pk: int) -> BatchOperation | None:
    """The operation once its handler has started (it writes an Execution row first)."""
    if not Execution.objects.filter(key=str(pk)).exists():
        return None
    return BatchOperation.objects.get(pk=pk)


def _finished(pk: int) -> bool:
    return BatchOperation.objects.finished().filter(pk=pk).exists()


@pytest.mark.timeout(90)
def test_pool_child_killed_operation_recovered_after_lease(
    private_redis, processes, reliability_report
):
    """Scenario 3a: ``kill -9`` of the pool child running a sleeping handler → the master
    lives on, the lease expires, the poller puts the operation back, it runs again and
    finishes (attempt 2)."""
    procs = processes(private_redis.url(), poll_interval=POLL)
    worker = procs.celery_worker("crash-child", concurrency=2)
    procs.poller()
    with celery_on(private_redis.url()):
        op = enqueue("test-sleep", input_data={"seconds": SLEEP})
    running = wait_until(lambda: _started(op.pk), timeout=20, what="the handler to start")
    child = _claimer_pid(running)
    assert child != worker.pid and _parent_pid(child) == worker.pid, "not our worker's pool child"
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: _finished(op.pk), timeout=30, what="the operation to finish after recovery")
    seconds = time.monotonic() - killed
    op.refresh_from_db()
    reliability_report(
        "3a",
        operations=1,
        runs=_executions(op.pk),
        duplicates=0,
        lost=int(op.result != BatchOperation.RESULT_SUCCESSFUL),
        seconds=seconds,
        attempts=op.attempts,
        killed="pool-child",
    )
    assert op.result == BatchOperation.RESULT_SUCCESSFUL, op.last_error
    assert op.attempts == 2
    assert _executions(op.pk) == 2  # the killed attempt and the one that finished
    assert Effect.objects.filter(key=f"sleep-{op.pk}-2").exists()
    assert not Effect.objects.filter(key=f"sleep-{op.pk}-1").exists()
    assert "worker running this operation was lost" in op.last_error
    assert worker.alive(), "the Celery master should survive the loss of a pool child"
    # Not before the lease ran out (2 s after the claim), not much later than lease + poll.
    assert LEASE - 0.5 <= seconds <= LEASE + POLL + 3 + 5, seconds


@pytest.mark.timeout(120)
def test_whole_worker_killed_operation_recovered_after_lease(
    private_redis, processes, reliability_report
):
    """Scenario 3b: ``kill -9`` of the whole Celery worker (master and pool, one process
    group) while its handler sleeps → another worker runs it again after the lease."""
    procs = processes(private_redis.url(), poll_interval=POLL)
    workers = [procs.celery_worker(f"crash-whole{i}", concurrency=1, ready=False) for i in range(2)]
    for worker in workers:
        worker.wait_log(r"\bready\.", timeout=90)
    procs.poller()
    with celery_on(private_redis.url()):
        op = enqueue("test-sleep", input_data={"seconds": SLEEP})
    running = wait_until(lambda: _started(op.pk), timeout=20, what="the handler to start")
    child = _claimer_pid(running)
    victim = next(w for w in workers if _parent_pid(child) == w.pid)
    survivor = next(w for w in workers if w is not victim)
    victim.kill_group()
    killed = time.monotonic()
    wait_until(lambda: _gone(child), timeout=5, what="the pool child to die with its group")
    wait_until(lambda: _finished(op.pk), timeout=30, what="the operation to finish after recovery")
    seconds = time.monotonic() - killed
    op.refresh_from_db()
    reliability_report(
        "3b",
        operations=1,
        runs=_executions(op.pk),
        duplicates=0,
        lost=int(op.result != BatchOperation.RESULT_SUCCESSFUL),
        seconds=seconds,
        attempts=op.attempts,
        killed="whole-worker",
    )
    assert op.result == BatchOperation.RESULT_SUCCESSFUL, op.last_error
    assert op.attempts == 2
    assert _executions(op.pk) == 2
    assert Effect.objects.filter(key=f"sleep-{op.pk}-2").exists()
    assert not Effect.objects.filter(key=f"sleep-{op.pk}-1").exists()
    assert _parent_pid(_claimer_pid(op)) == survivor.pid
    assert seconds >= LEASE - 0.5, seconds


@pytest.mark.timeout(90)
def test_lease_renewed_by_progress_is_never_reclaimed(private_redis, processes, reliability_report):
    """Scenario 3c: a handler that runs 6 s (three leases) but reports progress every 0.5 s,
    with the poller recovering expired leases every second → never reclaimed, runs once."""
    procs = processes(private_redis.url(), poll_interval=POLL)
    procs.celery_worker("progress", concurrency=2)
    procs.poller()
    started = time.monotonic()
    with celery_on(private_redis.url()):
        op = enqueue("test-sleep", input_data={"seconds": 6, "progress": True})
    wait_until(lambda: _finished(op.pk), timeout=40, what="the operation to finish")
    time.sleep(POLL + 0.5)
    op.refresh_from_db()
    reliability_report(
        "3c",
        operations=1,
        runs=_executions(op.pk),
        duplicates=max(0, _executions(op.pk) - 1),
        lost=int(op.result != BatchOperation.RESULT_SUCCESSFUL),
        seconds=time.monotonic() - started,
        attempts=op.attempts,
        progress=f"{op.progress_done}/{op.progress_total}",
    )
    assert op.result == BatchOperation.RESULT_SUCCESSFUL, op.last_error
    assert op.attempts == 1
    assert _executions(op.pk) == 1
    assert not op.last_error
    assert (op.progress_done, op.progress_total) == (12, 12)


@pytest.mark.timeout(90)
def test_operations_waiting_in_a_claimed_chunk_are_not_reclaimed(
    private_redis, processes, reliability_report
):
    """Scenario 3d: one chunk message names 6 operations of 0.6 s each (each well within its
    2 s lease, 3.6 s in all). The worker claims all six at once and runs them one after the
    other; while it is healthy and working, none may be taken from it (the DB worker renews
    the leases of the operations waiting their turn; a Celery chunk must too) → each runs
    once."""
    procs = processes(private_redis.url(), poll_interval=POLL)
    procs.celery_worker("chunk", concurrency=2)
    procs.poller()
    started = time.monotonic()
    with celery_on(private_redis.url()):
        ops = enqueue_many("test-sleep", [{"input_data": {"seconds": 0.6}}] * 6)
    ids = [op.pk for op in ops]
    wait_until(
        lambda: BatchOperation.objects.finished().filter(pk__in=ids).count() == len(ids),
        timeout=40,
        what="the chunk to finish",
    )
    time.sleep(POLL + 0.5)
    runs = {pk: _executions(pk) for pk in ids}
    operations = BatchOperation.objects.filter(pk__in=ids)
    reliability_report(
        "3d",
        operations=len(ids),
        runs=sum(runs.values()),
        duplicates=sum(n - 1 for n in runs.values() if n > 1),
        lost=len(ids) - operations.successful().count(),
        seconds=time.monotonic() - started,
        reclaimed=operations.filter(attempts__gt=1).count(),
    )
    assert set(runs.values()) == {1}, f"handler runs per operation: {runs}"
    assert operations.successful().count() == len(ids)
    assert not operations.filter(attempts__gt=1).exists()


@pytest.mark.timeout(90)
def test_a_soft_time_limit_ends_the_chunk_and_every_operation_still_runs_once_to_success(
    private_redis, processes, reliability_report
):
    """Celery's soft time limit bounds a task, and a chunk message's task runs up to
    ``BATCH_SIZE`` operations: a limit of 2 s interrupts the third of five 0.8 s operations
    (SIGUSR1 in the pool process, raised inside the handler). That is not the interrupted
    operation's failure: the chunk ends, the operations not started go back for the poller's
    drain, the interrupted one is recovered at the next poll and runs again alone. All five
    succeed; none is failed or holds an attempt it did not spend."""
    procs = processes(private_redis.url(), poll_interval=POLL)
    procs.celery_worker("limited", concurrency=1, args=["--soft-time-limit", "2"])
    procs.poller()
    with celery_on(private_redis.url()):
        ops = enqueue_many("test-sleep", [{"input_data": {"seconds": 0.8}}] * 5)
    ids = [op.pk for op in ops]
    wait_until(
        lambda: BatchOperation.objects.finished().filter(pk__in=ids).count() == len(ids),
        timeout=60,
        what="all five to finish",
    )
    operations = BatchOperation.objects.filter(pk__in=ids).order_by("pk")
    runs = [_executions(pk) for pk in ids]
    reliability_report(
        "soft-time-limit", operations=len(ids), runs=sum(runs), interrupted=sum(runs) - len(ids)
    )
    assert [op.result for op in operations] == [BatchOperation.RESULT_SUCCESSFUL] * 5, [
        (op.pk, op.last_error[-200:]) for op in operations
    ]
    assert [op.attempts for op in operations] == [1] * 5
    assert runs.count(2) >= 1, f"no handler was interrupted: {runs}"
    assert set(runs) <= {1, 2}, runs
    assert Effect.objects.filter(key__startswith="sleep-").count() == 5  # each completed once


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("stop_signal", "soft_shutdown_timeout"),
    [(signal.SIGTERM, 0), (signal.SIGQUIT, 10)],
    ids=["warm", "soft"],
)
def test_a_warm_shutdown_ends_the_chunk_after_the_handler_in_hand(
    private_redis, processes, reliability_report, stop_signal, soft_shutdown_timeout
):
    """``SIGTERM`` to a Celery worker (a deployment stopping it) while a chunk message's batch
    runs: Celery's warm shutdown waits for the task, so the batch ends after the handler in
    hand instead of running the other operations it claimed. Those go back unprocessed,
    without a spent attempt and not marked to be claimed alone, and the worker exits without
    running them (a grace period of one handler's length is enough). Another worker and the
    poller then run them, each once. The same with Celery's soft shutdown (``SIGQUIT`` and
    ``worker_soft_shutdown_timeout``), whose handler waits out that timeout before it tells
    anybody: the flag goes up with the signal itself. (Each handler is shorter than the two
    thirds of its lease after which the keeper would give the waiting operations back
    anyway.)"""
    timings = {"soft_shutdown_timeout": soft_shutdown_timeout} if soft_shutdown_timeout else {}
    procs = processes(private_redis.url(), poll_interval=POLL, **timings)
    worker = procs.celery_worker("stopping", concurrency=1)
    with celery_on(private_redis.url()):
        ops = enqueue_many("test-sleep", [{"input_data": {"seconds": QUICK}}] * 5)
    ids = [op.pk for op in ops]
    first = wait_until(lambda: _started(ids[0]), timeout=20, what="the first handler to start")
    assert first.status == BatchOperation.STATUS_RUNNING
    assert BatchOperation.objects.filter(pk__in=ids, status="running").count() == len(ids), (
        "the five were not claimed as one batch"
    )
    os.kill(worker.pid, stop_signal)
    stopped = time.monotonic()
    worker.popen.wait(timeout=30)
    took = time.monotonic() - stopped
    assert worker.popen.returncode == 0, worker.log()[-3000:]
    after = {op.pk: op for op in BatchOperation.objects.filter(pk__in=ids)}
    assert after[ids[0]].result == BatchOperation.RESULT_SUCCESSFUL
    rest = [after[pk] for pk in ids[1:]]
    assert [(op.status, op.attempts, op.claimed_by) for op in rest] == [
        (BatchOperation.STATUS_UNPROCESSED, 0, "")
    ] * 4, [(op.pk, op.status, op.attempts, op.claimed_by) for op in rest]
    assert [_executions(pk) for pk in ids] == [1, 0, 0, 0, 0]

    procs.celery_worker("successor", concurrency=2)
    procs.poller()
    wait_until(
        lambda: BatchOperation.objects.finished().filter(pk__in=ids).count() == len(ids),
        timeout=60,
        what="the given-back operations to finish",
    )
    reliability_report(
        f"{stop_signal.name}-shutdown", operations=len(ids), stop_seconds=round(took, 1)
    )
    finished = BatchOperation.objects.filter(pk__in=ids)
    assert {op.result for op in finished} == {BatchOperation.RESULT_SUCCESSFUL}
    assert [op.attempts for op in finished.order_by("pk")] == [1] * 5
    assert [_executions(pk) for pk in ids] == [1] * 5
