"""Races and crashes with real separate processes (and threads, each with its own connection)
on the configured database: one claim per attempt, cancel is final, debounce keeps one pending
row, dead workers are recovered, live ones are never robbed, and workers stop gracefully.

Subprocesses use ``tests.settings`` with a DATABASE_URL that points at the *test* database
(see :func:`tests.integration.helpers.test_database_url`). Every wait is bounded.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from batchframework import BatchOperation, enqueue, enqueue_many
from batchframework import worker as worker_module
from batchframework.engine import (
    BatchRunner,
    CancelOutcome,
    RunOutcome,
    cancel,
    cancel_many,
    claim_due,
    recover_expired,
    run,
)
from batchframework.engine.run import run_claimed
from batchframework.testing import run_due
from batchframework.worker import Worker
from tests.testapp.models import Effect, Execution, Post

from .helpers import ROOT, run_python, subprocess_env, wait_exit, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]


def fresh(op: BatchOperation) -> BatchOperation:
    return BatchOperation.objects.get(pk=op.pk)


def executions(op: BatchOperation) -> int:
    return Execution.objects.filter(key=str(op.pk)).count()


def wait_started(op: BatchOperation, *, timeout: float = 30) -> None:
    """Until the handler of ``op`` has begun (it writes an Execution row first)."""
    wait_for(
        lambda: Execution.objects.filter(key=str(op.pk)).exists(),
        timeout=timeout,
        what=f"the handler of operation {op.pk} to start",
    )


def wait_worker_ready(log_path, *, timeout: float = 30) -> None:
    wait_for(
        lambda: "worker started" in log_path.read_text(errors="replace"),
        timeout=timeout,
        what=f"the worker logging to {log_path.name} to start",
    )


class Threads:
    """Run functions in threads that each use (and finally close) their own DB connection;
    re-raise the first exception a thread raised."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def start(self, target, *args) -> None:
        def body():
            try:
                target(*args)
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                connections.close_all()

        thread = threading.Thread(target=body, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"{len(alive)} thread(s) still running after {timeout}s"
        if self.errors:
            raise self.errors[0]


# --- One claim per attempt (invariant 1) -----------------------------------------------------
CLAIMER = """
import json, os, time
from batchframework.engine import run, RunOutcome
pks = json.loads(__PKS__); go = __GO__
open(__READY__, "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(go):
    assert time.monotonic() < deadline, "no go signal"
    time.sleep(0.005)
won = [pk for pk in pks if run(pk) is RunOutcome.SUCCEEDED]
print("WON " + json.dumps(won))
"""


def test_two_claimer_processes_one_wins_each_operation(reaper, tmp_path):
    operations = enqueue_many("test-effect", [{} for _ in range(150)])
    pks = [op.pk for op in operations]
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        reaper.python(
            CLAIMER.replace("__PKS__", repr(json.dumps(pks)))
            .replace("__GO__", repr(str(go)))
            .replace("__READY__", repr(str(ready[i]))),
            label=f"claimer{i}",
        )
        for i in range(2)
    ]
    # Both interpreters have imported Django and wait for the go signal: start them together.
    wait_for(lambda: all(path.exists() for path in ready), timeout=30, what="both claimers")
    go.touch()
    won = []
    for process, log in procs:
        assert wait_exit(process, timeout=60, log_path=log) == 0, log.read_text()
        line = [ln for ln in log.read_text().splitlines() if ln.startswith("WON ")]
        won.append(set(json.loads(line[-1][4:])))
    assert won[0].isdisjoint(won[1])
    assert won[0] | won[1] == set(pks)
    assert Effect.objects.count() == len(pks)
    assert Execution.objects.count() == len(pks)  # every handler ran exactly once
    assert set(BatchOperation.objects.values_list("attempts", flat=True)) == {1}
    assert BatchOperation.objects.successful().count() == len(pks)


@pytest.mark.timeout(150)
def test_four_workers_run_every_operation_exactly_once(reaper):
    # SQLite serializes every write on one file lock: 500 keeps it well under a minute.
    total = 500 if connection.vendor == "sqlite" else 2000
    workers = [
        reaper.worker(
            "--batch-size", "25", "--poll-interval", "0.1", "--name", f"w{i}", label=f"w{i}"
        )
        for i in range(4)
    ]
    for _, log in workers:
        wait_worker_ready(log)
    enqueue_many("test-effect", [{} for _ in range(total)])
    wait_for(
        lambda: BatchOperation.objects.finished().count() == total,
        timeout=100,
        interval=0.2,
        what=f"{total} operations to finish",
    )
    for process, _ in workers:
        process.send_signal(signal.SIGTERM)
    for process, log in workers:
        assert wait_exit(process, timeout=15, log_path=log) == 0, log.read_text()
    assert Effect.objects.count() == total
    assert Execution.objects.count() == total
    assert BatchOperation.objects.successful().count() == total
    assert not BatchOperation.objects.exclude(status=BatchOperation.STATUS_FINISHED).exists()
    assert set(BatchOperation.objects.values_list("attempts", flat=True)) == {1}
    names = {c.split(":")[0] for c in BatchOperation.objects.values_list("claimed_by", flat=True)}
    assert names <= {"w0", "w1", "w2", "w3"} and len(names) >= 2, names


def in_lockstep(items, first, second) -> tuple[dict, dict]:
    """Call ``first(item)`` and ``second(item)`` at the same moment, each on a thread (and a
    database connection) of its own, for each of ``items`` in turn; their results by item."""
    barrier = threading.Barrier(2, timeout=20)
    results: tuple[dict, dict] = ({}, {})

    def calling(function, into):
        def each():
            for item in items:
                barrier.wait()
                into[item] = function(item)

        return each

    threads = Threads()
    threads.start(calling(first, results[0]))
    threads.start(calling(second, results[1]))
    threads.join(timeout=75)
    return results


