"""Scenario 9: poison operations → each ends failed after ``max_attempts`` with a clear reason;
no endless redelivery; the worker (or a restarted one) keeps serving other operations.

Two poisons (``tests/reliability/poisonapp/batch_handlers.py``, registered only in the
subprocesses): ``poison-raise`` always raises; ``poison-exit`` kills its whole process with
``os._exit`` (no exception, no cleanup, lease of 1 s). Both have ``max_attempts=3``. The rows
are created with ``create_asynchronous`` so the pytest process never registers these handlers.

- DB-polling worker: a supervisor restarts the worker whenever it dies (as systemd would).
- Celery: a prefork worker (whose pool replaces a dead child) and celery beat running the
  poller, which recovers the expired lease and drains the queue again.
"""

from __future__ import annotations

import time

import pytest

from batchframework import BatchOperation, enqueue
from tests.testapp.models import Effect, Execution

from .pg_private import (
    Processes,
    private_redis,
    register_poller,
    subprocess_env,
    wait_until,
)

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

MAX_ATTEMPTS = 3
LOST = "The worker running this operation was lost"


def _create(operationtype: str) -> BatchOperation:
    return BatchOperation.objects.create_asynchronous(operationtype=operationtype, queue="default")


def _runs(op: BatchOperation) -> int:
    return Execution.objects.filter(key=str(op.pk)).count()


def _assert_poisons_failed_cleanly(exit_op: BatchOperation, raise_op: BatchOperation) -> None:
    exit_op.refresh_from_db()
    raise_op.refresh_from_db()
    assert (exit_op.status, exit_op.result) == ("finished", "failed"), exit_op.__dict__
    assert exit_op.attempts == MAX_ATTEMPTS
    assert _runs(exit_op) == MAX_ATTEMPTS
    assert LOST in exit_op.last_error and "attempts spent" in exit_op.last_error, exit_op.last_error
    assert exit_op.error is not None and exit_op.error["type"] == "batchframework.WorkerLost"

    assert (raise_op.status, raise_op.result) == ("finished", "failed"), raise_op.__dict__
    assert raise_op.attempts == MAX_ATTEMPTS
    assert _runs(raise_op) == MAX_ATTEMPTS
    assert raise_op.error is not None and raise_op.error["type"].endswith("RuntimeError")
    assert "always fails" in raise_op.error["message"]
    assert "always fails" in raise_op.last_error


@pytest.mark.timeout(90)
def test_poison_operations_with_db_worker(tmp_path, reliability_report):
    """A supervisor restarts the worker each time ``poison-exit`` kills it: exactly three
    deaths, then the operation is failed as lost and nobody runs it again."""
    started = time.monotonic()
    processes = Processes(tmp_path, subprocess_env(BF_DEFAULT_LEASE="2"))
    exit_op = _create("poison-exit")
    raise_op = _create("poison-raise")
    deaths: list[int | None] = []
    try:
        worker = processes.worker("dbworker", "--batch-size", "1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (
                BatchOperation.objects.filter(pk__in=[exit_op.pk, raise_op.pk]).finished().count()
                == 2
            ):
                break
            if worker.poll() is not None:
                deaths.append(worker.returncode)
                assert len(deaths) <= MAX_ATTEMPTS, f"redelivered endlessly: {deaths}"
                worker = processes.worker("dbworker", "--batch-size", "1")
            time.sleep(0.1)
        # Nobody picks the poison up again: wait two more leases with a live worker.
        time.sleep(2.5)
        assert worker.poll() is None, processes.logs("dbworker")[-4000:]
        # The surviving worker still runs a normal operation.
        normal = enqueue("test-effect")
        wait_until(
            lambda: BatchOperation.objects.get(pk=normal.pk).status == "finished",
            timeout=15,
            what="a normal operation after the poison",
        )
        normal.refresh_from_db()
        runs = _runs(exit_op) + _runs(raise_op) + _runs(normal)
        reliability_report(
            9,
            operations=3,
            runs=runs,
            duplicates=0,
            lost=int(normal.result != "successful"),
            seconds=time.monotonic() - started,
            transport="db-worker",
            worker_deaths=len(deaths),
        )
        _assert_poisons_failed_cleanly(exit_op, raise_op)
        assert deaths == [13] * MAX_ATTEMPTS
        assert normal.result == "successful" and _runs(normal) == 1
    finally:
        processes.cleanup()


