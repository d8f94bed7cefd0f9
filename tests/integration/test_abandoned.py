"""Synchronous operations whose process died: nothing recovers them (they have no lease), so
they stay running until ``fail_abandoned`` finishes them as failed."""

from __future__ import annotations

import signal
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from batchframework import enqueue
from batchframework.engine import claim, fail_abandoned, recover_expired
from batchframework.engine.abandon import ABANDONED_ERROR_TYPE, DEFAULT_REASON
from batchframework.models import BatchOperation

from .helpers import wait_exit, wait_for


def _log_line(path) -> str | None:
    text = path.read_text(errors="replace")
    return text.split("running ", 1)[1].split()[0] if "running " in text else None


@pytest.mark.django_db(transaction=True)
def test_a_killed_process_leaves_its_synchronous_operation_running_until_marked_abandoned(
    reaper,
):
    process, log = reaper.python(
        """
        import time
        from batchframework.models import BatchOperation
        with BatchOperation.objects.synchronous(operationtype="import-users") as operation:
            print("running", operation.pk, flush=True)
            time.sleep(60)
        """,
        label="synchronous",
    )
    pk = int(wait_for(lambda: _log_line(log), timeout=30, what="the synchronous block"))
    process.send_signal(signal.SIGKILL)
    assert wait_exit(process, timeout=10) == -signal.SIGKILL

    # Recovery does not know it: it was never claimed, so it has no lease to expire.
    assert recover_expired() == 0
    assert list(BatchOperation.objects.running_unclaimed().values_list("pk", flat=True)) == [pk]

    assert fail_abandoned(BatchOperation.objects.filter(pk=pk)) == 1
    operation = BatchOperation.objects.get(pk=pk)
    assert (operation.status, operation.result) == ("finished", "failed")
    assert operation.finished_datetime is not None
    assert operation.error == {
        "type": ABANDONED_ERROR_TYPE,
        "message": DEFAULT_REASON,
        "traceback": "",
    }
    assert not BatchOperation.objects.running_unclaimed().exists()


@pytest.mark.django_db
def test_only_running_operations_no_worker_claimed_are_marked(django_assert_num_queries):
    pending = enqueue("test-noop")
    claimed = claim(enqueue("test-noop").pk)
    assert claimed is not None
    synchronous = BatchOperation.objects.create_synchronous(operationtype="import-users")
    manual = BatchOperation.objects.create_asynchronous(operationtype="manual-flow")
    manual.mark_as_running()
    finished = BatchOperation.objects.create_synchronous(operationtype="import-users")
    finished.finish(output_data={"imported": 3})

    with django_assert_num_queries(1):
        marked = fail_abandoned(BatchOperation.objects.all(), reason="the deploy killed it")
    assert marked == 2

    def state(operation: BatchOperation) -> tuple:
        operation.refresh_from_db()
        return operation.status, operation.result, operation.output_data

    error = {
        "error": {"type": ABANDONED_ERROR_TYPE, "message": "the deploy killed it", "traceback": ""}
    }
    assert state(synchronous) == ("finished", "failed", error)
    assert state(manual) == ("finished", "failed", error)
    assert state(pending) == ("unprocessed", "not-available", None)
    assert state(claimed) == ("running", "not-available", None)
    assert claimed.lease_expires_at is not None
    assert state(finished) == ("finished", "successful", {"imported": 3})


@pytest.mark.django_db
def test_a_block_still_running_records_its_own_outcome_over_the_mark():
    with BatchOperation.objects.synchronous(operationtype="import-users") as operation:
        assert fail_abandoned(BatchOperation.objects.filter(pk=operation.pk)) == 1
    operation.refresh_from_db()
    assert (operation.status, operation.result) == ("finished", "successful")
    # Nothing of the mark is left to contradict it.
    assert (operation.output_data, operation.last_error) == (None, "")

    # And a block that finished first keeps its outcome: the mark finds nothing running.
    assert fail_abandoned(BatchOperation.objects.filter(pk=operation.pk)) == 0
    operation.refresh_from_db()
    assert (operation.status, operation.result) == ("finished", "successful")


@pytest.mark.django_db
@pytest.mark.parametrize("reason", ["", "   ", None, 42])
def test_a_reason_that_is_not_text_is_refused_and_nothing_is_marked(reason):
    operation = BatchOperation.objects.create_synchronous(operationtype="import-users")
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        fail_abandoned(BatchOperation.objects.all(), reason=reason)
    operation.refresh_from_db()
    assert operation.status == "running"


@pytest.mark.django_db
def test_a_reason_with_nul_is_stored_escaped():
    operation = BatchOperation.objects.create_synchronous(operationtype="import-users")
    assert fail_abandoned(BatchOperation.objects.all(), reason="lost\x00host") == 1
    operation.refresh_from_db()
    assert operation.error is not None
    assert operation.error["message"] == "lost\\x00host"


# --- The command, for a scheduled job. --------------------------------------------------------


def _started_hours_ago(operation: BatchOperation, hours: float) -> None:
    started = timezone.now() - timedelta(hours=hours)
    BatchOperation.objects.filter(pk=operation.pk).update(
        started_running_datetime=started, created_datetime=started
    )


@pytest.mark.django_db
def test_the_command_marks_only_what_runs_unclaimed_for_longer_than_the_age():
    old = BatchOperation.objects.create_synchronous(operationtype="import-users")
    _started_hours_ago(old, 3)
    recent = BatchOperation.objects.create_synchronous(operationtype="import-users")
    _started_hours_ago(recent, 1)
    claimed = claim(enqueue("test-noop").pk)
    assert claimed is not None
    _started_hours_ago(claimed, 3)

    out = StringIO()
    call_command("batchframework_fail_abandoned", "--hours", "2", "--dry-run", stdout=out)
    assert out.getvalue() == "would mark 1 operation(s) abandoned\n"
    assert BatchOperation.objects.running().count() == 3

    out = StringIO()
    call_command("batchframework_fail_abandoned", "--hours", "2", stdout=out)
    assert out.getvalue().startswith("marked 1 operation(s) abandoned (running since before ")
    statuses = dict(BatchOperation.objects.values_list("pk", "status"))
    assert statuses == {
        old.pk: "finished",
        recent.pk: "running",
        claimed.pk: "running",
    }
    old.refresh_from_db()
    assert old.error is not None
    assert old.error["message"] == (
        "Marked abandoned by batchframework_fail_abandoned: running, unclaimed, for more than "
        "2 hours."
    )


@pytest.mark.django_db
@pytest.mark.parametrize("hours", ["-1", "nan", "inf", "1e30"])
def test_the_command_refuses_an_age_out_of_range_and_marks_nothing(hours):
    operation = BatchOperation.objects.create_synchronous(operationtype="import-users")
    _started_hours_ago(operation, 3)
    with pytest.raises(CommandError, match="--hours must be from 0 to"):
        call_command("batchframework_fail_abandoned", "--hours", hours)
    operation.refresh_from_db()
    assert operation.status == "running"


def test_the_command_refuses_an_age_that_is_not_a_number():
    with pytest.raises(CommandError, match="invalid float value"):
        call_command("batchframework_fail_abandoned", "--hours", "two")