# --- Cancel is final (invariant 3) -----------------------------------------------------------
def test_cancel_racing_a_claim_either_runs_once_or_never():
    iterations = 150
    pks = [op.pk for op in enqueue_many("test-effect", [{} for _ in range(iterations)])]
    cancelled, ran = in_lockstep(pks, cancel, run)

    for pk in pks:
        outcome, result = cancelled[pk], ran[pk]
        count = Execution.objects.filter(key=str(pk)).count()
        if outcome is CancelOutcome.CANCELLED:
            assert result is RunOutcome.NOT_CLAIMED, (pk, outcome, result)
            assert count == 0
            assert not BatchOperation.objects.filter(pk=pk).exists()
        else:
            assert outcome in (CancelOutcome.TOO_LATE_RUNNING, CancelOutcome.TOO_LATE_FINISHED), (
                pk,
                outcome,
                result,
            )
            assert result is RunOutcome.SUCCEEDED, (pk, outcome, result)
            assert count == 1
            assert BatchOperation.objects.get(pk=pk).result == BatchOperation.RESULT_SUCCESSFUL
    assert Effect.objects.count() == sum(r is RunOutcome.SUCCEEDED for r in ran.values())


def test_cancel_many_racing_claims_cancels_each_or_lets_it_run_once():
    """Each round, ``cancel_many`` of two operations races a claim of the first: the first
    is cancelled and never runs, or runs once and is reported not cancelled."""
    rounds = 100
    pairs = [tuple(op.pk for op in enqueue_many("test-effect", [{}, {}])) for _ in range(rounds)]
    cancelled, ran = in_lockstep(
        pairs, lambda pair: cancel_many(list(pair)), lambda pair: run(pair[0])
    )

    for pair in pairs:
        first, second = pair
        count = Execution.objects.filter(key=str(first)).count()
        if first in cancelled[pair]:
            assert ran[pair] is RunOutcome.NOT_CLAIMED, (first, cancelled[pair], ran[pair])
            assert count == 0 and not BatchOperation.objects.filter(pk=first).exists()
        else:
            assert ran[pair] is RunOutcome.SUCCEEDED, (first, cancelled[pair], ran[pair])
            assert count == 1
        assert cancelled[pair][-1] == second  # never claimed: always cancelled
        assert not BatchOperation.objects.filter(pk=second).exists()
    assert Effect.objects.count() == sum(r is RunOutcome.SUCCEEDED for r in ran.values())


# --- A claim by id takes the row as it is when claimed -----------------------------------------
def _between_claims_read_and_update(monkeypatch, action) -> Threads:
    """Run ``action`` on another connection once, while ``claim()`` holds the row it read
    (it looks the handler up in between); wait for it at most a second: where the read locks
    the row, the action waits for the claim's transaction instead."""
    from batchframework.registry import registry

    threads = Threads()
    real_get = registry.get

    def get(operationtype):
        if not threads.threads:
            threads.start(action)
            threads.threads[0].join(1.0)
        return real_get(operationtype)

    monkeypatch.setattr(registry, "get", get)
    return threads


def test_a_claim_by_id_never_runs_the_values_a_replace_overwrote(monkeypatch):
    """claim() read the row, then claimed it by status: a replace that committed between the
    two was claimed with the values from before it, and its own input never ran."""
    post = Post.objects.create(title="debounced")
    first = enqueue("test-echo", context_object=post, input_data="old", replace=True)
    threads = _between_claims_read_and_update(
        monkeypatch,
        lambda: enqueue("test-echo", context_object=post, input_data="new", replace=True),
    )
    # MySQL/MariaDB may make the two deadlock: the claim then tries again, and may find the
    # row locked by the replace, which leaves it to the replace's own dispatch.
    assert run(first.pk) in (RunOutcome.SUCCEEDED, RunOutcome.NOT_CLAIMED)
    threads.join(timeout=30)
    monkeypatch.undo()
    run_due(operationtype="test-echo")
    finished = BatchOperation.objects.for_context_object(post)
    # Each input ran as what it was when claimed: "new" as well, whichever row carried it.
    assert sorted(op.output_data["echo"] for op in finished) in (["new"], ["new", "old"])
    assert all(op.output_data["echo"] == op.input_data for op in finished)


def test_a_claim_by_id_keeps_a_mark_to_be_claimed_alone_set_meanwhile(monkeypatch):
    """Recovery marks an operation lost with a batch's worker to be claimed alone; a claim()
    that had read the row before overwrote the mark with a plain claim, and a failed attempt
    then put the operation back unmarked, to be batched again."""
    op = enqueue("test-fails-once")
    marked: list[int] = []

    def lost_in_a_batch_then_recovered():
        # What a batch's claim, its worker's death and recovery leave: attempts as before.
        with transaction.atomic():
            row = BatchOperation.objects.select_for_update().get(pk=op.pk)
            pending = (row.status, row.attempts) == ("unprocessed", 0)
            marked.append(int(pending))
            if pending:
                BatchOperation.objects.filter(pk=op.pk).update(claimed_by="!isolated")

    threads = _between_claims_read_and_update(monkeypatch, lost_in_a_batch_then_recovered)
    outcome = run(op.pk)
    threads.join(timeout=30)
    row = fresh(op)
    if marked == [1]:  # marked before the claim: claimed alone and put back marked, or lost
        assert row.claimed_by == "!isolated", (outcome, row.claimed_by)
        assert outcome in (RunOutcome.RETRY_SCHEDULED, RunOutcome.NOT_CLAIMED)
    else:  # the claim came first, with the row locked: there was nothing left to mark
        assert (marked, outcome, row.claimed_by) == ([0], RunOutcome.RETRY_SCHEDULED, "")


