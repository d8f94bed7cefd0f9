"""``BatchRunner``, which the DB worker and the Celery tasks run claimed batches with: successes
recorded together (``FINISH_WINDOW``) stay claimed and kept alive until recorded, and each keeps
its own output; the lease keeper outlives its own errors."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import signal
import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connections, transaction
from django.utils import timezone

from batchframework import BatchOperation, enqueue
from batchframework.engine import (
    BatchRunner,
    RunOutcome,
    claim_due,
    recover_expired,
    run,
    run_claimed,
)
from batchframework.engine import batch as batch_module
from batchframework.engine import keeper as keeper_module
from batchframework.engine.keeper import LeaseKeeper, lease_keeper
from batchframework.signals import operation_finished, operation_retry_scheduled
from batchframework.testing import run_due
from tests.testapp.models import Execution

#: The module, not the function ``batchframework.engine`` exports under the same name.
run_module = importlib.import_module("batchframework.engine.run")

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.mark.parametrize("keeper", ["not due yet", "refused by the database"])
def test_a_recorded_later_success_is_not_recovered_while_the_next_handler_outlives_its_lease(
    registered, monkeypatch, caplog, keeper
):
    """A quick success waits for the batch's next flush (or the keeper's, whose statement the
    database refuses): a next handler longer than the quick one's lease must not let recovery
    take the quick one back and run it again."""
    window = 60.0  # flushed only when the batch ends
    if keeper == "refused by the database":
        window = 0.2
        real_finish = batch_module._finish_successes
        batch_thread = threading.current_thread()

        def refused_to_the_keeper(group, alias, token):
            if threading.current_thread() is not batch_thread:
                raise OperationalError("server closed the connection unexpectedly")
            return real_finish(group, alias, token)

        monkeypatch.setattr(batch_module, "_finish_successes", refused_to_the_keeper)
    recovered: list[int] = []

    @registered("runner-quick", lease=1)
    def quick(operation):
        Execution.objects.create(key=f"quick-{operation.pk}")

    @registered("runner-long", lease=1)
    def long(operation):
        time.sleep(2.5)  # over two leases of the quick operation
        recovered.append(recover_expired())  # what any poller does meanwhile
        connections.close_all()  # this thread's (the test's) connection stays usable

    first = enqueue("runner-quick", priority=1)
    enqueue("runner-long")
    claimed = claim_due(limit=2)
    assert [op.operationtype for op in claimed] == ["runner-quick", "runner-long"]
    with caplog.at_level("WARNING", logger="batchframework"), BatchRunner(window=window) as runner:
        runner.run_batch(claimed)
    run_due()  # nothing was put back, so nothing runs again

    assert recovered == [0]
    assert runner.outcomes == [RunOutcome.SUCCEEDED, RunOutcome.SUCCEEDED]
    assert Execution.objects.filter(key=f"quick-{first.pk}").count() == 1
    assert BatchOperation.objects.get(pk=first.pk).result == BatchOperation.RESULT_SUCCESSFUL
    assert ("event=finish_deferred_failed" in caplog.text) == (keeper != "not due yet")


@pytest.mark.parametrize(
    "outputs",
    [[1, True], [0, False], [1, 1.0], [{"a": 1}, {"a": True}], [None, {"sent": True}, None]],
)
def test_successes_recorded_together_keep_each_its_own_output(registered, outputs):
    """Equal in Python (``1 == True == 1.0``) is not the same JSON."""

    @registered("runner-echo")
    def echo(operation):
        return operation.input_data["value"]

    operations = [enqueue("runner-echo", input_data={"value": value}) for value in outputs]
    with BatchRunner(window=60) as runner:
        runner.run_batch(claim_due(limit=10))
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * len(outputs)
    stored = [BatchOperation.objects.get(pk=op.pk).output_data for op in operations]
    assert json.dumps(stored) == json.dumps(outputs)


def test_the_lease_keeper_goes_on_renewing_after_an_unexpected_error(registered, monkeypatch):
    """An error the keeper did not foresee, in a renewal, must not end the renewals of the
    handlers running then, or recovery would take them while they run."""
    real_renew = keeper_module.LeaseKeeper._renew
    failures = {"left": 1}

    def failing_once(self, item):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("unexpected")
        return real_renew(self, item)

    monkeypatch.setattr(keeper_module.LeaseKeeper, "_renew", failing_once)
    recovered: list[int] = []

    @registered("runner-slow", lease=1)
    def slow(operation):
        time.sleep(operation.input_data["seconds"])

    long = enqueue("runner-slow", input_data={"seconds": 3})
    short = enqueue("runner-slow", input_data={"seconds": 0.5})
    [long_claimed] = claim_due(operationtypes=["runner-slow"], limit=1)
    [short_claimed] = claim_due(operationtypes=["runner-slow"], limit=1)

    def run(operation):
        try:
            run_claimed(operation)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(op,)) for op in (long_claimed, short_claimed)]
    for thread in threads:
        thread.start()
    time.sleep(2.2)  # over two leases: only renewals keep the long one
    recovered.append(recover_expired())
    for thread in threads:
        thread.join(10)

    assert failures["left"] == 0, "the injected error was not raised"
    assert recovered == [0]
    for operation in (long, short):
        assert BatchOperation.objects.get(pk=operation.pk).result == (
            BatchOperation.RESULT_SUCCESSFUL
        )


def test_a_held_lease_already_partly_gone_is_renewed_in_time(registered):
    """A success is held from wherever its lease stands (claimed before earlier handlers of the
    batch ran): the keeper renews it before it lapses, not a third of a lease after the hold."""

    @registered("runner-held", lease=3)
    def held(operation):
        return None

    operation = enqueue("runner-held")
    [claimed] = claim_due(operationtypes=["runner-held"])
    # As if 2.6 s of its 3 s lease had gone by in the batch before its turn.
    claimed.lease_expires_at = timezone.now() + timedelta(milliseconds=400)
    BatchOperation.objects.filter(pk=claimed.pk).update(lease_expires_at=claimed.lease_expires_at)
    key = lease_keeper.hold(claimed, timedelta(seconds=3), "default")
    try:
        time.sleep(0.7)  # past the lease it had; a renewal a third of a lease on comes at 1 s
        assert recover_expired() == 0
        assert BatchOperation.objects.get(pk=operation.pk).lease_expires_at > timezone.now()
    finally:
        lease_keeper.let_go(key)


def test_one_operations_renewal_error_does_not_starve_the_others(registered, monkeypatch):
    real_renew = keeper_module.LeaseKeeper._renew
    broken: set[int] = set()

    def renew(self, item):
        if item.pk in broken:
            raise RuntimeError("this one keeps failing")
        return real_renew(self, item)

    monkeypatch.setattr(keeper_module.LeaseKeeper, "_renew", renew)

    @registered("runner-kept", lease=1)
    def kept(operation):
        return None

    first, second = enqueue("runner-kept"), enqueue("runner-kept")
    claimed = claim_due(operationtypes=["runner-kept"])
    broken.add(first.pk)
    keys = [lease_keeper.hold(op, timedelta(seconds=1), "default") for op in claimed]
    try:
        time.sleep(2.2)  # over two leases: only renewals keep the second one
        lease = BatchOperation.objects.get(pk=second.pk).lease_expires_at
        assert lease > timezone.now(), "the second operation's lease was not renewed"
    finally:
        for key in keys:
            lease_keeper.let_go(key)


def test_a_success_recorded_while_its_lease_is_renewed_raises_no_false_alarm(registered, caplog):
    """A renewal that meets the operation already finished by its own batch is not a lost
    claim: ``lease_renewal_refused`` means another worker may be running it, so it must not be
    logged for a success (here each success is due a renewal just as the batch records it)."""

    @registered("runner-third-of-lease", lease=1.5)
    def third_of_lease(operation):
        time.sleep(0.55)  # over a third of the lease: the keeper renews as the success is held

    for _ in range(6):
        enqueue("runner-third-of-lease")
    with caplog.at_level("WARNING", logger="batchframework"), BatchRunner(window=0.01) as runner:
        runner.run_batch(claim_due(limit=6))
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 6
    assert "lease_renewal_refused" not in caplog.text


def test_a_claim_lost_while_its_handler_runs_is_logged_once(registered, caplog):
    """The keeper's renewals of a running handler whose claim was taken (here, as if a poller
    had wrongly presumed the worker dead) are refused: that is said once, not every renewal."""

    @registered("runner-loses-claim", lease=1)
    def loses_claim(operation):
        BatchOperation.objects.filter(pk=operation.pk).update(claimed_by="someone-else")
        time.sleep(1.5)  # several renewal times (every third of the lease)

    enqueue("runner-loses-claim")
    [claimed] = claim_due(limit=1)
    with caplog.at_level("WARNING", logger="batchframework"):
        assert run_claimed(claimed) is RunOutcome.LOST_CLAIM
    assert caplog.text.count("lease_renewal_refused") == 1


@pytest.mark.parametrize("worker_clock_slow_by", [0.0, 1.8], ids=["clocks-agree", "1.8s-slow"])
def test_a_batch_mate_whose_lease_was_recovered_is_not_started_on_a_slow_clock(
    registered, monkeypatch, worker_clock_slow_by
):
    """Two operations claimed in one batch (lease 2 s); the first runs 2.3 s, so the second's
    lease expires while it waits, and a poller recovers it and another worker runs it. The
    batch's worker must drop it, not run it again, even when its clock is behind the
    database's (the claim's leases are on the database's clock): it would otherwise think the
    lease fresh and skip the fenced renewal that finds the claim gone."""
    stolen: list[RunOutcome] = []

    @registered("runner-long-first", lease=2)
    def long(operation):
        time.sleep(2.3)
        recover_expired()  # what any poller does meanwhile, and another worker after it
        stolen.append(run(second.pk, worker="other-worker"))
        connections.close_all()

    @registered("runner-quick-second", lease=2)
    def quick(operation):
        Execution.objects.create(key=f"quick-{operation.pk}")

    real_now = timezone.now
    monkeypatch.setattr(
        timezone, "now", lambda: real_now() - timedelta(seconds=worker_clock_slow_by)
    )
    enqueue("runner-long-first", priority=1)
    second = enqueue("runner-quick-second")
    claimed = claim_due(limit=2, operationtypes=["runner-long-first", "runner-quick-second"])
    assert [op.operationtype for op in claimed] == ["runner-long-first", "runner-quick-second"]
    with BatchRunner(window=0) as runner:
        runner.run_batch(claimed)
    assert stolen == [RunOutcome.SUCCEEDED]
    runs = Execution.objects.filter(key=f"quick-{second.pk}").count()
    assert runs == 1, f"the quick handler ran {runs} times; outcomes {runner.outcomes}"


def test_a_long_handler_gives_back_the_operations_waiting_behind_it(registered, caplog):
    """A handler that runs over half the lease of the operations claimed behind it must not
    hold them: they are given back before their leases expire (so no recovery takes them for a
    lost worker's, marking them to be claimed alone), and another claimer can run them while it
    still runs. The batch then ends without running them."""
    caplog.set_level("INFO", logger="batchframework")
    taken: list[BatchOperation] = []

    @registered("runner-waiting", lease=2)
    def waiting(operation):
        Execution.objects.create(key=f"waiting-{operation.pk}")

    @registered("runner-long", lease=2)
    def long(operation):
        time.sleep(1.7)  # past two thirds of the waiting ones' lease, short of all of it
        taken.extend(claim_due(operationtypes=["runner-waiting"], limit=10))

    enqueue("runner-long", priority=1)
    behind = [enqueue("runner-waiting").pk for _ in range(3)]
    claimed = claim_due(limit=4)
    assert claimed[0].operationtype == "runner-long"
    with BatchRunner() as runner:
        assert runner.run_batch(claimed) == 1

    assert sorted(op.pk for op in taken) == behind, "still held by the long handler's batch"
    for operation in BatchOperation.objects.filter(pk__in=behind):
        assert (operation.attempts, operation.last_error) == (1, "")  # the new claim's attempt
        assert operation.claimed_by != "!isolated"
    assert "event=waiting_released count=3" in caplog.text
    with BatchRunner() as runner:
        assert runner.run_batch(taken) == 3
    assert Execution.objects.filter(key__startswith="waiting-").count() == 3


def test_handlers_within_half_the_lease_keep_the_whole_batch(registered, caplog):
    """Each handler runs well within the lease, the batch as a whole over two leases: the
    batch keeps every operation (renewed between handlers), none is given back or recovered."""
    caplog.set_level("INFO", logger="batchframework")

    @registered("runner-steady", lease=2)
    def steady(operation):
        time.sleep(0.8)
        Execution.objects.create(key=f"steady-{operation.pk}")

    ids = [enqueue("runner-steady").pk for _ in range(6)]
    with BatchRunner() as runner:
        assert runner.run_batch(claim_due(limit=6)) == 6
    assert recover_expired() == 0
    assert "waiting_released" not in caplog.text
    assert Execution.objects.filter(key__in=[f"steady-{pk}" for pk in ids]).count() == 6
    assert set(BatchOperation.objects.filter(pk__in=ids).values_list("attempts", flat=True)) == {1}


def test_a_handler_returning_while_its_batch_is_given_back_never_runs_them_too(
    registered, monkeypatch
):
    """The handler returns while the keeper's give-back statement is still on its way: the
    batch must wait for its outcome, not run operations that may be another claimer's."""
    real_release = keeper_module.release
    releasing = threading.Event()

    def slow_release(operations, *, using=None):
        releasing.set()
        time.sleep(0.5)  # the handler returns meanwhile
        return real_release(operations, using=using)

    monkeypatch.setattr(keeper_module, "release", slow_release)

    @registered("runner-waiting", lease=1)
    def waiting(operation):
        Execution.objects.create(key=f"waiting-{operation.pk}")

    @registered("runner-returns", lease=1)
    def returns(operation):
        assert releasing.wait(5), "the keeper never gave the waiting ones back"

    enqueue("runner-returns", priority=1)
    behind = [enqueue("runner-waiting").pk for _ in range(2)]
    with BatchRunner() as runner:
        assert runner.run_batch(claim_due(limit=3)) == 1
    assert not Execution.objects.filter(key__startswith="waiting-").exists()
    assert set(BatchOperation.objects.filter(pk__in=behind).values_list("status", flat=True)) == {
        BatchOperation.STATUS_UNPROCESSED
    }


def test_a_batch_whose_leases_ran_out_before_it_started_runs_nothing_recovered(registered):
    """A pause between the claim and the batch's start (a slow caller of this public API, a
    stalled process): recovery took the batch back, another worker ran one of it. The batch
    must check its claim before its first handler, not only between handlers."""

    @registered("runner-paused", lease=1)
    def paused(operation):
        Execution.objects.create(key=f"paused-{operation.pk}")

    first, second = enqueue("runner-paused"), enqueue("runner-paused")
    claimed = claim_due(operationtypes=["runner-paused"], limit=2)
    time.sleep(1.3)  # the leases run out before the batch starts
    assert recover_expired() == 2
    assert run(first.pk, worker="other-worker") is RunOutcome.SUCCEEDED
    with BatchRunner() as runner:
        assert runner.run_batch(claimed) == 0
    assert Execution.objects.filter(key=f"paused-{first.pk}").count() == 1
    assert not Execution.objects.filter(key=f"paused-{second.pk}").exists()
    assert BatchOperation.objects.get(pk=second.pk).status == BatchOperation.STATUS_UNPROCESSED


def test_a_batch_run_inside_the_callers_transaction_gives_nothing_back(registered):
    """An eager Celery task in a test's atomic block runs its batch in that transaction: the
    keeper's thread, on its own connection, can't see those rows, so it must not give back
    the waiting operation (the batch would then drop it, and it would never run)."""

    @registered("runner-tx-slow", lease=1)
    def slow(operation):
        time.sleep(0.9)  # past half the waiting one's lease

    @registered("runner-tx-next", lease=1)
    def after(operation):
        return None

    ids = [enqueue("runner-tx-slow", priority=1).pk, enqueue("runner-tx-next").pk]
    with transaction.atomic():
        claimed = claim_due(limit=2)
        assert [op.pk for op in claimed] == ids
        with BatchRunner() as runner:
            assert runner.run_batch(claimed) == 2
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 2
    assert BatchOperation.objects.filter(pk__in=ids).successful().count() == 2


@pytest.fixture
def finished_signals():
    """``operation_finished`` as sent: (operation id, succeeded, the sending thread)."""
    sent: list[tuple[int, bool, threading.Thread]] = []

    def receive(sender, operation, succeeded, error, **kwargs):
        sent.append((operation.pk, succeeded, threading.current_thread()))

    operation_finished.connect(receive)
    yield sent
    operation_finished.disconnect(receive)


def _status_while_running(pk: int, *, until: str, seconds: float) -> str:
    """Poll operation ``pk``'s status from inside a handler until it is ``until`` (or time is
    up); returns the last one seen."""
    deadline = time.monotonic() + seconds
    status = BatchOperation.objects.get(pk=pk).status
    while status != until and time.monotonic() < deadline:
        time.sleep(0.05)
        status = BatchOperation.objects.get(pk=pk).status
    return status


def test_a_success_is_recorded_while_the_next_handler_still_runs(registered, finished_signals):
    """A long handler must not keep the successes held before it *running* until it returns:
    the lease keeper records them when their window is over. The batch still reports them, on
    its own thread, once."""
    seen: list[str] = []

    @registered("runner-first-quick")
    def quick(operation):
        return {"quick": operation.pk}

    @registered("runner-then-long")
    def long(operation):
        seen.append(_status_while_running(first.pk, until="finished", seconds=5))

    first = enqueue("runner-first-quick", priority=1)
    second = enqueue("runner-then-long")
    with BatchRunner(window=0.2) as runner:
        assert runner.run_batch(claim_due(limit=2)) == 2

    assert seen == [BatchOperation.STATUS_FINISHED], "recorded only once the long one returned"
    stored = BatchOperation.objects.get(pk=first.pk)
    assert (stored.result, stored.output_data) == (
        BatchOperation.RESULT_SUCCESSFUL,
        {"quick": first.pk},
    )
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 2
    assert [(pk, ok) for pk, ok, _ in finished_signals] == [(first.pk, True), (second.pk, True)]
    assert {thread for _, _, thread in finished_signals} == {threading.current_thread()}


@pytest.mark.timeout(30)
def test_successes_in_the_callers_transaction_wait_for_their_batch(registered, caplog):
    """Uncommitted (and on PostgreSQL locked by the batch's own transaction), they are not the
    keeper's to record: its statement would wait for a transaction waiting for it."""

    @registered("runner-tx-quick")
    def quick(operation):
        return None

    @registered("runner-tx-long")
    def long(operation):
        time.sleep(1.0)  # well past the window and the keeper's next tick

    ids = [enqueue("runner-tx-quick", priority=1).pk, enqueue("runner-tx-long").pk]
    with (
        caplog.at_level("WARNING", logger="batchframework"),
        transaction.atomic(),
        BatchRunner(window=0.1) as runner,
    ):
        assert runner.run_batch(claim_due(limit=2)) == 2
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 2
    assert BatchOperation.objects.filter(pk__in=ids).successful().count() == 2
    assert "finish_deferred_failed" not in caplog.text
    assert "lease_keeper_error" not in caplog.text


class _Interrupted(Exception):
    """Stands for Celery's soft time limit: raised once, wherever the worker happens to be."""


@pytest.mark.parametrize("where", ["between handlers", "at the batch's end"])
def test_an_interruption_landing_in_the_flush_loses_no_success(registered, monkeypatch, where):
    """The interruption arrives while the batch records its successes: they must still be
    recorded as it leaves, not left *running* until their leases run out (and run again)."""
    real_finish = batch_module._finish_successes
    calls: list[int] = []

    def interrupted_once(group, alias, token):
        calls.append(len(group))
        if len(calls) == 1:
            raise _Interrupted
        return real_finish(group, alias, token)

    monkeypatch.setattr(batch_module, "_finish_successes", interrupted_once)

    @registered("runner-flush-quick", lease=1)
    def quick(operation):
        Execution.objects.create(key=f"flush-{operation.pk}")
        if where == "between handlers":
            time.sleep(0.06)  # the window is over after the first: the batch flushes

    ids = [enqueue("runner-flush-quick").pk for _ in range(3)]
    with pytest.raises(_Interrupted), BatchRunner(window=0.05, interruptions=(_Interrupted,)) as r:
        r.run_batch(claim_due(limit=3))
    time.sleep(1.2)  # past the leases: anything left running would be recovered now
    assert recover_expired() == 0
    # Between handlers, the batch ends there and gives the two not started back.
    assert r.outcomes == [RunOutcome.SUCCEEDED] * (1 if where == "between handlers" else 3)
    run_due()
    assert BatchOperation.objects.filter(pk__in=ids).successful().count() == 3
    assert Execution.objects.filter(key__startswith="flush-").count() == 3  # each ran once


def test_work_deferred_while_the_keeper_is_busy_is_done_in_time():
    """The keeper is in the middle of other work (a slow statement) when a batch defers work
    due in 50 ms: it must not then sleep its full second before looking again."""
    keeper = LeaseKeeper()  # a private one: nothing else runs on it
    busy = threading.Event()
    done_at: list[float] = []

    def slow_statement():
        busy.set()
        time.sleep(0.3)

    keeper.defer(slow_statement, at=time.monotonic(), failed_event="test_failed")
    assert busy.wait(5)
    due = time.monotonic() + 0.05
    keeper.defer(lambda: done_at.append(time.monotonic()), at=due, failed_event="test_failed")
    deadline = time.monotonic() + 3
    while not done_at and time.monotonic() < deadline:
        time.sleep(0.01)
    # At most the rest of the slow statement, then up to MIN_INTERVAL (0.2 s) late.
    assert done_at and done_at[0] - due < 0.3 + keeper_module.MIN_INTERVAL + 0.1, done_at


def test_the_keeper_tries_again_when_the_database_did_not_answer(registered, monkeypatch, caplog):
    """The database does not answer the keeper's first try: a handler that runs on (or hangs)
    must not keep the successes before it *running* for good."""
    real_finish = batch_module._finish_successes
    batch_thread = threading.current_thread()
    keeper_tries: list[float] = []

    def first_keeper_try_fails(group, alias, token):
        if threading.current_thread() is not batch_thread:
            keeper_tries.append(time.monotonic())
            if len(keeper_tries) == 1:
                raise OperationalError("server closed the connection unexpectedly")
        return real_finish(group, alias, token)

    monkeypatch.setattr(batch_module, "_finish_successes", first_keeper_try_fails)
    seen: list[str] = []

    @registered("runner-quick-retried")
    def quick(operation):
        return None

    @registered("runner-long-retried")
    def long(operation):
        seen.append(_status_while_running(first.pk, until="finished", seconds=5))

    first = enqueue("runner-quick-retried", priority=1)
    enqueue("runner-long-retried")
    with caplog.at_level("WARNING", logger="batchframework"), BatchRunner(window=0.1) as runner:
        assert runner.run_batch(claim_due(limit=2)) == 2
    assert "event=finish_deferred_failed" in caplog.text
    assert len(keeper_tries) == 2
    assert seen == [BatchOperation.STATUS_FINISHED]
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 2


@pytest.mark.timeout(30)
def test_a_signal_cutting_the_flush_statement_short_still_ends_the_batch_with_it(registered):
    """A soft time limit's exception, raised by a real signal while the flush's UPDATE waits
    on the server: psycopg leaves that session busy with the statement. The batch must record
    the successes on a new session and end with the interruption, not with the driver's
    "another command is already in progress"."""
    if connections["default"].vendor != "postgresql":
        pytest.skip("a row lock to make the UPDATE wait, and a driver interruptible mid-query")

    @registered("runner-cut-flush")
    def quick(operation):
        return None

    ids = [enqueue("runner-cut-flush").pk for _ in range(2)]
    claimed = claim_due(limit=2)
    locked, interrupted = threading.Event(), threading.Event()

    def hold_a_row_lock():  # another session holds one row: the flush's UPDATE waits for it
        try:
            with transaction.atomic():
                list(BatchOperation.objects.select_for_update().filter(pk=ids[0]))
                locked.set()
                interrupted.wait(10)
                time.sleep(0.2)  # the batch's retry now waits for it too
        finally:
            connections.close_all()

    locker = threading.Thread(target=hold_a_row_lock)
    locker.start()
    assert locked.wait(5)
    with (
        _interrupted_once_waiting("UPDATE %batchframework_batchoperation%", then=interrupted),
        pytest.raises(_Interrupted),
        BatchRunner(window=60, interruptions=(_Interrupted,)) as r,
    ):
        r.run_batch(claimed)
    locker.join(10)
    assert r.outcomes == [RunOutcome.SUCCEEDED] * 2
    assert BatchOperation.objects.filter(pk__in=ids).successful().count() == 2


@pytest.mark.timeout(30)
def test_a_signal_cutting_a_handlers_query_short_still_gives_the_rest_back(registered):
    """The interruption lands in the handler's own query: the batch must still give back the
    operations it had not started (on a new session), not leave them claimed until their
    leases run out, to be claimed alone from then on."""
    if connections["default"].vendor != "postgresql":
        pytest.skip("a driver interruptible mid-query")

    @registered("runner-cut-query", lease=60)
    def slow_query(operation):
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT pg_sleep(2)")

    ids = [enqueue("runner-cut-query").pk for _ in range(3)]
    with (
        _interrupted_once_waiting("SELECT pg_sleep(2)"),
        pytest.raises(_Interrupted),
        BatchRunner(interruptions=(_Interrupted,)) as runner,
    ):
        runner.run_batch(claim_due(limit=3))
    statuses = dict(BatchOperation.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert [statuses[pk] for pk in ids[1:]] == [BatchOperation.STATUS_UNPROCESSED] * 2
    assert not BatchOperation.objects.filter(pk__in=ids, claimed_by="!isolated").exists()


@contextlib.contextmanager
def _interrupted_once_waiting(query: str, then: threading.Event | None = None):
    """Raise :class:`_Interrupted` in this (the main) thread, with a real signal, once another
    session of this database runs a statement like ``query`` (SQL ``LIKE``); set ``then``."""
    main = threading.main_thread().ident
    assert main == threading.get_ident(), "signals are delivered to the main thread"
    stop = threading.Event()

    def watch():
        try:
            with connections["default"].cursor() as cursor:
                while not stop.is_set():
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND state = 'active' "
                        "AND query LIKE %s AND pid <> pg_backend_pid()",
                        [query],
                    )
                    if cursor.fetchone()[0]:
                        time.sleep(0.05)  # well inside the statement
                        signal.pthread_kill(main, signal.SIGALRM)
                        break
                    time.sleep(0.01)
        finally:
            if then is not None:
                then.set()
            connections.close_all()

    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(10)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("how", ["the database fails at the end", "interrupted, then it fails"])
def test_successes_a_batch_could_not_record_are_left_to_recovery(registered, monkeypatch, how):
    """The batch is over and could not record its successes (the database was down): once the
    database is back, recovery must find them when their leases run out (as the log says,
    ``fallback=recovery``); the keeper must not keep them alive for as long as the worker
    process lives."""
    database_up = [True]
    real_finish = batch_module._finish_successes

    def finish(group, alias, token):
        if not database_up[0]:
            raise OperationalError("the database is down")
        return real_finish(group, alias, token)

    monkeypatch.setattr(batch_module, "_finish_successes", finish)

    @registered("runner-unrecorded", lease=1)
    def quick(operation):
        if how == "interrupted, then it fails" and operation.pk == ids[1]:
            database_up[0] = False
            raise _Interrupted

    ids = [enqueue("runner-unrecorded").pk for _ in range(2)]
    if how == "the database fails at the end":
        database_up[0] = False
    raised = OperationalError if how == "the database fails at the end" else _Interrupted
    with pytest.raises(raised), BatchRunner(window=60, interruptions=(_Interrupted,)) as runner:
        runner.run_batch(claim_due(limit=2))
    database_up[0] = True  # back; the worker process lives on
    time.sleep(2.2)  # two leases
    assert recover_expired() >= 1
    assert BatchOperation.objects.get(pk=ids[0]).status == BatchOperation.STATUS_UNPROCESSED


@pytest.fixture
def second_claim_refused(monkeypatch):
    """The database fails the UPDATE of the second claim a flush records (and only that)."""
    calls: list[str] = []
    real_finish = batch_module._finish_successes

    def second_claim_fails(group, alias, token):
        calls.append(token)
        if len(calls) == 2:
            raise OperationalError("the database is down")
        return real_finish(group, alias, token)

    monkeypatch.setattr(batch_module, "_finish_successes", second_claim_fails)


@pytest.mark.usefixtures("second_claim_refused")
def test_a_claim_recorded_before_a_later_one_failed_is_reported_not_kept(registered, caplog):
    """One flush, two claims: the first claim's UPDATE commits, the second's fails. The first
    is reported as finished now; kept alive again, the keeper would renew a finished row and
    log its claim as lost."""

    @registered("runner-two-claims", lease=1)
    def quick(operation):
        return None

    enqueue("runner-two-claims")
    enqueue("runner-two-claims")
    first, second = claim_due(limit=1)[0], claim_due(limit=1)[0]
    with caplog.at_level("WARNING", logger="batchframework"), BatchRunner(window=60) as runner:
        runner.run(first)
        runner.run(second)
        with pytest.raises(OperationalError):
            runner.flush()
        assert runner.outcomes == [RunOutcome.SUCCEEDED]  # the first claim's
        time.sleep(0.8)  # past a third of the lease: the keeper renews what it keeps
    assert runner.outcomes == [RunOutcome.SUCCEEDED] * 2  # the second, at the runner's exit
    assert BatchOperation.objects.filter(pk__in=[first.pk, second.pk]).successful().count() == 2
    assert "lease_renewal_refused" not in caplog.text


@pytest.mark.usefixtures("second_claim_refused")
@pytest.mark.parametrize("receiver_raises", ["a bug", "an interruption"])
def test_a_partly_recorded_flush_reports_each_recorded_success(registered, receiver_raises):
    """A flush of three successes from two claims records the first claim's two, then the
    second claim's UPDATE fails. A receiver of ``operation_finished`` that raises a bug for the
    first must not cost the second its signal (nor either its outcome); one that raises an
    interruption (a soft time limit) makes the interruption, not the database's error, what
    the flush raises."""

    @registered("runner-partly")
    def quick(operation):
        return None

    for _ in range(3):
        enqueue("runner-partly")
    claims = [*claim_due(limit=2), *claim_due(limit=1)]
    signalled: list[int] = []

    def receiver(sender, operation, **kwargs):
        signalled.append(operation.pk)
        if len(signalled) == 1:
            raise RuntimeError("a receiver's bug") if receiver_raises == "a bug" else _Interrupted

    operation_finished.connect(receiver)
    try:
        with BatchRunner(window=60, interruptions=(_Interrupted,)) as runner:
            for operation in claims:
                runner.run(operation)
            expected = OperationalError if receiver_raises == "a bug" else _Interrupted
            with pytest.raises(expected):
                runner.flush()
            if receiver_raises == "a bug":
                assert signalled == [op.pk for op in claims[:2]]
                assert runner.outcomes == [RunOutcome.SUCCEEDED] * 2
    finally:
        operation_finished.disconnect(receiver)
    assert BatchOperation.objects.filter(pk__in=[op.pk for op in claims]).successful().count() == 3


@pytest.mark.parametrize("marked_alone", [False, True])
def test_a_retry_rolled_back_with_its_atomic_handler_leaves_the_lease_ended(
    registered, marked_alone
):
    """An ``atomic=True`` handler's failure is recorded in its transaction: if a receiver of
    ``operation_retry_scheduled`` raises, the retry rolls back and the row is still running
    under the claim. The runner must still fence by that claim when it ends the lease, so
    that the next recovery takes the operation back instead of waiting out the lease."""

    @registered("runner-atomic-fails", atomic=True, max_attempts=2, retry_backoff=60)
    def fails(operation):
        raise LookupError("fails")

    def receiver_fails(**kwargs):
        raise RuntimeError("receiver failed")

    op = enqueue("runner-atomic-fails")
    if marked_alone:
        BatchOperation.objects.filter(pk=op.pk).update(claimed_by="!isolated")
    claimed = claim_due(limit=1)
    operation_retry_scheduled.connect(receiver_fails, dispatch_uid="test-receiver-fails")
    try:
        with pytest.raises(RuntimeError, match="receiver failed"), BatchRunner() as runner:
            runner.run_batch(claimed)
    finally:
        operation_retry_scheduled.disconnect(dispatch_uid="test-receiver-fails")
    row = BatchOperation.objects.get(pk=op.pk)
    assert (row.status, row.claimed_by) == (BatchOperation.STATUS_RUNNING, claimed[0].claimed_by)
    assert row.lease_expires_at <= timezone.now()
    assert recover_expired() == 1


@pytest.mark.parametrize(
    ("window", "atomic"),
    [(60, False), (0, False), (60, True)],
    ids=["held-success", "finished-at-once", "atomic"],
)
def test_an_interruption_after_the_handler_returned_keeps_its_run(
    registered, monkeypatch, caplog, window, atomic
):
    """Celery's soft time limit can land after the handler has returned, in the engine's own
    work (here, checking the output). The run was thrown away: the handler ran again and, its
    attempts spent, was failed as a lost worker's, logged as ``handler_interrupted``. Now it
    is recorded; the interruption goes on, and the operations not started are given back.
    An atomic handler's transaction is still rolled back: its run never happened."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    checked: list[object] = []
    real_check = run_module.check_output

    def interrupted_once(output):
        checked.append(output)
        if len(checked) == 1:
            raise _Interrupted
        return real_check(output)

    monkeypatch.setattr(run_module, "check_output", interrupted_once)

    @registered("runner-returns-then-interrupted", lease=1, atomic=atomic)
    def returns(operation):
        Execution.objects.create(key=f"returned-{operation.pk}")
        return {"done": operation.pk}

    first, second = (enqueue("runner-returns-then-interrupted", priority=p) for p in (1, 0))
    with (
        pytest.raises(_Interrupted),
        BatchRunner(window=window, interruptions=(_Interrupted,)) as runner,
    ):
        runner.run_batch(claim_due(limit=2))
    first.refresh_from_db()
    second.refresh_from_db()
    if atomic:  # the interruption propagated out of its transaction: recovery's, as before
        assert first.status == BatchOperation.STATUS_RUNNING
        assert "event=handler_interrupted" in caplog.text
    else:
        assert (first.status, first.result) == ("finished", "successful")
        assert first.output_data == {"done": first.pk}
        assert runner.outcomes == [RunOutcome.SUCCEEDED]
        assert "handler_interrupted" not in caplog.text
    assert second.status == BatchOperation.STATUS_UNPROCESSED  # given back, not started
    assert Execution.objects.filter(key__startswith="returned-").count() == (0 if atomic else 1)