@pytest.mark.timeout(90)
def test_poison_operations_with_celery_worker_and_beat(tmp_path, reliability_report):
    """The prefork pool replaces the child ``poison-exit`` killed; the beat-driven poller
    recovers the lease and drains again; after three attempts the operation is failed."""
    started = time.monotonic()
    with private_redis(tmp_path) as redis_server:
        env = subprocess_env(
            CELERY_BROKER_URL=redis_server.url,
            BF_BATCH_SIZE="1",
            BF_DEFAULT_LEASE="2",
            BF_POLL_INTERVAL="1",
        )
        processes = Processes(tmp_path, env)
        exit_op = _create("poison-exit")
        raise_op = _create("poison-raise")
        try:
            register_poller(processes)
            worker = processes.celery_worker()
            beat = processes.celery_beat()
            wait_until(
                lambda: (
                    BatchOperation.objects.filter(pk__in=[exit_op.pk, raise_op.pk])
                    .finished()
                    .count()
                    == 2
                ),
                timeout=60,
                interval=0.2,
                what="both poison operations to end",
            )
            time.sleep(3)  # two more poll ticks: nothing runs them again
            assert worker.poll() is None and beat.poll() is None, processes.logs()[-6000:]
            normal = enqueue("test-effect")  # no message (null dispatcher): the poller finds it
            wait_until(
                lambda: Effect.objects.filter(key=str(normal.pk)).exists(),
                timeout=15,
                what="a normal operation after the poison",
            )
            time.sleep(0.5)
            normal.refresh_from_db()
            runs = _runs(exit_op) + _runs(raise_op) + _runs(normal)
            reliability_report(
                9,
                operations=3,
                runs=runs,
                duplicates=0,
                lost=int(normal.result != "successful"),
                seconds=time.monotonic() - started,
                transport="celery",
            )
            _assert_poisons_failed_cleanly(exit_op, raise_op)
            assert normal.result == "successful" and _runs(normal) == 1
        finally:
            processes.cleanup()


@pytest.mark.timeout(60)
def test_operations_claimed_with_a_poison_operation_are_not_failed_unrun(
    tmp_path, reliability_report
):
    """Bystanders: a worker claims a batch (default batch size) holding ``poison-exit`` first
    and then ordinary ``test-effect`` operations (``max_attempts=1``). The poison kills the
    worker before the others start. They never ran, so they must still run (once) — not be
    failed as "worker lost, attempts spent" without their handler ever being called."""
    started = time.monotonic()
    processes = Processes(tmp_path, subprocess_env(BF_DEFAULT_LEASE="1"))
    exit_op = _create("poison-exit")
    bystanders = [enqueue("test-effect") for _ in range(3)]
    ids = [op.pk for op in bystanders]
    try:
        worker = processes.worker("dbworker")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if BatchOperation.objects.filter(pk__in=[exit_op.pk, *ids]).finished().count() == 4:
                break
            if worker.poll() is not None:
                worker = processes.worker("dbworker")
            time.sleep(0.1)
        ops = {op.pk: op for op in BatchOperation.objects.filter(pk__in=ids)}
        runs = {pk: Execution.objects.filter(key=str(pk)).count() for pk in ids}
        unrun_failed = [pk for pk in ids if ops[pk].result == "failed" and runs[pk] == 0]
        reliability_report(
            9,
            operations=len(ids) + 1,
            runs=sum(runs.values()) + _runs(exit_op),
            duplicates=sum(1 for n in runs.values() if n > 1),
            lost=len(unrun_failed),
            seconds=time.monotonic() - started,
            case="bystanders",
        )
        assert not unrun_failed, (
            "operations claimed in the same batch as a poison operation were failed without "
            "their handler ever running: "
            + "; ".join(
                f"#{pk} attempts={ops[pk].attempts} last_error={ops[pk].last_error[:90]!r}"
                for pk in unrun_failed
            )
        )
        assert all(ops[pk].result == "successful" and runs[pk] == 1 for pk in ids)
    finally:
        processes.cleanup()