@pytest.mark.parametrize("distinct", [False, True])
def test_a_queryset_delete_of_pending_operations_never_deletes_one_claimed_meanwhile(distinct):
    """With something pointing at BatchOperation (here a delete receiver; a foreign key does
    the same), Django reads the rows, then deletes them by id. A claim in between ran the
    handler of an operation ``.unprocessed().delete()`` then deleted: a cancel that came too
    late, silently (invariant 3)."""
    from django.db.models.signals import pre_delete

    op = enqueue("test-effect")
    claims: list[list[BatchOperation]] = []
    threads = Threads()

    def claim_meanwhile(sender, instance, **kwargs):
        if not threads.threads:  # between the delete's read and its DELETE
            threads.start(lambda: claims.append(claim_due(ids=[instance.pk])))
            threads.threads[0].join(1.0)  # where the rows are locked, the claim skips or waits

    pre_delete.connect(claim_meanwhile, sender=BatchOperation)
    try:
        pending = BatchOperation.objects.unprocessed().filter(pk=op.pk)
        deleted, _ = (pending.distinct() if distinct else pending).delete()
    finally:
        pre_delete.disconnect(claim_meanwhile, sender=BatchOperation)
    threads.join(timeout=30)
    claimed = [claimed_op.pk for claimed_op in claims[0]]
    # Deleted while pending and never claimed, or claimed first and so not deleted.
    assert (deleted, claimed) in ((1, []), (0, [op.pk])), (deleted, claimed)
    assert BatchOperation.objects.filter(pk=op.pk).exists() == bool(claimed)


# --- Debounce is race-free -------------------------------------------------------------------
def test_concurrent_replace_leaves_exactly_one_pending_row():
    rounds, parallel = 8, 6
    for round_number in range(rounds):
        post = Post.objects.create(title=f"round {round_number}")
        barrier = threading.Barrier(parallel, timeout=20)
        returned: list[int] = []

        def enqueue_replacing(index, post=post, barrier=barrier, returned=returned):
            barrier.wait()
            op = enqueue(
                "test-echo",
                context_object=post,
                input_data={"i": index},
                delay=timedelta(minutes=5),
                replace=True,
            )
            returned.append(op.pk)

        threads = Threads()
        for index in range(parallel):
            threads.start(enqueue_replacing, index)
        threads.join(timeout=40)

        pending = BatchOperation.objects.for_context_object(post).unprocessed()
        assert pending.count() == 1
        only = pending.get()
        assert set(returned) == {only.pk}
        assert only.input_data["i"] in range(parallel)
    assert BatchOperation.objects.count() == rounds


def test_a_replace_that_loses_a_deadlock_runs_again_unless_in_the_callers_transaction(
    monkeypatch,
):
    """On MySQL/MariaDB two concurrent replaces can deadlock on the gap locks of their empty
    ``FOR UPDATE`` reads, and InnoDB rolls back the loser's whole transaction (seen in CI as
    ``OperationalError(1213, ...)``; the race above rarely hits it). Its own transaction is run
    again; a caller's transaction is the caller's to retry, so there the error propagates."""
    import importlib

    from django.db import OperationalError

    # The module, not the function of the same name that ``batchframework.engine`` exports.
    enqueue_module = importlib.import_module("batchframework.engine.enqueue")

    real_insert = enqueue_module.insert
    deadlocks = []

    def insert_losing_a_deadlock_once(operation, **kwargs):
        if not deadlocks:
            deadlocks.append(operation.operationtype)
            raise OperationalError(1213, "Deadlock found when trying to get lock")
        return real_insert(operation, **kwargs)

    monkeypatch.setattr(enqueue_module, "insert", insert_losing_a_deadlock_once)
    post = Post.objects.create(title="deadlock")
    op = enqueue("test-echo", context_object=post, delay=timedelta(minutes=5), replace=True)
    assert deadlocks == ["test-echo"]
    assert list(BatchOperation.objects.for_context_object(post).values_list("pk", flat=True)) == [
        op.pk
    ]

    deadlocks.clear()
    other = Post.objects.create(title="deadlock in a transaction")
    with pytest.raises(OperationalError), transaction.atomic():
        enqueue("test-echo", context_object=other, replace=True)
    assert not BatchOperation.objects.for_context_object(other).exists()


# --- Crash recovery and leases (invariant 7) -------------------------------------------------
def test_killed_worker_is_recovered_after_its_lease_expires(reaper):
    op = enqueue("test-sleep", input_data={"seconds": 4})  # lease 2 s, max_attempts 3
    first, _ = reaper.worker("--once", "--name", "doomed", label="doomed")
    wait_started(op)
    first.send_signal(signal.SIGKILL)
    assert wait_exit(first, timeout=10) == -signal.SIGKILL
    lost = fresh(op)
    assert lost.status == BatchOperation.STATUS_RUNNING and lost.attempts == 1
    assert lost.claimed_by.startswith("doomed:")
    # A second worker, started at once, waits for the lease to expire, then recovers it.
    second, second_log = reaper.worker(
        "--max-operations", "1", "--poll-interval", "0.2", "--name", "rescuer", label="rescuer"
    )
    assert wait_exit(second, timeout=45, log_path=second_log) == 0, second_log.read_text()
    done = fresh(op)
    assert done.status == BatchOperation.STATUS_FINISHED
    assert done.result == BatchOperation.RESULT_SUCCESSFUL
    assert done.attempts == 2
    assert done.claimed_by.startswith("rescuer:")
    assert done.started_running_datetime >= lost.lease_expires_at  # not robbed early
    assert "was lost" in done.last_error
    assert list(Effect.objects.values_list("key", flat=True)) == [f"sleep-{op.pk}-2"]
    assert executions(op) == 2


def recover_until_the_worker_exits(worker, log) -> list[int]:
    """Run lease recovery in a tight loop, as a rival poller would, while the worker works."""
    recovered = []
    deadline = time.monotonic() + 40
    while worker.poll() is None:
        assert time.monotonic() < deadline, "worker did not finish in time"
        recovered.append(recover_expired())
        time.sleep(0.05)
    assert worker.returncode == 0, log.read_text()
    return recovered


