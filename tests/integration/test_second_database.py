"""A database other than ``default``: the original's creation methods, through
``db_manager(alias)``, write where Django's own ``create`` would; and with a primary/replica
router, an instance read from the replica is cancelled or postponed on the primary. PostgreSQL
only: the second alias is a second test database on the same server."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from batchframework import BatchOperation, enqueue, handler
from batchframework.dispatch import NULL_DISPATCHER
from batchframework.engine import BatchRunner, CancelOutcome, claim_due, renew_leases, set_progress
from batchframework.registry import registry
from batchframework.testing import run_due
from batchframework.worker import Worker
from tests.celery.helpers import add_postgresql_alias

#: A second database holding batchframework's tables (its own test database).
OTHER = "second_database"


def _own_test_database(database: dict) -> None:
    test_name = database["TEST"].get("NAME") or f"test_{database['NAME']}"
    database["TEST"]["NAME"] = f"{test_name}_second"


HAS_OTHER = add_postgresql_alias(OTHER, _own_test_database)

pytestmark = [pytest.mark.timeout(60)]


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_the_creation_methods_write_to_the_managers_database(method):
    """``BatchOperation.objects.db_manager(alias).create_asynchronous(...)`` (and its
    synchronous twin) stores the operation in ``alias``, as Django's own ``create`` does, and
    nothing in ``default``."""
    operation = getattr(BatchOperation.objects.db_manager(OTHER), method)(operationtype="x")
    assert operation._state.db == OTHER
    assert BatchOperation.objects.using(OTHER).filter(pk=operation.pk).exists()
    assert not BatchOperation.objects.using("default").exists()
    assert connections[OTHER].settings_dict["NAME"] != connections["default"].settings_dict["NAME"]


class PrimaryReplicaRouter:
    """Django's documented primary/replica pattern: reads from the replica, writes to default."""

    def db_for_read(self, model, **hints):
        return OTHER

    def db_for_write(self, model, **hints):
        return "default"

    def allow_relation(self, obj1, obj2, **hints):
        return True


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
@pytest.mark.parametrize("action", ["cancel", "postpone"])
def test_cancel_and_postpone_of_an_instance_read_from_a_replica_write_to_the_primary(action):
    """A view reads the operation through the router, from a replica; ``cancel()`` and
    ``postpone()`` must change the primary's row, where workers claim, as ``save()`` and
    ``delete()`` would, not the replica's copy (answering as if it had worked)."""
    no_dispatch = {"DISPATCHER": NULL_DISPATCHER}
    with override_settings(
        DATABASE_ROUTERS=[f"{__name__}.PrimaryReplicaRouter"], BATCHFRAMEWORK=no_dispatch
    ):
        operation = enqueue("test-noop")
        assert operation._state.db == "default"
        # Replication: the replica holds a copy of the row.
        BatchOperation.objects.using("default").get(pk=operation.pk).save(
            using=OTHER, force_insert=True
        )
        read = BatchOperation.objects.get(pk=operation.pk)
        assert read._state.db == OTHER
        if action == "cancel":
            assert read.cancel() is CancelOutcome.CANCELLED
        else:
            assert read.postpone(timedelta(hours=1)) is True
    primary = BatchOperation.objects.using("default").filter(pk=operation.pk).first()
    replica = BatchOperation.objects.using(OTHER).get(pk=operation.pk)
    if action == "cancel":
        assert primary is None
    else:
        assert primary is not None and primary.run_after > timezone.now() + timedelta(minutes=59)
        assert replica.run_after < timezone.now() + timedelta(minutes=1)  # left to replication


