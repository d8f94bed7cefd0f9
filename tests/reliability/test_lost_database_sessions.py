"""A Celery worker configured as docs/celery.rst recommends (``CELERY_DB_REUSE_MAX``,
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
