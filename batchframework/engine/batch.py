"""Running a claimed batch: one operation after another, keeping the batch's leases, and
recording the successes of quick handlers together.

Used by the DB-polling worker and by the Celery tasks, so both get the same guarantees:

- before each operation, once a sixth of a lease has gone by, the leases of the operations
  still waiting are renewed (fenced by the claim: one that was lost meanwhile is dropped,
  never run), so a healthy worker is not robbed while it works through a long batch;
- while a handler runs, the operations waiting behind it are watched, not renewed: if it runs
  until a third of their lease is left (over half of it), the lease keeper gives them back
  for other workers (:meth:`.LeaseKeeper.watch_waiting`), and the batch ends after it. A
  long or hung handler does not hold them, and they are not taken for a lost worker's (not in
  a caller's transaction, nor while an ``atomic`` handler holds SQLite's write lock);
- a stop request gives the waiting operations back (:func:`.release`);
- successes of non-``atomic`` handlers are finished in one fenced UPDATE per ``FINISH_WINDOW``
  (counted from the last flush) and at the end of the batch, instead of one UPDATE each. The
  batch flushes as a handler returns; while a longer one runs, the lease keeper records them
  in its stead when the window is over. Until then their leases are kept alive like a running
  handler's, so a success is not recovered and run again while its worker lives (unless the
  database fails the batch's last flush and its retry: then the batch ends by letting go of
  them, for recovery, as after a crash).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

from django.db import connections
from django.db.models import Case, JSONField, Value, When

from ..clock import now_expression
from ..conf import get_settings
from ..errors import describe_exception
from ..models import BatchOperation
from ..registry import registry
from ..signals import log_event, operation_finished, operation_started
from ._common import approximately_now, claim_alias, replace_lost_sessions, write_alias
from .claim import release, renew_leases
from .keeper import lease_keeper, lease_point
from .run import (
    ReturnedThenInterrupted,
    RunOutcome,
    _call,
    _finish_failure,
    _lost,
    fail_unstorable_output,
    run_interruptible,
)

#: A success not recorded yet: the operation, its handler's output, and the lease keeper's key
#: for its lease.
_Success: TypeAlias = tuple[BatchOperation, Any, int]


class BatchRunner:
    """Runs claimed operations; a context manager, so that pending successes are flushed."""

    def __init__(
        self,
        *,
        using: str | None = None,
        window: float | None = None,
        interruptions: tuple[type[BaseException], ...] = (),
    ) -> None:
        """``interruptions``: exceptions that, raised inside a handler, interrupt the worker
        rather than fail the handler (a Celery task's soft time limit). They end the batch:
        the operations not started yet are given back, and the interrupted one is left to
        recovery at once, which treats it as a lost worker's (a batch's: put back without
        counting the attempt, to be claimed alone; one claimed alone: retried or failed as
        ``WorkerLost``). The exception then propagates."""
        self.using = using
        self.interruptions = interruptions
        self.window = get_settings().FINISH_WINDOW.total_seconds() if window is None else window
        self.outcomes: list[RunOutcome] = []
        #: Operations whose run this runner started, counted as each starts, whatever comes of
        #: it (also when recording an outcome then raises: a worker's ``--max-operations``
        #: counts them).
        self.operations_started = 0
        self._successes: list[_Success] = []
        self._success_aliases: set[str] = set()  # the databases of the pending successes
        # Whether the lease keeper's thread can see a database's rows (see _keeper_sees).
        self._visible: dict[str, bool] = {}
        self._last_flush = time.monotonic()
        # When to renew the batch's leases, and to give back the waiting operations if a
        # handler is still running (time.monotonic(); see _keep_leases).
        self._renew_at: float | None = None
        self._give_back_at: float | None = None

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, self.interruptions):
                self._flush_after_interruption()
                return  # and the interruption goes on
            try:
                self.flush()
            except self.interruptions:
                # It landed in this very flush, which kept the successes.
                self._flush_after_interruption()
                raise
        finally:
            # What could not be recorded is recovery's now: its leases must run out (and a
            # runner used again must not record it).
            _let_go(self._successes)
            self._successes, self._success_aliases = [], set()

    def _flush_after_interruption(self) -> None:
        """Record the successes before an interruption goes on (Celery raises a soft time
        limit once; what follows is the hard limit), on a new session if it cut a statement
        short. Never raises: the interruption must be what the caller sees."""
        self._drop_interrupted_sessions()
        try:
            self.flush()
        except Exception as exc:  # left to recovery, as after a crash before a finish
            log_event(logging.WARNING, "finish_failed", error=repr(exc), fallback="recovery")

    def _drop_interrupted_sessions(self) -> None:
        """Close this thread's database connections, on any of which an interruption (a
        signal's exception) may have cut a statement short: psycopg leaves the session busy
        with it, and the next statement on it (the batch's, or the next task's) fails. Django
        opens new ones when next needed. Not one in a caller's transaction, which is the
        caller's."""
        for connection in connections.all(initialized_only=True):
            if not connection.in_atomic_block:
                with contextlib.suppress(Exception):
                    connection.close()

    def run_batch(
        self, operations: Sequence[BatchOperation], *, stop: Callable[[], bool] | None = None
    ) -> int:
        """Run ``operations`` in order; returns how many were run here.

        When ``stop()`` becomes true, or anything is raised through it, the operations not yet
        started are released.
        """
        pending = list(operations)
        running: BatchOperation | None = None
        ran = 0
        self._renew_at = self._give_back_at = None
        self._visible = {}
        try:
            while pending:
                if stop is not None and stop():
                    release(pending, using=self.using)
                    pending = []
                    break
                pending = self._keep_leases(pending)
                if not pending:
                    break
                operation, behind = pending[0], pending[1:]
                watched = finishing = None
                try:
                    if (
                        behind
                        and self._give_back_at is not None  # set by _keep_leases
                        and self._keeper_may_write(operation)
                    ):
                        watched = lease_keeper.watch_waiting(
                            behind, self._alias(operation), give_back_at=self._give_back_at
                        )
                    finishing = self._finish_meanwhile(operation)
                    pending, running = behind, operation
                    self._run_handler(operation)
                    running = None  # returned: an interruption from here on is not its own
                finally:
                    try:
                        if watched is not None and lease_keeper.let_go_waiting(watched):
                            pending = []  # given back while the handler ran: others run them
                    finally:  # both taken back, or the keeper would hold on to them for good
                        if finishing is not None:
                            self._finished_meanwhile(*finishing)
                self._flush_if_due()
                ran += 1
        except BaseException as exc:
            # Leaving early (a second stop signal, KeyboardInterrupt, an error between
            # handlers): give back what never started, or it would wait for its lease to expire
            # and then, as part of a lost batch, be claimed alone from then on.
            late = exc if isinstance(exc, ReturnedThenInterrupted) else None
            if late is not None:
                # The handler had returned: its run is kept (held or recorded), not recovery's.
                running, exc = None, late.interruption
            if isinstance(exc, self.interruptions):
                self._drop_interrupted_sessions()
            try:
                # The running one's too: its lease is ended below, on the same databases.
                lost = [*pending, running] if running is not None else pending
                replace_lost_sessions({self._alias(op) for op in lost})
                release(pending, using=self.using)
            except Exception as error:  # what goes on is the exception that ended the batch
                _log_left_to_recovery("give_back_failed", pending, error)
            if running is not None:
                try:
                    self._interrupted(running)
                except Exception as error:
                    _log_left_to_recovery("lease_end_failed", [running], error)
            if late is not None:
                raise exc from None  # the interruption itself, not the engine's wrapper of it
            raise
        self.flush()
        return ran

    def _keeper_sees(self, alias: str) -> bool:
        """Whether the lease keeper's thread, on its own connection, can see and change the
        batch's rows on ``alias``: not while they are in a caller's transaction (an eager
        Celery task in a test's atomic block), which leaves them uncommitted (and, on
        PostgreSQL, locked). Asked once per batch: it can't change while the batch runs."""
        visible = self._visible.get(alias)
        if visible is None:
            visible = self._visible[alias] = not connections[alias].in_atomic_block
        return visible

    def _keeper_may_write(self, operation: BatchOperation) -> bool:
        """Whether the lease keeper may write the batch's rows while ``operation``'s handler
        runs: it must see them (:meth:`_keeper_sees`), and not on SQLite when the handler is
        ``atomic``: its transaction holds SQLite's one write lock while it runs, so the
        keeper's statement would wait for it, and renew nothing meanwhile."""
        alias = self._alias(operation)
        if not self._keeper_sees(alias):
            return False
        return not (
            registry[operation.operationtype].atomic and connections[alias].vendor == "sqlite"
        )

    def _finish_meanwhile(self, operation: BatchOperation) -> tuple[int, int] | None:
        """Have the lease keeper record the pending successes when their window is over, should
        ``operation``'s handler still run then: a long handler would otherwise keep them
        *running* until it returns, or, if it hangs, until the process dies (and then they run
        again). Returns the keeper's key and how many successes it was given, for
        :meth:`_finished_meanwhile`."""
        if (
            not self._successes
            or not all(map(self._keeper_sees, self._success_aliases))
            or not self._keeper_may_write(operation)
        ):
            return None
        successes, count = self._successes, len(self._successes)
        key = lease_keeper.defer(
            # The first ``count``: this list only grows (by the handler's own success) until
            # the batch takes the job back.
            lambda: self._record(successes[:count], let_go="after"),
            at=self._last_flush + self.window,
            failed_event="finish_deferred_failed",
            punctual=False,  # deferred before every handler; a second late is fine here
        )
        return key, count

    def _finished_meanwhile(self, key: int, count: int) -> None:
        """Take the keeper's job back; if it recorded the successes, report them here."""
        job = lease_keeper.take_back(key)
        if job is None or not job.done:
            return  # not recorded (in time, or at all): still pending, for the next flush
        # The first ``count`` are the keeper's (the running handler's success, if any, is last).
        recorded, self._successes = self._successes[:count], self._successes[count:]
        self._last_flush = time.monotonic()  # a flush: the next one is a window away
        _report_successes(recorded, job.result, self.outcomes, self.interruptions)

    def _interrupted(self, operation: BatchOperation) -> None:
        """Its handler was interrupted and no longer runs: end its lease now (fenced), so that
        the next recovery puts it back (or fails it) instead of waiting for the lease."""
        expired = (
            BatchOperation.objects.db_manager(self._alias(operation))
            .filter(
                pk=operation.pk,
                status=BatchOperation.STATUS_RUNNING,
                claimed_by=operation.claimed_by,
            )
            .update(lease_expires_at=now_expression())
        )
        log_event(
            logging.WARNING,
            "handler_interrupted",
            id=operation.pk,
            operationtype=operation.operationtype,
            lease_ended=expired,
            fallback="recovery",
        )

    def _keep_leases(self, pending: list[BatchOperation]) -> list[BatchOperation]:
        """Renew the leases of ``pending`` once a sixth of one has gone by (since the claim or
        the last renewal); returns those still held. Each handler then starts with at least
        five sixths of the waiting operations' leases left, and they are given back when a
        third is left: only a handler that runs over half their lease (the shortest of them)
        gives them back.

        The times are worked out once per renewal, not per handler: leases change only then,
        and the operations still waiting are a subset of these, so their times are never
        earlier."""
        if self._renew_at is None and all(op.lease_expires_at is not None for op in pending):
            self._lease_times(pending)  # from the claim
        if self._renew_at is not None and time.monotonic() < self._renew_at:
            return pending
        # Also a batch whose leases are gone before it starts (a pause after the claim): the
        # fenced renewal drops what was recovered meanwhile, before anything of it runs.
        pending = renew_leases(pending, using=self.using)
        if pending:
            self._lease_times(pending)
        return pending

    def _lease_times(self, pending: list[BatchOperation]) -> None:
        self._renew_at = lease_point(pending, left=5 / 6)
        self._give_back_at = lease_point(pending[1:], left=1 / 3) if len(pending) > 1 else None

    def run(self, operation: BatchOperation) -> None:
        """Run one claimed operation; its success may be recorded at the next flush."""
        try:
            self._run_handler(operation)
        except ReturnedThenInterrupted as late:
            raise late.interruption from None  # the run is kept: held, or recorded
        self._flush_if_due()

    def _flush_if_due(self) -> None:
        if self._successes and time.monotonic() - self._last_flush >= self.window:
            self.flush()

    def _run_handler(self, operation: BatchOperation) -> None:
        self.operations_started += 1
        registered = registry[operation.operationtype]
        if registered.atomic or self.window <= 0:
            try:
                outcome = run_interruptible(
                    operation, using=self.using, interruptions=self.interruptions
                )
            except ReturnedThenInterrupted as late:
                if late.outcome is not None:  # recorded before the interruption goes on
                    self.outcomes.append(late.outcome)
                raise
            self.outcomes.append(outcome)
            return
        alias = self._alias(operation)
        operation_started.send(sender=BatchOperation, operation=operation)
        try:
            output = _call(registered, operation, alias, self.interruptions)
        except ReturnedThenInterrupted as late:
            # Kept as the success it is (or failed, for output it can't store) before the
            # interruption goes on: thrown away, the handler would run again.
            late.outcome = fail_unstorable_output(operation, registered, late.output, alias)
            if late.outcome is not None:
                self.outcomes.append(late.outcome)
            else:
                self._keep_success(operation, late.output, alias)
            raise
        except self.interruptions:
            raise
        except Exception as exc:
            # The handler's error may be its session's loss (a restart, a failover): the
            # failure is recorded on a new one, or it would wait for the lease as a lost worker's.
            replace_lost_sessions({alias})
            self.outcomes.append(
                _finish_failure(operation, registered, describe_exception(exc), alias)
            )
        else:
            self._keep_success(operation, output, alias)

    def _keep_success(self, operation: BatchOperation, output: Any, alias: str) -> None:
        self._successes.append(self._hold(operation, output))
        self._success_aliases.add(alias)

    def _hold(self, operation: BatchOperation, output: Any) -> _Success:
        """A success to record later; its lease is kept alive until then."""
        lease = registry[operation.operationtype].resolved_lease()
        return operation, output, lease_keeper.hold(operation, lease, self._alias(operation))

    def flush(self) -> None:
        """Record every pending success now."""
        self._last_flush = time.monotonic()
        if not self._successes:
            return
        successes, self._successes = self._successes, []
        aliases, self._success_aliases = self._success_aliases, set()
        finished: list[bool | None] = [None] * len(successes)
        try:
            # A session lost while a handler ran (a database restart, a failover) failed the
            # flush before this one; this one reconnects, or the successes would be lost.
            replace_lost_sessions(aliases)
            self._record(successes, let_go="before", finished=finished)
        except BaseException:
            # Interrupted (a soft time limit landing in this very statement) or the database
            # failed: those not recorded are still this batch's to record, at the latest when
            # it exits, and their leases are kept again meanwhile. Lost here, they would stay
            # *running* until their leases ran out, and then run again.
            pairs = list(zip(successes, finished, strict=True))
            left = [success for success, done in pairs if done is None]
            _let_go(left)  # those of the claims not reached yet too, before holding anew
            self._successes = [self._hold(op, output) for op, output, _ in left] + self._successes
            self._success_aliases |= aliases
            # What was recorded is reported all the same (an interruption goes on at once).
            reported = [(success, done) for success, done in pairs if done is not None]
            try:
                _report_successes(
                    [success for success, _ in reported],
                    [done for _, done in reported],
                    self.outcomes,
                    self.interruptions,
                )
            except self.interruptions:
                raise
            except Exception:  # a receiver's, logged: the flush's own error goes on
                pass
            raise
        _report_successes(successes, finished, self.outcomes, self.interruptions)

    def _record(
        self,
        successes: list[_Success],
        *,
        let_go: Literal["before", "after"],
        finished: list[bool | None] | None = None,
    ) -> list[bool | None]:
        """Finish ``successes``, one fenced UPDATE per claim; returns whether each was finished
        (``False``: its claim was lost), in ``finished`` if given, claim by claim (``None``: not
        recorded yet, should a later claim's UPDATE fail). Their leases are let go of
        ``"before"`` the UPDATE (the batch's thread: the keeper renews at a third of the lease,
        so two thirds remain, and a renewal that then finds the operation finished is one let
        go of) or ``"after"`` it (the keeper's thread, which renews them itself: should the
        UPDATE fail, they stay kept)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for index, (operation, _, _) in enumerate(successes):
            groups.setdefault((self._alias(operation), operation.claimed_by), []).append(index)
        if finished is None:
            finished = [None] * len(successes)
        for (alias, token), indexes in groups.items():
            group = [successes[index] for index in indexes]
            if let_go == "before":
                _let_go(group)
            recorded = _finish_successes([(op, output) for op, output, _ in group], alias, token)
            if let_go == "after":
                _let_go(group)
            for index in indexes:
                finished[index] = successes[index][0].pk in recorded
        return finished

    def _alias(self, operation: BatchOperation) -> str:
        return self.using or operation._state.db or write_alias()


def _same_json(values: list[Any]) -> bool:
    """Whether every value is stored as the same JSON. Not ``==``: ``True == 1 == 1.0``."""
    first = values[0]
    if all(value is first for value in values):  # the common case: every handler returned None
        return True
    text = json.dumps(first)
    return all(json.dumps(value) == text for value in values)


def _log_left_to_recovery(event: str, operations: list[BatchOperation], error: Exception) -> None:
    if operations:
        log_event(
            logging.WARNING,
            event,
            ids=",".join(str(op.pk) for op in operations),
            error=repr(error),
            fallback="recovery when their leases expire",
        )


def _let_go(successes: list[_Success]) -> None:
    for _, _, held in successes:
        lease_keeper.let_go(held)


def _finish_successes(group: list[tuple[BatchOperation, Any]], alias: str, token: str) -> set[Any]:
    """Finish successful operations of one claim in one UPDATE, fenced by the claim; returns the
    primary keys of those finished (the others' claims were lost)."""
    outputs = [output for _, output in group]
    output_value: Any = outputs[0]
    if not _same_json(outputs):
        output_value = Case(
            *[When(pk=op.pk, then=Value(out, output_field=JSONField())) for op, out in group],
            output_field=JSONField(),
        )
    pks = [op.pk for op, _ in group]
    manager = BatchOperation.objects.db_manager(alias)
    updated = manager.filter(
        pk__in=pks, status=BatchOperation.STATUS_RUNNING, claimed_by=token
    ).update(
        status=BatchOperation.STATUS_FINISHED,
        result=BatchOperation.RESULT_SUCCESSFUL,
        finished_datetime=now_expression(),
        output_data=output_value,
        lease_expires_at=None,
    )
    finished = set(pks)
    if updated != len(group):
        # Some claims were lost meanwhile (lease expired and recovered): find out which.
        finished = set(
            manager.filter(
                pk__in=pks,
                status=BatchOperation.STATUS_FINISHED,
                result=BatchOperation.RESULT_SUCCESSFUL,
                claimed_by=token,
            ).values_list("pk", flat=True)
        )
    return finished


def _report_successes(
    successes: list[_Success],
    finished: list[bool | None],
    outcomes: list[RunOutcome],
    interruptions: tuple[type[BaseException], ...] = (),
) -> None:
    """Update the instances of the successes recorded, send ``operation_finished`` for them, and
    log the others (their claims were lost); their outcomes go to ``outcomes`` as they come.

    A receiver's error must not cost the other operations their signal: every one is sent,
    and the first error is raised at the end (an interruption goes on at once)."""
    first_error: Exception | None = None
    for (operation, output, _), recorded in zip(successes, finished, strict=True):
        if not recorded:
            outcomes.append(_lost(operation))
            continue
        operation.status = BatchOperation.STATUS_FINISHED
        operation.result = BatchOperation.RESULT_SUCCESSFUL
        operation.finished_datetime = approximately_now(claim_alias(operation, None))
        operation.output_data = output
        operation.lease_expires_at = None
        outcomes.append(RunOutcome.SUCCEEDED)  # it did finish, whatever a receiver does
        try:
            operation_finished.send(
                sender=BatchOperation, operation=operation, succeeded=True, error=None
            )
        except interruptions:
            raise
        except Exception as exc:
            log_event(logging.ERROR, "report_failed", id=operation.pk, error=repr(exc))
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