class BatchTablesElsewhere:
    """Routes batchframework's tables to ``OTHER``; the application's stay on ``default``."""

    def db_for_read(self, model, **hints):
        return OTHER if model._meta.app_label == "batchframework" else None

    db_for_write = db_for_read


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(transaction=True, databases=["default", OTHER])
def test_progress_is_recorded_where_the_operation_was_claimed():
    """An operation enqueued on a database the router does not name (``POLL_DATABASES``
    supports it) is claimed there; ``set_progress()`` in its handler must write there, under
    the claim. It asked the router and wrote to the other database, found no such running
    operation and answered ``False``: a handler following the progress how-to stopped after its
    first chunk, and its run was recorded as a success."""
    seen: list[bool] = []

    @handler("second-db-progress")
    def reports_progress(operation):
        seen.append(operation.set_progress(1, 2, "half"))

    try:
        with override_settings(DATABASE_ROUTERS=[f"{__name__}.BatchTablesElsewhere"]):
            operation = enqueue("second-db-progress", using="default")
            assert [ran.pk for ran in run_due(using="default")] == [operation.pk]
    finally:
        registry.unregister("second-db-progress")
    assert seen == [True]
    row = BatchOperation.objects.using("default").get(pk=operation.pk)
    assert (row.progress_done, row.progress_total, row.progress_message) == (1, 2, "half")


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(transaction=True, databases=["default", OTHER])
def test_a_runner_gives_back_and_renews_on_the_database_of_the_claim():
    """``BatchRunner()`` without ``using`` runs each operation on the database it was claimed
    from; giving back what it did not run, and renewing the leases of what waits its turn, went
    to ``default`` instead: nothing matched there, so the operations stayed running until their
    leases expired (and renewal dropped the waiting ones from the batch)."""
    for _ in range(3):
        enqueue("test-noop", using=OTHER)
    claimed = claim_due(using=OTHER)
    assert len(claimed) == 3
    assert [op.pk for op in renew_leases(claimed)] == [op.pk for op in claimed]
    with BatchRunner() as runner:
        runner.run_batch(claimed, stop=lambda: True)
    statuses = BatchOperation.objects.using(OTHER).values_list("status", flat=True)
    assert list(statuses) == [BatchOperation.STATUS_UNPROCESSED] * 3


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
def test_the_db_worker_judges_what_is_due_on_the_primary():
    """The worker sleeps until the next operation is due; it read that through the router,
    from a (lagging) replica, so it slept a whole poll interval past an operation due in half a
    second on the primary, where it claims."""
    with override_settings(
        DATABASE_ROUTERS=[f"{__name__}.PrimaryReplicaRouter"],
        BATCHFRAMEWORK={"DISPATCHER": NULL_DISPATCHER},
    ):
        enqueue("test-noop", delay=timedelta(seconds=0.5))  # the replica has no copy yet
        sleep = Worker(poll_interval=timedelta(seconds=5))._sleep_seconds()
    assert sleep < 1


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(transaction=True, databases=["default", OTHER])
def test_progress_of_a_running_operation_read_from_a_replica_is_written_to_the_primary():
    """Only an instance a claim returned is written where it was claimed; one read back from a
    replica (a helper thread of the handler's) is written where the router writes it."""
    with override_settings(
        DATABASE_ROUTERS=[f"{__name__}.PrimaryReplicaRouter"],
        BATCHFRAMEWORK={"DISPATCHER": NULL_DISPATCHER},
    ):
        enqueue("test-noop")
        (claimed,) = claim_due(using="default")
        BatchOperation.objects.using("default").get(pk=claimed.pk).save(
            using=OTHER, force_insert=True
        )  # replicated
        read = BatchOperation.objects.get(pk=claimed.pk)
        assert read._state.db == OTHER
        assert set_progress(read, 3, 4) is True
    assert BatchOperation.objects.using("default").get(pk=claimed.pk).progress_done == 3
    assert BatchOperation.objects.using(OTHER).get(pk=claimed.pk).progress_done is None


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(transaction=True, databases=["default", OTHER])
def test_cancel_many_tells_the_same_key_on_two_databases_apart():
    """Each database numbers its own operations: a pending one on ``default`` and a running
    one on ``OTHER`` had the same key, and both were reported cancelled."""
    from batchframework import cancel_many
    from batchframework.engine import claim

    with override_settings(BATCHFRAMEWORK={"DISPATCHER": NULL_DISPATCHER}):
        pending = enqueue("test-noop", delay=3600, using="default")
        running = enqueue("test-noop", using=OTHER)
        while running.pk < pending.pk:
            running = enqueue("test-noop", using=OTHER)
        while pending.pk < running.pk:
            pending = enqueue("test-noop", delay=3600, using="default")
        assert claim(running.pk, using=OTHER) is not None
        assert cancel_many([running, pending]) == [pending.pk]
    assert BatchOperation.objects.using(OTHER).get(pk=running.pk).status == "running"
    assert not BatchOperation.objects.using("default").filter(pk=pending.pk).exists()
