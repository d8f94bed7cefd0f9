"""The DB-polling worker: runs operations without Celery, for small deployments and the demo.

It claims due operations in batches, runs them, recovers expired leases, and sleeps until the
next operation is due or the poll interval has passed. On SIGTERM/SIGINT/SIGHUP it finishes the
operation in hand, gives back the rest of its batch, and exits; a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from traceback import format_exc
from types import FrameType
from typing import Any

from django.db import DatabaseError, InterfaceError, close_old_connections, connections
from django.db.models import Min

from .clock import database_now
from .conf import MAX_BATCH_SIZE, MAX_POLL_INTERVAL, get_settings
from .engine import BatchRunner, claim_due, recover_expired
from .engine._common import claimer_name, write_alias
from .engine.claim import claims_of
from .models import BatchOperation
from .registry import registry
from .signals import log_event

#: What the database raises while it is unreachable (``InterfaceError`` is not a
#: ``DatabaseError``: a driver raises it for a connection that is already closed).
DATABASE_ERRORS = (DatabaseError, InterfaceError)
#: Wait this long after a database error before trying again (the server may be restarting).
DATABASE_ERROR_BACKOFF = 1.0
#: Never sleep less than this between empty polls.
MIN_SLEEP = 0.01


class StopFlag:
    """A stop request that a signal handler may make: like ``threading.Event``, but on a
    re-entrant lock. A handler runs in the main thread between two bytecodes, possibly while
    that thread holds the flag's lock inside :meth:`wait`; with ``Event``'s plain lock, setting
    the flag there would wait for itself forever."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.RLock())
        self._set = False

    def set(self) -> None:
        with self._condition:
            self._set = True
            self._condition.notify_all()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        with self._condition:
            if not self._set:
                self._condition.wait(timeout)
            return self._set


