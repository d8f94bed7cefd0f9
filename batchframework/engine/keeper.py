"""Keeping the lease of a running handler alive while its worker lives.

A claim's lease says how long the worker may take before others presume it dead. Without
renewal, a handler that runs longer than its lease would be recovered and run a second time
while it still runs. So while a handler runs, a daemon thread of the worker process renews its
lease (fenced by the claim) every third of the lease. If the worker dies, the thread dies with
it and the lease expires as it should; if the worker hangs, the thread keeps renewing — a hung
handler is a bug to be seen in ``started_running_datetime``, not a crash to be recovered.

``atomic=True`` handlers are not kept: their row is locked by their own transaction, which
recovery skips (``SKIP LOCKED``), and an UPDATE from another connection would wait for it.

The same thread watches the operations of a batch that wait behind the running handler. Their
leases are not renewed while it runs: a handler that runs long (or hangs) must not hold on to
operations other workers could run. When a third of such an operation's lease is left, the
keeper gives the waiting ones back (:func:`~batchframework.engine.release`: unprocessed, due,
attempt not counted), before their leases expire and recovery would take them for a lost
worker's. And it records the successes the batch holds (``FINISH_WINDOW``) once their window is
over, rather than when the running handler returns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, InterfaceError, connections, transaction
from django.utils import timezone

from ..models import BatchOperation
from ..registry import registry
from ..signals import log_event
from ._common import time_after
from .claim import release

#: What a renewal may raise when the database is unreachable (``InterfaceError`` is not a
#: ``DatabaseError``: psycopg raises it for a connection that is already closed).
DatabaseErrors = (DatabaseError, InterfaceError)

#: How long a renewal waits for its row's lock (PostgreSQL; MariaDB's least wait is a second).
#: A handler that reports progress inside a transaction of its own holds its row until that
#: commits; one renewal waiting on it would keep every other lease of the process from being
#: renewed meanwhile. A locked row is safe where it is: recovery skips locked rows.
LOCK_WAIT_MS = 100

#: Never wake more often than this, whatever the lease.
MIN_INTERVAL = 0.2
#: Never sleep longer than this.
MAX_INTERVAL = 1.0


@dataclass
class _Kept:
    key: int
    pk: Any
    token: str
    lease: timedelta
    alias: str
    renewed_at: float
    # Its last renewal found the row locked (by its own handler's transaction): the others
    # due are renewed first.
    locked: bool = False


@dataclass
class _Deferred:
    """Work the keeper does for a batch at ``run_at`` (``time.monotonic()``) while the batch's
    handler runs, unless the batch takes it back first (:meth:`LeaseKeeper.take_back`)."""

    key: int
    run_at: float
    job: Callable[[], Any]
    failed_event: str  # logged when the job's database is unreachable (it is tried again)
    # Held while the keeper does the job, so that the batch learns the outcome. Only the batch
    # removes an entry.
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False
    result: Any = None


class LeaseKeeper:
    """One daemon thread per process renewing the leases of the handlers running in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[int, _Kept] = {}
        self._deferred: dict[int, _Deferred] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._next_key = 0
        # Until when (time.monotonic()) the thread sleeps; None while it is awake (it then
        # plans its next wake-up from everything deferred until it goes to sleep).
        self._sleep_until: float | None = None

    @contextlib.contextmanager
    def keep(self, operation: BatchOperation, lease: timedelta, alias: str) -> Iterator[None]:
        """Renew ``operation``'s lease while the block runs."""
        key = self.hold(operation, lease, alias)
        try:
            yield
        finally:
            self.let_go(key)

    def hold(self, operation: BatchOperation, lease: timedelta, alias: str) -> int:
        """Renew ``operation``'s lease until :meth:`let_go` is called with the returned key
        (for an operation whose success is recorded later, with others)."""
        # Counted from when its lease was set as far as this process knows (the claim, or the
        # batch's last renewal; the keeper may have renewed it since, which only makes the next
        # renewal early): a lease that is already half gone is renewed in time.
        expires = operation.lease_expires_at
        age = 0.0 if expires is None else (lease - (expires - timezone.now())).total_seconds()
        age = min(max(age, 0.0), lease.total_seconds())
        with self._lock:
            self._ensure_thread()
            self._next_key += 1
            key = self._next_key
            self._kept[key] = _Kept(
                key, operation.pk, operation.claimed_by, lease, alias, time.monotonic() - age
            )
        if lease.total_seconds() / 3 - age < MAX_INTERVAL:
            # Due before the keeper's next tick may come: wake it (only ever for short leases,
            # or leases already partly gone).
            self._wake.set()
        return key

    def let_go(self, key: int) -> None:
        with self._lock:
            self._kept.pop(key, None)

    def watch_waiting(
        self, operations: Sequence[BatchOperation], alias: str, *, give_back_at: float
    ) -> int:
        """Give ``operations`` (claimed, waiting behind a handler of their batch) back at
        ``give_back_at`` (``time.monotonic()``; a batch passes the time a third of their lease
        is left), unless :meth:`let_go_waiting` is called first with the returned key."""
        return self.defer(
            lambda: _give_back(operations, alias),
            at=give_back_at,
            failed_event="waiting_release_failed",
        )

    def let_go_waiting(self, key: int) -> bool:
        """Stop watching; ``True`` if the keeper gave the operations back meanwhile (the batch
        must not run them: they are another claimer's now)."""
        item = self.take_back(key)
        # Even those not released (their claim was lost meanwhile) are no longer the batch's to
        # run: fenced by the claim, they are someone else's.
        return item is not None and item.done

    def defer(
        self, job: Callable[[], Any], *, at: float, failed_event: str, punctual: bool = True
    ) -> int:
        """Call ``job()`` on the keeper's thread (and its database connections) at ``at``
        (``time.monotonic()``, or up to :data:`MIN_INTERVAL` later), unless :meth:`take_back`
        is called first with the returned key. If the database is unreachable, ``failed_event``
        is logged and the job is tried again :data:`MAX_INTERVAL` later (after any other error,
        a bug, it is left to the caller).

        Not ``punctual``: up to :data:`MAX_INTERVAL` later, and the thread is never woken for
        it, for work deferred before every handler: each wake-up costs the batch's thread the
        GIL for a tick."""
        with self._lock:
            self._ensure_thread()
            self._next_key += 1
            key = self._next_key
            self._deferred[key] = _Deferred(key, at, job, failed_event)
            # Woken only if it would otherwise be late.
            wake = (
                punctual and self._sleep_until is not None and at + MIN_INTERVAL < self._sleep_until
            )
        if wake:
            self._wake.set()
        return key

    def take_back(self, key: int) -> _Deferred | None:
        """Cancel a :meth:`defer` job; if the keeper has done it (waiting for it to finish if
        it is doing it now), return it with its ``result``."""
        with self._lock:
            item = self._deferred.pop(key, None)
        if item is None:
            return None
        with item.lock:  # the keeper doing it now: wait for its outcome
            return item if item.done else None

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():
            # A forked child (a prefork pool process) has no copy of the parent's thread, and
            # none of the parent's handlers run in it.
            self._pid = os.getpid()
            self._kept = {}
            self._deferred = {}
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._sleep_until = None  # its first tick plans from everything there is
            self._thread = threading.Thread(
                target=self._loop, name="batchframework-lease-keeper", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self._tick()
            except Exception as exc:
                # Whatever went wrong, the handlers still running need their leases renewed:
                # a dead keeper would let them be recovered, and run again, while they run.
                log_event(logging.ERROR, "lease_keeper_error", error=repr(exc))
                time.sleep(MIN_INTERVAL)

    def _tick(self) -> None:
        self._wake.clear()  # before the snapshot: a hold() after it wakes the next wait
        with self._lock:
            self._sleep_until = None
            kept = list(self._kept.values())
            deferred = list(self._deferred.values())
        if not kept and not deferred:
            # Hold no database connection while idle (connections are per thread here).
            connections.close_all()
        now = time.monotonic()
        for item in deferred:
            if item.run_at <= now and not item.done:
                self._run_deferred(item)
        due = [k for k in kept if now - k.renewed_at >= k.lease.total_seconds() / 3]
        due.sort(key=lambda k: (k.locked, k.renewed_at))  # the rows free, the oldest first
        for kept_item in due:
            try:
                self._renew(kept_item)
            except Exception as exc:  # one operation's trouble must not starve the others
                log_event(logging.ERROR, "lease_keeper_error", id=kept_item.pk, error=repr(exc))
        with self._lock:
            # From what is held and deferred now, including what came while it worked.
            now = time.monotonic()
            waits = [k.renewed_at + k.lease.total_seconds() / 3 - now for k in self._kept.values()]
            waits += [item.run_at - now for item in self._deferred.values() if not item.done]
            # At least once a second: letting go of the connection once idle never waits long,
            # and hold() wakes the thread only for a renewal due sooner than that.
            pause = max(MIN_INTERVAL, min([*waits, MAX_INTERVAL]))
            self._sleep_until = now + pause
        self._wake.wait(pause)

    def _renew(self, item: _Kept) -> None:
        try:
            with _lock_wait_limited(item.alias):
                renewed = (
                    BatchOperation.objects.db_manager(item.alias)
                    .filter(pk=item.pk, status=BatchOperation.STATUS_RUNNING, claimed_by=item.token)
                    .update(lease_expires_at=time_after(item.lease))
                )
        except DatabaseErrors as exc:
            if is_lock_timeout(exc):
                # Its handler holds the row (progress reported in its own transaction), and
                # recovery skips it meanwhile: tried again at the next tick, after the others.
                if not item.locked:
                    log_event(logging.INFO, "lease_renewal_waiting", id=item.pk, reason="locked")
                item.locked = True
                return
            # The database is down or the connection broke.
            log_event(logging.WARNING, "lease_renewal_failed", id=item.pk, error=repr(exc))
            with contextlib.suppress(*DatabaseErrors):
                connections[item.alias].close()
            return
        item.renewed_at = time.monotonic()
        item.locked = False
        if renewed:
            return
        with self._lock:
            # Let go of meanwhile: its own worker finished it while this renewal ran, which is
            # no lost claim. Still held: the claim is lost for good; say so once.
            still_held = self._kept.pop(item.key, None) is item
        if still_held:
            log_event(logging.WARNING, "lease_renewal_refused", id=item.pk, reason="claim_lost")

    def _run_deferred(self, item: _Deferred) -> None:
        with item.lock:
            with self._lock:
                if item.key not in self._deferred:
                    return  # taken back first: the batch's handler returned in time
            try:
                item.result = item.job()
            except DatabaseErrors as exc:
                # Not done: the batch still holds the work. Tried again in a while, for a
                # handler that may run (or hang) much longer; the batch does it otherwise.
                item.run_at = time.monotonic() + MAX_INTERVAL
                log_event(logging.WARNING, item.failed_event, error=repr(exc))
                with contextlib.suppress(*DatabaseErrors):
                    connections.close_all()  # this thread's: reconnected when next needed
                return
            except Exception as exc:  # a bug, which trying again would repeat: the batch's
                item.run_at = math.inf
                log_event(logging.ERROR, "lease_keeper_error", error=repr(exc))
                return
            item.done = True


@contextlib.contextmanager
def _lock_wait_limited(alias: str) -> Iterator[None]:
    """Run the block with a row lock wait of at most :data:`LOCK_WAIT_MS`, leaving the
    session as it was: the connection may go back to a pool (Django's, or PgBouncer's), where
    other work must not inherit the limit. PostgreSQL: ``SET LOCAL``, in a transaction of the
    block's own; MariaDB/MySQL, which have no ``SET LOCAL``: set, then set back. SQLite locks
    the database, not rows: nothing to limit."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with transaction.atomic(using=alias):
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
            yield
    elif connection.vendor == "mysql":
        seconds = math.ceil(LOCK_WAIT_MS / 1000)
        with connection.cursor() as cursor:
            cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {seconds}")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION innodb_lock_wait_timeout = DEFAULT")
    else:
        yield


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether a statement gave up waiting for a row lock (PostgreSQL SQLSTATE 55P03,
    MySQL/MariaDB error 1205)."""
    return getattr(exc.__cause__, "sqlstate", None) == "55P03" or exc.args[:1] == (1205,)


def _give_back(operations: Sequence[BatchOperation], alias: str) -> int:
    released = release(operations, using=alias)
    log_event(
        logging.INFO,
        "waiting_released",
        count=released,
        reason="the handler before them in their batch ran over half their lease",
    )
    return released


def lease_point(operations: Sequence[BatchOperation], *, left: float) -> float:
    """When (``time.monotonic()``) the first of ``operations`` has only the fraction ``left``
    of its lease left, by this process's clock."""
    now = timezone.now()
    remaining = min(
        (op.lease_expires_at or now + lease) - now - lease * left
        for op in operations
        for lease in (registry[op.operationtype].resolved_lease(),)
    )
    return time.monotonic() + remaining.total_seconds()


#: The process-wide keeper used by :func:`batchframework.engine.run_claimed`.
lease_keeper = LeaseKeeper()