def test_live_worker_renewing_its_lease_is_never_robbed(reaper):
    op = enqueue("test-sleep", input_data={"seconds": 6, "progress": True})  # lease 2 s
    worker, log = reaper.worker("--once", label="live")
    wait_started(op)
    recovered = recover_until_the_worker_exits(worker, log)
    assert len(recovered) > 30  # the loop really ran while the handler did
    assert sum(recovered) == 0
    done = fresh(op)
    assert done.result == BatchOperation.RESULT_SUCCESSFUL
    assert done.attempts == 1
    assert (done.progress_done, done.progress_total) == (12, 12)
    assert executions(op) == 1
    assert list(Effect.objects.values_list("key", flat=True)) == [f"sleep-{op.pk}-1"]


def test_a_handler_longer_than_its_lease_is_kept_alive_while_its_worker_lives(reaper):
    # No progress reports: the worker's lease keeper renews the 2 s lease while it sleeps 5 s.
    op = enqueue("test-sleep", input_data={"seconds": 5})
    worker, log = reaper.worker("--once", label="long")
    wait_started(op)
    recovered = recover_until_the_worker_exits(worker, log)
    assert len(recovered) > 30 and sum(recovered) == 0
    done = fresh(op)
    assert done.result == BatchOperation.RESULT_SUCCESSFUL and done.attempts == 1
    assert executions(op) == 1


@pytest.mark.skipif(
    connection.vendor == "sqlite", reason="SQLite locks the whole database, not a row"
)
def test_a_handler_holding_its_own_row_does_not_cost_another_handler_its_lease(registered):
    """Two handlers run at once in one process (a threads pool). One reports progress inside a
    transaction of its own, so its row stays locked until that commits. The lease keeper's
    renewal of that row waited for the lock, and renewed nothing else meanwhile: the other
    handler's lease expired, and recovery took its operation while it ran.

    Recovery runs while the row is locked (3 s of its 4), and the other lease (2 s) would have
    expired by then. (Once the holder commits, its own lease, last set by its progress report,
    may have expired before the keeper renews it: a holder must keep such a transaction
    shorter than its lease, as the progress how-to says.)"""
    lease = timedelta(seconds=2)

    @registered("keeper-holds-own-row", lease=lease)
    def reports_in_a_transaction(operation):
        with transaction.atomic():
            operation.set_progress(1, 2)
            time.sleep(4)

    @registered("keeper-runs-long", lease=lease)
    def runs_long(operation):
        time.sleep(4)

    holder = enqueue("keeper-holds-own-row")
    other = enqueue("keeper-runs-long")
    claimed = [claim_due(ids=[op.pk], limit=1)[0] for op in (holder, other)]
    threads = Threads()
    for operation in claimed:
        threads.start(run_claimed, operation)
    recovered, deadline = [], time.monotonic() + 3
    while time.monotonic() < deadline:
        recovered.append(recover_expired())
        time.sleep(0.1)
    threads.join(timeout=30)
    assert len(recovered) > 10 and sum(recovered) == 0
    for op in (holder, other):
        done = fresh(op)
        assert (done.result, done.attempts) == (BatchOperation.RESULT_SUCCESSFUL, 1)


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite has no lock wait to limit")
def test_the_keepers_lock_wait_limit_does_not_outlive_its_renewal():
    """The limit was set on the keeper's session and kept: a session handed back to a pool
    (Django's, PgBouncer's) then gave its next user's statements 100 ms to get a lock, and a
    cancel waiting on a busy row failed with a lock timeout."""
    keeper_module = importlib.import_module("batchframework.engine.keeper")
    query = {
        "postgresql": "SHOW lock_timeout",
        "mysql": "SELECT @@SESSION.innodb_lock_wait_timeout",
    }[connection.vendor]

    def session_setting():
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchone()[0]

    before = session_setting()
    with keeper_module._lock_wait_limited(connection.alias):
        assert session_setting() != before  # in force for the renewal
    assert session_setting() == before


# --- Graceful shutdown -----------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_sigterm_finishes_the_operation_in_hand_and_releases_the_rest(reaper, signum):
    """SIGHUP too (the terminal or ssh session that started the worker closed): it used to
    kill the worker, leaving its whole batch running until the leases expired."""
    operations = enqueue_many("test-sleep", [{"input_data": {"seconds": 2}} for _ in range(3)])
    worker, log = reaper.worker("--batch-size", "10", "--poll-interval", "0.2", label="graceful")
    wait_for(lambda: Execution.objects.exists(), timeout=30, what="the first handler to start")
    worker.send_signal(signum)
    assert wait_exit(worker, timeout=20, log_path=log) == 0, log.read_text()
    started = Execution.objects.get().key
    by_pk = {str(op.pk): fresh(op) for op in operations}
    finished = by_pk.pop(started)
    assert finished.result == BatchOperation.RESULT_SUCCESSFUL and finished.attempts == 1
    assert Effect.objects.filter(key=f"sleep-{started}-1").exists()
    for rest in by_pk.values():
        assert rest.status == BatchOperation.STATUS_UNPROCESSED
        assert rest.attempts == 0 and rest.claimed_by == "" and rest.lease_expires_at is None
    assert "stopped after 1 operation" in log.read_text()


def test_a_worker_started_with_nohup_keeps_running_on_sighup(reaper):
    """``nohup`` ignores SIGHUP so that the worker outlives the session: the worker must not
    take that signal back as a reason to stop."""
    log = reaper.log_path("nohup")
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "django", "batchframework_worker", "--poll-interval", "0.2"],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
        )
    reaper.processes.append(worker)
    wait_for(lambda: "worker started" in log.read_text(), timeout=30, what="the worker")
    worker.send_signal(signal.SIGHUP)
    op = enqueue("test-noop")
    wait_for(lambda: fresh(op).status == BatchOperation.STATUS_FINISHED, timeout=15, what="a run")
    assert worker.poll() is None, log.read_text()
    worker.send_signal(signal.SIGTERM)
    assert wait_exit(worker, timeout=20, log_path=log) == 0, log.read_text()