def _checked_poll_interval(value: timedelta | float | None) -> timedelta | None:
    """``value`` as a duration: a timedelta or a number of seconds, more than nothing and at
    most a day (a sleep of 1e10 s overflows the platform's timeout)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        longest = MAX_POLL_INTERVAL.total_seconds()
        # NaN and infinity fail the comparison; timedelta() would raise or overflow on them.
        value = timedelta(seconds=value) if 0 < value <= longest else timedelta(0)
    if not (isinstance(value, timedelta) and timedelta(0) < value <= MAX_POLL_INTERVAL):
        raise ValueError(
            "poll_interval must be a positive timedelta or number of seconds, at most a day "
            f"(and not rounding to no time at all), not {value!r}."
        )
    return value


class Worker:
    """A loop over the engine. Construct it, then call :meth:`run`."""

    def __init__(
        self,
        *,
        queues: Sequence[str] | None = None,
        batch_size: int | None = None,
        max_operations: int | None = None,
        once: bool = False,
        poll_interval: timedelta | float | None = None,
        name: str | None = None,
        using: str | None = None,
        log: Callable[[str], Any] | None = None,
    ) -> None:
        settings = get_settings()
        # Checked here, as the command checks its options: a wrong value would otherwise fail
        # in the first claim's SQL, which the loop takes for a database outage and retries.
        poll_interval = _checked_poll_interval(poll_interval)
        for option, value, most in (
            ("batch_size", batch_size, MAX_BATCH_SIZE),
            ("max_operations", max_operations, None),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < 1
                or (most is not None and value > most)
            ):
                limit = f" of at most {most:,}" if most is not None else ""
                raise ValueError(f"{option} must be a whole number from 1{limit}, not {value!r}.")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a string, not {name!r}.")
        if using is not None and using not in connections:
            raise ValueError(f"using must be a database alias of DATABASES, not {using!r}.")
        if isinstance(queues, str):
            raise ValueError(f"queues must be a list of names, not the string {queues!r}.")
        self.queues = None if queues is None else list(queues)  # once: it may be an iterator
        if self.queues == []:
            raise ValueError("queues must be a non-empty list of names, or None for all.")
        self.batch_size = batch_size or settings.BATCH_SIZE
        self.max_operations = max_operations
        self.once = once
        self.poll_interval = (poll_interval or settings.POLL_INTERVAL).total_seconds()
        self.name = name
        self.using = using
        self.log = log or (lambda message: None)
        self.processed = 0
        self._stop = StopFlag()
        self._signals_received = 0
        self._fruitless_polls = 0  # in a row: operations due, yet none could be claimed
        #: The name of a claim made but not known to have committed: its answer was lost with
        #: the session (see :meth:`_adopt_unconfirmed_claim`).
        self._unconfirmed_claim: str | None = None

    # --- Signals -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # SIGHUP too: the terminal or ssh session that started the worker closed, whose default
        # would kill the worker and leave its whole batch running until the leases expire.
        # Unless it is ignored (``nohup``: keep running), or the platform has none (Windows).
        hangup = getattr(signal, "SIGHUP", None)
        if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
            signal.signal(hangup, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_received += 1
        if self._signals_received > 1:
            log_event(logging.WARNING, "worker_exit_now", signal=signum)
            raise SystemExit(128 + signum)
        log_event(
            logging.INFO, "worker_stopping", signal=signum, reason="finishing the operation in hand"
        )
        self._stop.set()

    def stop(self) -> None:
        """Ask the loop to stop after the operation in hand."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- Loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped, ``max_operations`` are done, or (with ``once``) nothing is due.

        Returns how many operations this worker ran.
        """
        log_event(
            logging.INFO,
            "worker_started",
            queues=",".join(self.queues or ["*"]),
            batch_size=self.batch_size,
            handlers=len(registry),
        )
        self._say(f"batchframework worker started (queues: {', '.join(self.queues or ['all'])})")
        while not self.stopping and not self._reached_max():
            try:
                ran = self._tick()
                if ran == 0 and self.once:
                    break
                if ran:
                    self._fruitless_polls = 0
                sleep = self._sleep_seconds() if ran == 0 else 0.0
            except DATABASE_ERRORS as exc:
                log_event(
                    logging.ERROR,
                    "worker_database_error",
                    error=repr(exc),
                    retry_in="never (--once)" if self.once else DATABASE_ERROR_BACKOFF,
                )
                self._reset_connections()
                if self.once:
                    # A cron job or script: fail where someone sees it, instead of retrying
                    # until the database comes back (never, if it is not migrated).
                    raise
                self._stop.wait(DATABASE_ERROR_BACKOFF)
                continue
            except Exception as exc:
                # A bug outside the handlers, which fail only their attempt: a signal receiver
                # or a dispatcher that raised. The batch's runner gave back what it held; log
                # it and go on, as Celery does, rather than stop every queue this worker serves.
                log_event(
                    logging.ERROR,
                    "worker_error",
                    error=repr(exc),
                    traceback=format_exc(),
                    retry_in="never (--once)" if self.once else DATABASE_ERROR_BACKOFF,
                )
                if self.once:
                    raise
                self._stop.wait(DATABASE_ERROR_BACKOFF)
                continue
            if sleep:
                self._stop.wait(sleep)
        log_event(logging.INFO, "worker_stopped", processed=self.processed)
        self._say(f"batchframework worker stopped after {self.processed} operation(s)")
        return self.processed

    def _say(self, message: str) -> None:
        # The terminal may be gone (it hung up, which is why the worker stops): what the
        # worker says is not worth ending in a traceback for.
        with contextlib.suppress(OSError):
            self.log(message)

    def _reached_max(self) -> bool:
        return self.max_operations is not None and self.processed >= self.max_operations

    def _tick(self) -> int:
        adopted = self._adopt_unconfirmed_claim()
        if adopted:
            return self._run_batch(adopted)
        recover_expired(using=self.using)
        limit = self.batch_size
        if self.max_operations is not None:
            limit = min(limit, self.max_operations - self.processed)
        # Each claim under a name of its own, remembered until its answer arrives.
        self._unconfirmed_claim = claimer_name(self.name)
        claimed = claim_due(
            queues=self.queues, limit=limit, worker=self._unconfirmed_claim, using=self.using
        )
        self._unconfirmed_claim = None
        return self._run_batch(claimed)

    def _adopt_unconfirmed_claim(self) -> list[BatchOperation]:
        """The operations of a claim whose answer was lost with the database session.

        The claim may have committed all the same: claimed again, its operations would be
        found running, wait for their leases to expire, and be counted as a lost worker's
        attempt (failed, with ``max_attempts=1``) without having run. Found by the claim's
        name, they are run now. (While the database stays unreachable, this fails and is
        tried again on the next tick.)"""
        if self._unconfirmed_claim is None:
            return []
        found = claims_of(self._unconfirmed_claim, using=self.using)
        self._unconfirmed_claim = None
        if found:
            log_event(logging.WARNING, "claim_adopted", count=len(found), reason="answer_lost")
        return found

    def _run_batch(self, claimed: list[BatchOperation]) -> int:
        runner = BatchRunner(using=self.using)
        try:
            with runner:
                runner.run_batch(claimed, stop=lambda: self.stopping)
        finally:  # a batch that ended in an error ran handlers too (--max-operations counts)
            self.processed += runner.operations_started
        return runner.operations_started

    def _sleep_seconds(self) -> float:
        """Until the next operation is due, at most the poll interval."""
        types = registry.operationtypes()
        upcoming = (
            # Where claims are made: a lagging read replica would have the worker sleep past
            # what is due, or wake for what was claimed already.
            BatchOperation.objects.db_manager(write_alias(self.using))
            .unprocessed()
            .filter(operationtype__in=types)
        )
        if self.queues is not None:
            upcoming = upcoming.filter(queue__in=self.queues)
        next_due = upcoming.aggregate(next_due=Min("run_after"))["next_due"]
        if next_due is None:
            self._fruitless_polls = 0
            return self.poll_interval
        # On the database's clock, which decides when it is due: a worker whose own clock
        # runs fast would otherwise spin, polling for operations that are not due yet.
        wait = (next_due - database_now(self.using)).total_seconds()
        if wait > MIN_SLEEP:
            self._fruitless_polls = 0
            return min(self.poll_interval, wait)
        # Due, yet the claim found nothing: their rows are locked (another worker's claim, or
        # a long transaction of the application's). Back off instead of polling 100 times a
        # second until they are let go.
        self._fruitless_polls += 1
        return min(self.poll_interval, MIN_SLEEP * 2 ** min(self._fruitless_polls, 16))

    def _reset_connections(self) -> None:
        for connection in connections.all(initialized_only=True):
            with contextlib.suppress(*DATABASE_ERRORS):
                connection.close()
        close_old_connections()
