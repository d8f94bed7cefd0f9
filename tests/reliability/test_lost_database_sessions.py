"""A worker loses its database session (a restart, a failover, an idle-session reaper: here
``pg_terminate_backend``) and goes on: what it was doing is recorded, what comes next runs.

A Celery worker configured as docs/celery.rst recommends (``CELERY_DB_REUSE_MAX``,
``CONN_MAX_AGE``, ``CONN_HEALTH_CHECKS``) loses its database session (a restart, a failover,
an idle-session reaper: here ``pg_terminate_backend``) → the next tasks reconnect and run.

Celery's Django fix-up would replace the broken connection only after ``2 * REUSE_MAX`` tasks,
so without the tasks' own check every message and every poller tick would fail until then.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings

from batchframework import BatchOperation, enqueue
from batchframework_celery.tasks import poll
from tests.integration.helpers import wait_for as wait_until
from tests.testapp.models import Execution

from .conftest import celery_on

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
]

NO_DISPATCH = {**settings.BATCHFRAMEWORK, "DISPATCHER": "batchframework.dispatch.NullDispatcher"}
#: How long an operation may take to run once its message was sent (a worker is idle).
BOUND = 15.0


def _terminate_other_sessions() -> int:
    """End every session on the test database but this process's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def _runs(operation: BatchOperation, what: str) -> None:
    wait_until(
        lambda: BatchOperation.objects.successful().filter(pk=operation.pk).exists(),
        timeout=BOUND,
        what=what,
    )


def test_a_worker_reusing_connections_survives_losing_its_database_session(
    private_redis, processes
):
    procs = processes(private_redis.url(), db_reuse_max=1000)
    worker = procs.celery_worker("reuse", concurrency=1)
    with celery_on(private_redis.url()):
        _runs(enqueue("test-noop"), "the warm-up operation (the pool child connects)")
        assert _terminate_other_sessions() >= 1

        # The very first task after the loss: its claim fails, reconnects and runs again.
        _runs(enqueue("test-noop"), "the first operation after the session was lost")
        _runs(enqueue("test-noop"), "the next operation")

        # The same for a poller tick (and the drain it sends) whose message was lost.
        assert _terminate_other_sessions() >= 1
        with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
            lost = enqueue("test-noop")
        poll.apply_async(queue="default")  # what beat sends: no kwargs
        _runs(lost, "an operation the poller's tick finds after the session was lost")
    assert worker.alive(), worker.log()[-3000:]
    assert "database_reconnect" in worker.log()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_db_worker_records_the_success_of_a_handler_whose_session_was_lost(processes, batch_size):
    """The worker's session ends while a handler runs that does not use the database
    meanwhile (a restart, a failover). The finish
    used to be tried, and tried again, on the dead session: the success was lost, and the
    operation ran again once its lease expired (or failed as ``WorkerLost`` with
    ``max_attempts=1``). Now the second try reconnects: each handler runs once, each
    operation is recorded successful at its first attempt."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        ops = [
            enqueue("test-sleep", input_data={"seconds": 1.5, "no_effect": True})
            for _ in range(batch_size)
        ]
    procs = processes("redis://127.0.0.1:1/0")  # the DB worker needs no broker
    worker = procs.db_worker("lost-session", "--batch-size", str(batch_size))
    first = str(ops[0].pk)
    wait_until(lambda: Execution.objects.filter(key=first).exists(), timeout=30, what="the handler")
    assert _terminate_other_sessions() >= 1
    wait_until(
        lambda: BatchOperation.objects.successful().count() == batch_size,
        timeout=30,
        what=f"{batch_size} successes\n{worker.log()}",
    )
    for op in ops:
        op.refresh_from_db()
        assert op.attempts == 1, worker.log()
        assert Execution.objects.filter(key=str(op.pk)).count() == 1, worker.log()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_db_worker_records_the_failure_of_a_handler_whose_session_was_lost(processes, batch_size):
    """The session ends while a handler sleeps; its next statement fails. The failure used to
    be recorded on the dead session, which failed too: the operation stayed running until its
    lease expired, and was then retried (or failed) as a lost worker's, its real error lost.
    Now it is recorded on a new session, and retried at once (``retry_backoff=0``)."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        # ``test-sleep`` writes an Effect after its sleep: on the lost session, that fails.
        ops = [enqueue("test-sleep", input_data={"seconds": 1.5}) for _ in range(batch_size)]
    procs = processes("redis://127.0.0.1:1/0")  # the DB worker needs no broker
    worker = procs.db_worker("lost-session-failure", "--batch-size", str(batch_size))
    first = ops[0]
    wait_until(
        lambda: Execution.objects.filter(key=str(first.pk)).exists(), timeout=30, what="handler"
    )
    assert _terminate_other_sessions() >= 1
    wait_until(
        lambda: BatchOperation.objects.successful().count() == batch_size,
        timeout=30,
        what=f"{batch_size} successes\n{worker.log()}",
    )
    first.refresh_from_db()
    assert first.attempts == 2, worker.log()
    assert "OperationalError" in first.last_error, (first.last_error, worker.log())
    assert "WorkerLost" not in worker.log() and "lost" not in first.last_error.lower()
    assert "lease_end_failed" not in worker.log()