def test_a_worker_whose_terminal_hangs_up_stops_gracefully_and_quietly(reaper, tmp_path):
    """The foreground worker of a terminal (an ssh session) that closes gets SIGHUP from the
    kernel: it finishes the operation in hand, gives back the rest, and exits 0, though it
    can no longer write its last words to the terminal (that raised, exit 1)."""
    import fcntl
    import pty
    import termios

    operations = enqueue_many(
        "test-sleep", [{"input_data": {"seconds": 2, "no_effect": True}} for _ in range(2)]
    )
    terminal, child_end = pty.openpty()
    with open(tmp_path / "stderr.log", "wb") as errors:
        worker = subprocess.Popen(
            [sys.executable, "-m", "django", "batchframework_worker", "--batch-size", "10"],
            cwd=ROOT,
            env=subprocess_env(),
            stdin=child_end,
            stdout=child_end,
            stderr=errors,
            start_new_session=True,
            # The pty becomes the controlling terminal of the worker's new session.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
    reaper.processes.append(worker)
    os.close(child_end)
    try:
        wait_for(lambda: Execution.objects.exists(), timeout=30, what="the first handler")
    finally:
        os.close(terminal)  # hang up: the kernel sends the session SIGHUP
    code = wait_exit(worker, timeout=20)
    assert code == 0, (tmp_path / "stderr.log").read_text()
    started = Execution.objects.get().key
    statuses = {str(op.pk): fresh(op).status for op in operations}
    assert statuses.pop(started) == BatchOperation.STATUS_FINISHED
    assert list(statuses.values()) == [BatchOperation.STATUS_UNPROCESSED]


def test_second_sigterm_exits_at_once(reaper):
    op = enqueue("test-sleep", input_data={"seconds": 30})
    worker, log = reaper.worker("--once", label="impatient")
    wait_started(op)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert worker.poll() is None  # the first signal waits for the operation in hand
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = wait_exit(worker, timeout=10, log_path=log)
    assert time.monotonic() - started < 10
    assert code == 128 + signal.SIGTERM, log.read_text()
    # Nothing was recorded: the operation waits for lease recovery like any lost worker's.
    stopped = fresh(op)
    assert stopped.status == BatchOperation.STATUS_RUNNING and stopped.attempts == 1
    assert not Effect.objects.exists()


def test_second_sigterm_gives_back_the_rest_of_the_batch(reaper):
    """Exiting at once leaves the operation in hand to lease recovery, but the rest of the
    claimed batch never started: it goes back at once, its attempt not counted."""
    operations = enqueue_many("test-sleep", [{"input_data": {"seconds": 30}} for _ in range(3)])
    worker, log = reaper.worker("--batch-size", "10", label="impatient-batch")
    wait_for(lambda: Execution.objects.exists(), timeout=30, what="the first handler to start")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    worker.send_signal(signal.SIGTERM)
    assert wait_exit(worker, timeout=10, log_path=log) == 128 + signal.SIGTERM, log.read_text()
    started = Execution.objects.get().key
    by_pk = {str(op.pk): fresh(op) for op in operations}
    in_hand = by_pk.pop(started)
    assert in_hand.status == BatchOperation.STATUS_RUNNING  # left to lease recovery
    for rest in by_pk.values():
        assert rest.status == BatchOperation.STATUS_UNPROCESSED
        assert rest.attempts == 0 and rest.claimed_by == "" and rest.lease_expires_at is None


def test_a_worker_backs_off_while_the_due_operations_are_locked(monkeypatch):
    """Due rows another transaction holds are skipped by the claim (SKIP LOCKED); the worker
    must not poll for them 100 times a second until they are let go."""
    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip("SQLite has no row locks to skip")
    op = enqueue("test-noop")
    locked, let_go = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        try:
            with transaction.atomic():
                BatchOperation.objects.select_for_update().get(pk=op.pk)
                locked.set()
                let_go.wait(10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    assert locked.wait(10)
    claims: list[int] = []
    real_claim_due = worker_module.claim_due

    def counting_claim_due(**kwargs):
        claimed = real_claim_due(**kwargs)
        claims.append(len(claimed))
        return claimed

    monkeypatch.setattr(worker_module, "claim_due", counting_claim_due)
    worker = Worker(poll_interval=timedelta(seconds=5))
    stopper = threading.Timer(1.5, worker.stop)
    stopper.start()
    try:
        worker.run()
    finally:
        let_go.set()
        holder.join(10)
        stopper.cancel()
    assert sum(claims) == 0
    assert 2 <= len(claims) <= 12, f"{len(claims)} claims in 1.5 s while the row was locked"


def test_a_claim_reads_and_locks_only_unprocessed_rows():
    """While a claim's transaction is open, finished operations stay writable (pruning, the
    admin), and the claim reads only unprocessed rows, however long the history. MySQL and
    MariaDB have no partial indexes; there it takes migration 0004's index. Without it the
    claim walked the whole history (a full scan, or the old index in claim order, which the
    optimizer picks for a large table and which kept every row it passed locked)."""
    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip("SQLite has no row locks")
    now = timezone.now()
    finished = {
        "operationtype": "test-noop",
        "status": BatchOperation.STATUS_FINISHED,
        "result": BatchOperation.RESULT_SUCCESSFUL,
        "run_after": now - timedelta(minutes=1),
        "started_running_datetime": now,
        "finished_datetime": now,
    }
    BatchOperation.objects.bulk_create([BatchOperation(**finished) for _ in range(300)])
    history = list(BatchOperation.objects.order_by("pk").values_list("pk", flat=True))
    pending = sorted(op.pk for op in enqueue_many("test-noop", [{}] * 3))
    if connection.vendor == "mysql":
        plan = _claim_plan()
        # A lookup of the status in the status-led index (its row estimate counts rows that
        # earlier tests deleted and InnoDB has not purged yet), not a scan of the table.
        assert plan["key"] == "batchop_ready_idx" and plan["type"] in ("ref", "range"), plan
    claimed: list[int] = []
    holding, let_go = threading.Event(), threading.Event()

    def claim_and_hold() -> None:
        with transaction.atomic():
            claimed.extend(op.pk for op in claim_due(operationtypes=["test-noop"], limit=10))
            holding.set()
            let_go.wait(20)

    threads = Threads()
    threads.start(claim_and_hold)
    try:
        assert holding.wait(20)
        with connection.cursor() as cursor:
            if connection.vendor == "mysql":
                cursor.execute("SET SESSION innodb_lock_wait_timeout = 2")
            else:
                cursor.execute("SET lock_timeout = '2s'")
        # The oldest first: claim order walks past it before it reaches the pending ones.
        for pk in (history[0], history[-1]):
            assert BatchOperation.objects.filter(pk=pk).update(last_error="edited") == 1
    finally:
        let_go.set()
        threads.join(30)
        connection.close()  # the shortened lock wait goes with the session
    assert sorted(claimed) == pending


def test_claims_at_repeatable_read_do_not_deadlock_each_other():
    """A claim moves its rows' entries in the claim's index, which MySQL leads with the status
    (migration 0004). At REPEATABLE READ, concurrent claims' scans hold gap locks where those
    entries move, and the claims deadlocked dozens of times a second; so a claim runs at READ
    COMMITTED (Django's default on MySQL) whatever the connection is set to. Any deadlock
    raises in its thread and fails the test."""
    if connection.vendor != "mysql":
        pytest.skip("REPEATABLE READ's gap locks: MySQL/MariaDB")
    options = connection.settings_dict["OPTIONS"]
    saved = dict(options)
    options["isolation_level"] = "repeatable read"  # for the threads' new connections
    ran: list[int] = []
    levels: list[str] = []
    stop_at = time.monotonic() + 3

    def enqueuer() -> None:
        while time.monotonic() < stop_at:
            enqueue_many("test-noop", [{}] * 20)
            time.sleep(0.01)

    def claimer() -> None:
        with connection.cursor() as cursor:
            # tx_isolation (MariaDB) or transaction_isolation (MySQL 8, MariaDB 11.1+).
            cursor.execute(
                "SHOW SESSION VARIABLES WHERE Variable_name IN "
                "('tx_isolation', 'transaction_isolation')"
            )
            levels.append(cursor.fetchall()[0][1])
        while time.monotonic() < stop_at:
            claimed = claim_due(operationtypes=["test-noop"], limit=10)
            ran.append(run_claimed_batch(claimed))

    threads = Threads()
    try:
        for target in (enqueuer, enqueuer, claimer, claimer, claimer, claimer):
            threads.start(target)
        threads.join(30)
    finally:
        options.clear()
        options.update(saved)
    assert levels == ["REPEATABLE-READ"] * 4
    assert sum(ran) > 100


def run_claimed_batch(claimed: list[BatchOperation]) -> int:
    if not claimed:
        time.sleep(0.01)
        return 0
    with BatchRunner() as runner:
        return runner.run_batch(claimed)


def _claim_plan() -> dict[str, str]:
    """MySQL's plan for the claim's SELECT (a rolled-back claim, to capture it), on fresh
    table statistics: an earlier test's thousands of rows would skew them."""
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE TABLE {BatchOperation._meta.db_table}")
        cursor.fetchall()
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries:
            claim_due(operationtypes=["test-noop"], limit=10)
        transaction.set_rollback(True)
    [select] = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {select}")
        names = [column[0] for column in cursor.description]
        [row] = cursor.fetchall()
    return dict(zip(names, (str(value) for value in row), strict=True))


@pytest.mark.timeout(10)
def test_a_stop_signal_landing_while_the_worker_waits_is_taken():
    """A signal handler runs between two bytecodes of the main thread, possibly while it holds
    the stop flag's lock inside ``wait()``: taking the request there must not deadlock."""
    worker = Worker()
    with worker._stop._condition:  # where wait() holds it, around its check of the flag
        worker._on_signal(signal.SIGTERM, None)
    assert worker.stopping
    assert worker._stop.wait(5) is True  # and a wait returns at once


@pytest.mark.parametrize(
    "arguments",
    [
        {"queues": []},  # would have meant every queue
        {"queues": iter([])},
        {"queues": "emails"},  # a sequence of one-letter queues
        {"poll_interval": timedelta(0)},
        {"poll_interval": timedelta(seconds=-1)},
    ],
)
def test_a_worker_refuses_arguments_that_would_mean_something_else(arguments):
    with pytest.raises(ValueError, match="must be"):
        Worker(**arguments)


def test_a_worker_takes_its_queues_from_any_iterable():
    queues = (name for name in ("mail", "default"))  # a generator: read once
    assert Worker(queues=queues).queues == ["mail", "default"]


# 1e10 and 1e300 overflowed the platform's sleep with a traceback (exit 1); 1e-300 rounds to
# no time at all, which the worker refused with a traceback too.
@pytest.mark.parametrize("value", ["0", "-1", "nan", "86401", "1e10", "1e300", "1e-300"])
def test_a_poll_interval_that_is_not_positive_or_is_over_a_day_is_refused(reaper, value):
    worker, log = reaper.worker("--once", "--poll-interval", value, label="bad-interval")
    assert wait_exit(worker, timeout=30, log_path=log) == 2
    assert "--poll-interval must be a positive number of seconds, at most 86400" in log.read_text()


def test_a_batch_size_beyond_the_limit_is_refused(reaper):
    """It passed, then failed every claim on the database's LIMIT (forever without --once)."""
    worker, log = reaper.worker("--once", "--batch-size", "99999999999999999999", label="huge")
    assert wait_exit(worker, timeout=30, log_path=log) == 2
    assert "--batch-size must be at most 1000000" in log.read_text()


def test_once_fails_on_a_database_error_instead_of_retrying_forever(reaper, tmp_path):
    """``--once`` runs from cron and scripts: an unusable database is an error to report."""
    env = {**subprocess_env(), "DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.sqlite3'}"}
    log = tmp_path / "once.log"
    with log.open("wb") as out:
        code = subprocess.run(
            [sys.executable, "-m", "django", "batchframework_worker", "--once"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
        ).returncode
    assert code == 1, log.read_text()
    assert "CommandError: database error" in log.read_text()


# --- atomic=True: exactly once across a hard crash --------------------------------------------
def test_atomic_handler_effect_happens_exactly_once_across_a_hard_crash(reaper):
    op = enqueue("test-atomic", input_data={"crash_on_attempt": 1, "hard": True})
    worker, log = reaper.worker("--once", label="crashing")
    assert wait_exit(worker, timeout=30, log_path=log) == 17, log.read_text()
    crashed = fresh(op)
    assert crashed.status == BatchOperation.STATUS_RUNNING and crashed.attempts == 1
    assert Effect.objects.count() == 0  # the write died with the transaction
    assert recover_expired() == 0  # the default 5-minute lease is still valid
    later = timezone.now() + timedelta(minutes=10)
    assert recover_expired(now=later) == 1
    ran = run_due(now=later)
    assert [o.pk for o in ran] == [op.pk]
    done = fresh(op)
    assert done.result == BatchOperation.RESULT_SUCCESSFUL
    assert done.attempts == 2
    assert done.output_data == {"attempt": 2}
    assert list(Effect.objects.values_list("key", flat=True)) == [f"atomic-{op.pk}"]


def test_subprocesses_use_the_test_database():
    op = enqueue("test-noop")
    result = run_python(f"""
        from batchframework import BatchOperation
        print("FOUND", BatchOperation.objects.filter(pk={op.pk}).exists())
    """)
    assert "FOUND True" in result.stdout


# --- Deadlock victims -------------------------------------------------------------------------
def _a_deadlock_first(monkeypatch, name: str) -> list[int]:
    """Make ``claim_module.<name>`` end its first transaction as a deadlock's victim does
    (MySQL/MariaDB error 1213), as a concurrent ``enqueue(replace=True)`` can make it."""
    from django.db import OperationalError

    # The module, not the function batchframework.engine exports under the same name.
    claim_module = importlib.import_module("batchframework.engine.claim")
    real = getattr(claim_module, name)
    calls: list[int] = []

    def deadlocking(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError(1213, "Deadlock found when trying to get lock")
        return real(*args, **kwargs)

    monkeypatch.setattr(claim_module, name, deadlocking)
    return calls


@pytest.mark.skipif(
    connection.vendor == "postgresql", reason="one statement claims there (claim_postgresql)"
)
def test_claim_due_runs_again_when_a_deadlock_chose_it_as_its_victim(monkeypatch, caplog):
    """On MariaDB, claim_due lost its whole batch to a deadlock with concurrent debounced
    enqueues: the DB worker backed off, a Celery message left its operations to the poller,
    and run_due raised. claim() by id ran again already; now both do."""
    caplog.set_level(logging.INFO, logger="batchframework")
    op = enqueue("test-noop")
    calls = _a_deadlock_first(monkeypatch, "_claim_due_portable")
    assert [claimed.pk for claimed in claim_due()] == [op.pk]
    assert len(calls) == 2
    assert "event=claim_retried reason=deadlock" in caplog.text


def test_claim_by_id_runs_again_when_a_deadlock_chose_it_as_its_victim(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="batchframework")
    op = enqueue("test-noop")
    calls = _a_deadlock_first(monkeypatch, "_claim_locked")
    from batchframework.engine import claim

    claimed = claim(op.pk)
    assert claimed is not None and claimed.pk == op.pk
    assert len(calls) == 2
    assert f"event=claim_retried reason=deadlock id={op.pk}" in caplog.text


def test_a_deadlock_in_a_callers_transaction_is_not_run_again(monkeypatch):
    """The deadlock rolled back the caller's whole transaction: only the caller can redo it."""
    from django.db import OperationalError

    from batchframework.engine import claim

    op = enqueue("test-noop")
    calls = _a_deadlock_first(monkeypatch, "_claim_locked")
    with pytest.raises(OperationalError), transaction.atomic():
        claim(op.pk)
    assert len(calls) == 1


# --- A handler's database error ------------------------------------------------------------
def test_a_handlers_database_error_leaves_the_callers_connection_open(registered):
    """The failure of a handler whose statement failed is recorded on a new session only when
    its session was lost: a working one (with ``CONN_MAX_AGE=0``, as the tests run) was closed
    too, and with it the cursor the caller was reading its operations from."""

    @registered("test-bad-sql", max_attempts=1)
    def bad_sql(operation):
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table_of_the_tests")

    ops = [enqueue("test-bad-sql") for _ in range(3)]
    pending = BatchOperation.objects.filter(pk__in=[op.pk for op in ops]).order_by("pk")
    outcomes = [run(op.pk) for op in pending.iterator(chunk_size=1)]
    assert outcomes == [RunOutcome.FAILED] * 3
    assert BatchOperation.objects.failed().count() == 3


# --- cancel_many's edges ---------------------------------------------------------------------
def test_a_raising_cancelled_receiver_neither_stops_cancel_many_nor_silences_the_others(
    monkeypatch,
):
    """A receiver's error stopped the cancel after the first chunk, and the other operations
    of that chunk and the later ones were never announced."""
    from batchframework.engine import control
    from batchframework.signals import operation_cancelled

    monkeypatch.setattr(control, "CANCEL_CHUNK", 3)
    ops = enqueue_many("test-noop", [{}] * 7, delay=3600)
    seen: list[int] = []

    def buggy(sender, operation_id, **kwargs):
        if operation_id == ops[0].pk:
            raise RuntimeError("a receiver's bug")

    def counting(sender, operation_id, **kwargs):
        seen.append(operation_id)

    operation_cancelled.connect(buggy)
    operation_cancelled.connect(counting)
    try:
        with pytest.raises(RuntimeError, match="a receiver's bug"):
            cancel_many(ops)
    finally:
        operation_cancelled.disconnect(buggy)
        operation_cancelled.disconnect(counting)
    assert not BatchOperation.objects.filter(pk__in=[op.pk for op in ops]).exists()
    assert sorted(seen) == sorted(op.pk for op in ops if op.pk != ops[0].pk)


def test_cancel_many_leaves_a_protected_operation_and_cancels_the_others(monkeypatch):
    """A row that protects an operation raised ``ProtectedError`` half-way: the chunks before
    it were cancelled, the rest not even tried, and the caller was told none of it."""
    from batchframework.engine import control
    from batchframework.signals import operation_cancelled
    from tests.testapp.models import ProtectingLine

    monkeypatch.setattr(control, "CANCEL_CHUNK", 2)
    ops = enqueue_many("test-noop", [{}] * 5, delay=3600)
    ProtectingLine.objects.create(batchoperation=ops[2])
    seen: list[int] = []

    def counting(sender, operation_id, **kwargs):
        seen.append(operation_id)

    operation_cancelled.connect(counting)
    try:
        cancelled = cancel_many(ops)
    finally:
        operation_cancelled.disconnect(counting)
    others = [op.pk for op in ops if op.pk != ops[2].pk]
    assert cancelled == others
    assert sorted(seen) == sorted(others)
    assert list(BatchOperation.objects.unprocessed().values_list("pk", flat=True)) == [ops[2].pk]


def test_a_protected_operation_costs_cancel_many_a_few_statements_not_one_per_operation():
    """One protected operation sent its whole chunk through ``delete()`` one at a time, and was
    tried again on every pass as if another had locked it for a moment."""
    from tests.testapp.models import ProtectingLine

    def statements(protect: bool) -> int:
        ops = enqueue_many("test-noop", [{}] * 64, delay=3600)
        if protect:
            ProtectingLine.objects.create(batchoperation=ops[40])
        with CaptureQueriesContext(connection) as queries:
            assert len(cancel_many(ops)) == 64 - protect
        return len(queries)

    plain = statements(protect=False)
    # Halving the refused 64 until the one is found: two collects per level, 6 levels. One
    # at a time, each of the 64 deletes would cost its collect's SELECTs and DELETEs.
    assert statements(protect=True) - plain < 2 * 64


@pytest.mark.parametrize("how", ["cancel", "cancel_many"])
def test_a_raising_cancelled_receiver_keeps_the_callers_other_commit_callbacks(how):
    """Raised from the caller's commit, a receiver's error kept the callbacks after it from
    running: the dispatch of an operation the caller enqueued after the cancel, say."""
    from batchframework.signals import operation_cancelled

    op = enqueue("test-noop", delay=3600)
    later: list[str] = []

    def buggy(sender, operation_id, **kwargs):
        raise RuntimeError("a receiver's bug")

    operation_cancelled.connect(buggy)
    try:
        with transaction.atomic():
            if how == "cancel":
                assert cancel(op)
            else:
                assert cancel_many([op]) == [op.pk]
            transaction.on_commit(lambda: later.append("the caller's callback"))
    finally:
        operation_cancelled.disconnect(buggy)
    assert later == ["the caller's callback"]
    assert not BatchOperation.objects.filter(pk=op.pk).exists()


def test_a_deadlock_with_autocommit_turned_off_is_the_callers_to_handle():
    """The deadlock rolled back the caller's whole transaction; retried, the claim or cancel
    committed without the caller's earlier writes, and nobody was told."""
    from django.db import OperationalError

    from batchframework.engine._common import DEADLOCK_ATTEMPTS, retrying_deadlocks

    calls: list[int] = []

    def deadlock_victim():
        calls.append(1)
        raise OperationalError(1213, "Deadlock found when trying to get lock")

    transaction.set_autocommit(False)
    try:
        with pytest.raises(OperationalError):
            retrying_deadlocks("default", deadlock_victim)
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(OperationalError):  # its own transaction: tried again
        retrying_deadlocks("default", deadlock_victim)
    assert len(calls) == DEADLOCK_ATTEMPTS


def test_cancel_many_takes_a_key_no_row_can_have_for_one_that_is_gone():
    """SQLite can't take an integer beyond 64 bits as a parameter: ``cancel()`` answered
    "not found", ``cancel_many`` raised ``OverflowError``."""
    op = enqueue("test-noop", delay=3600)
    assert cancel_many([10**30, op, -(10**30)]) == [op.pk]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's lock upgrade")
def test_cancel_many_waits_for_sqlites_write_lock_in_a_deferred_transaction():
    """With Django's default DEFERRED transactions, a read first takes a lock SQLite refuses to
    upgrade while another connection writes: cancel_many failed at once with "database is
    locked", where cancel() waits its turn."""
    op = enqueue("test-noop", delay=3600)
    connection.ensure_connection()
    immediate = connection.transaction_mode
    connection.transaction_mode = None  # BEGIN (DEFERRED), Django's default
    writing, done = threading.Event(), threading.Event()

    def other_writer():
        try:
            with transaction.atomic():
                Effect.objects.create(key="another connection's write")
                writing.set()
                time.sleep(0.5)
        finally:
            done.set()

    threads = Threads()
    threads.start(other_writer)
    try:
        assert writing.wait(10)
        assert cancel_many([op]) == [op.pk]
        assert done.is_set()  # it waited for the other write
    finally:
        connection.transaction_mode = immediate
    threads.join(timeout=10)
