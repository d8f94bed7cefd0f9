"""``manage.py batchframework_prune``: deletes finished operations older than ``--days``, in
batches; never an unprocessed or running one; failed ones only with ``--failed-too``."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from batchframework.models import BatchOperation
from tests.testapp.models import Game, OperationLine, Player

pytestmark = pytest.mark.django_db


def finished(days_ago: float, *, failed: bool = False) -> BatchOperation:
    operation = BatchOperation.objects.create_synchronous(operationtype="prune-me")
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


@pytest.mark.parametrize(
    "args",
    [
        ["--days", "-1"],
        ["--days", "nan"],
        ["--days", "inf"],
        ["--days", "1e9"],
        ["--days", "30", "--batch-size", "0"],
    ],
)
def test_invalid_arguments_are_refused_before_anything_is_deleted(args):
    finished(40)
    before = remaining()
    with pytest.raises(CommandError, match="--days must be from 0"):
        prune(*args)
    assert remaining() == before
