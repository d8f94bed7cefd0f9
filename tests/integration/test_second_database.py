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

from batchframework import BatchOperation, enqueue
from batchframework.dispatch import NULL_DISPATCHER
from batchframework.engine import CancelOutcome
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
