"""``manage.py batchframework_prune``: deletes finished operations older than ``--days``, in
batches; never an unprocessed or running one; failed ones only with ``--failed-too``."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, models
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from batchframework.models import BatchOperation
from tests.integration.test_second_database import HAS_OTHER, OTHER
from tests.testapp.models import Game, OperationLine, Player

pytestmark = pytest.mark.django_db


def finished(days_ago: float, *, failed: bool = False, **data: object) -> BatchOperation:
    operation = BatchOperation.objects.create_synchronous(operationtype="prune-me", **data)
    operation.finish(failed=failed)
    when = timezone.now() - timedelta(days=days_ago)
    BatchOperation.objects.filter(pk=operation.pk).update(
        started_running_datetime=when, finished_datetime=when
    )
    return operation


def prune(*args: str) -> str:
    out = io.StringIO()
    call_command("batchframework_prune", *args, stdout=out)
    return out.getvalue()


def remaining() -> set[int]:
    return set(BatchOperation.objects.values_list("pk", flat=True))


def test_prune_deletes_only_old_successes():
    old = [finished(40) for _ in range(3)]
    recent = finished(10)
    old_failure = finished(40, failed=True)
    pending = BatchOperation.objects.create_asynchronous(operationtype="prune-me")
    running = BatchOperation.objects.create_synchronous(operationtype="prune-me")
    BatchOperation.objects.filter(pk=running.pk).update(
        started_running_datetime=timezone.now() - timedelta(days=90)
    )
    output = prune("--days", "30", "--batch-size", "2")  # two statements' worth
    assert output.startswith("deleted 3 operation(s) finished before")
    assert remaining() == {recent.pk, old_failure.pk, pending.pk, running.pk}
    assert not {op.pk for op in old} & remaining()

    assert prune("--days", "30", "--failed-too").startswith("deleted 1 operation(s)")
    assert remaining() == {recent.pk, pending.pk, running.pk}


def test_dry_run_counts_and_deletes_nothing():
    finished(40)
    finished(40, failed=True)
    before = remaining()
    assert prune("--days", "30", "--dry-run") == "would delete 1 operation(s)\n"
    assert prune("--days", "30", "--dry-run", "--failed-too") == "would delete 2 operation(s)\n"
    assert remaining() == before


def test_the_count_is_of_operations_not_of_the_rows_that_went_with_them():
    operation = finished(40)
    OperationLine.objects.bulk_create([OperationLine(batchoperation=operation) for _ in range(4)])
    game = Game.objects.create()
    Player.objects.bulk_create(
        [Player(game=game, name=f"p{i}", batchoperation=operation) for i in range(5)]
    )
    assert prune("--days", "30").startswith("deleted 1 operation(s)")
    assert not OperationLine.objects.exists()  # CASCADE: deleted with it, not counted
    assert Player.objects.filter(batchoperation__isnull=True).count() == 5  # SET_NULL


def test_with_foreign_keys_to_operations_only_their_ids_are_read():
    """A foreign key to ``BatchOperation`` keeps Django from deleting with one statement: it
    first reads the operations, to apply each relation's on_delete. It must read their ids
    only, not their data (a few hundred MB per pass, with large outputs)."""
    big = {"rows": ["x" * 1000] * 10}
    operations = [finished(40, input_data=big, output_data=big) for _ in range(3)]
    OperationLine.objects.bulk_create([OperationLine(batchoperation=operations[0])])
    game = Game.objects.create()
    Player.objects.create(game=game, name="p", batchoperation=operations[1])
    with CaptureQueriesContext(connection) as queries:
        assert prune("--days", "30", "--batch-size", "2").startswith("deleted 3 operation(s)")
    read_data = [q["sql"] for q in queries if "input_data" in q["sql"] or "output_data" in q["sql"]]
    assert read_data == []
    assert remaining() == set()
    assert not OperationLine.objects.exists()  # CASCADE
    assert Player.objects.get().batchoperation_id is None  # SET_NULL


@pytest.mark.parametrize("on_delete", [models.PROTECT, models.RESTRICT])
def test_a_protecting_foreign_key_stops_the_command_with_an_error(monkeypatch, on_delete):
    """PROTECT and RESTRICT refuse the delete: a command error that names the relation, not a
    traceback; the passes before it stay done, the refused one deletes nothing."""
    field = OperationLine._meta.get_field("batchoperation")
    monkeypatch.setattr(field.remote_field, "on_delete", on_delete)
    unreferenced = finished(50)
    referenced = finished(40)
    OperationLine.objects.create(batchoperation=referenced)
    with pytest.raises(CommandError, match=r"OperationLine\.batchoperation") as error:
        prune("--days", "30", "--batch-size", "1")
    assert "Deleted 1 operation(s) before that." in str(error.value)
    assert unreferenced.pk not in remaining()
    assert remaining() == {referenced.pk}
    assert OperationLine.objects.filter(batchoperation=referenced).exists()


class ReadsNowhereRouter:
    """Sends writes of operations to default, and refuses reads: the command must read the ids
    where it deletes them, not wherever ``db_for_read`` points."""

    def db_for_read(self, model, **hints):
        raise AssertionError(f"read of {model.__name__} routed through db_for_read")

    def db_for_write(self, model, **hints):
        return "default"


def test_without_database_it_reads_and_deletes_where_the_router_writes():
    old = finished(40)
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.ReadsNowhereRouter"]):
        assert prune("--days", "30", "--dry-run") == "would delete 1 operation(s)\n"
        assert prune("--days", "30").startswith("deleted 1 operation(s)")
    assert old.pk not in remaining()


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
@pytest.mark.timeout(30)  # before the fix, the stale id came back on every pass, forever
def test_a_lagging_replica_does_not_decide_what_is_pruned():
    """With Django's primary/replica router, the ids come from the primary: the replica, not
    yet holding the operations (or still holding ones already deleted), is not consulted."""
    old = [finished(40) for _ in range(2)]
    stale = BatchOperation.objects.get(pk=finished(40).pk)
    # Replication lag: the replica still has an operation the primary has deleted, and not
    # yet the others.
    stale.save(using=OTHER, force_insert=True)
    BatchOperation.objects.using("default").filter(pk=stale.pk).delete()
    router = "tests.integration.test_second_database.PrimaryReplicaRouter"
    with override_settings(DATABASE_ROUTERS=[router]):
        assert prune("--days", "30").startswith("deleted 2 operation(s)")
    assert not BatchOperation.objects.using("default").filter(pk__in=[o.pk for o in old]).exists()
    assert list(BatchOperation.objects.using(OTHER).values_list("pk", flat=True)) == [stale.pk]


@pytest.mark.parametrize(
    "args",
    [
        ["--days", "-1"],
        ["--days", "nan"],
        ["--days", "inf"],
        ["--days", "1e9"],
        ["--days", "30", "--batch-size", "0"],
        # Beyond the database's LIMIT: a raw DataError, with a traceback.
        ["--days", "30", "--batch-size", "99999999999999999999"],
    ],
)
def test_invalid_arguments_are_refused_before_anything_is_deleted(args):
    finished(40)
    before = remaining()
    with pytest.raises(CommandError, match="--days must be from 0"):
        prune(*args)
    assert remaining() == before
