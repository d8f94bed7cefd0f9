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
worker's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, InterfaceError, connections
from django.utils import timezone

from ..models import BatchOperation
from ..registry import registry
from ..signals import log_event
from ._common import time_after
from .claim import release

#: What a renewal may raise when the database is unreachable (``InterfaceError`` is not a
#: ``DatabaseError``: psycopg raises it for a connection that is already closed).
DatabaseErrors = (DatabaseError, InterfaceError)

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


@dataclass
class _Waiting:
    key: int
    operations: Sequence[BatchOperation]
    alias: str
    give_back_at: float  # time.monotonic() when the first of them has a third of its lease left
    # Held while the keeper gives them back, so that the batch learns the outcome (see
    # :meth:`LeaseKeeper.let_go_waiting`). Only the batch removes an entry.
    lock: threading.Lock = field(default_factory=threading.Lock)
    tried: bool = False  # the keeper tried to give them back (once)
    released: bool = False


class LeaseKeeper:
    """One daemon thread per process renewing the leases of the handlers running in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[int, _Kept] = {}
        self._waiting: dict[int, _Waiting] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._next_key = 0

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
        with self._lock:
            self._ensure_thread()
            self._next_key += 1
            key = self._next_key
            self._waiting[key] = _Waiting(key, operations, alias, give_back_at)
        if give_back_at - time.monotonic() < MAX_INTERVAL:
            self._wake.set()
        return key

    def let_go_waiting(self, key: int) -> bool:
        """Stop watching; ``True`` if the keeper gave the operations back meanwhile (the batch
        must not run them: they are another claimer's now)."""
        with self._lock:
            item = self._waiting.pop(key, None)
        if item is None:
            return False
        with item.lock:  # a release in progress: wait for its outcome
            return item.released

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():
            # A forked child (a prefork pool process) has no copy of the parent's thread, and
            # none of the parent's handlers run in it.
            self._pid = os.getpid()
            self._kept = {}
            self._waiting = {}
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
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
            kept = list(self._kept.values())
            waiting = list(self._waiting.values())
        if not kept and not waiting:
            # Hold no database connection while idle (connections are per thread here).
            connections.close_all()
        now = time.monotonic()
        for watched in waiting:
            if watched.give_back_at <= now and not watched.tried:
                try:
                    self._give_back(watched)
                except Exception as exc:  # not given back: the batch still holds them
                    log_event(logging.ERROR, "lease_keeper_error", error=repr(exc))
        due = [k for k in kept if now - k.renewed_at >= k.lease.total_seconds() / 3]
        for item in due:
            try:
                self._renew(item)
            except Exception as exc:  # one operation's trouble must not starve the others
                log_event(logging.ERROR, "lease_keeper_error", id=item.pk, error=repr(exc))
        now = time.monotonic()
        waits = [item.renewed_at + item.lease.total_seconds() / 3 - now for item in kept]
        waits += [watched.give_back_at - now for watched in waiting if not watched.tried]
        # At least once a second: letting go of the connection once idle never waits long,
        # and hold() wakes the thread only for a renewal due sooner than that.
        self._wake.wait(max(MIN_INTERVAL, min([*waits, MAX_INTERVAL])))

    def _renew(self, item: _Kept) -> None:
        try:
            renewed = (
                BatchOperation.objects.db_manager(item.alias)
                .filter(pk=item.pk, status=BatchOperation.STATUS_RUNNING, claimed_by=item.token)
                .update(lease_expires_at=time_after(item.lease))
            )
        except DatabaseErrors as exc:  # the database is down or the connection broke
            log_event(logging.WARNING, "lease_renewal_failed", id=item.pk, error=repr(exc))
            with contextlib.suppress(*DatabaseErrors):
                connections[item.alias].close()
            return
        item.renewed_at = time.monotonic()
        if renewed:
            return
        with self._lock:
            # Let go of meanwhile: its own worker finished it while this renewal ran, which is
            # no lost claim. Still held: the claim is lost for good; say so once.
            still_held = self._kept.pop(item.key, None) is item
        if still_held:
            log_event(logging.WARNING, "lease_renewal_refused", id=item.pk, reason="claim_lost")

    def _give_back(self, watched: _Waiting) -> None:
        with watched.lock:
            with self._lock:
                if watched.key not in self._waiting:
                    return  # the batch let go of them first: its handler returned in time
            watched.tried = True
            try:
                released = release(watched.operations, using=watched.alias)
            except DatabaseErrors as exc:
                # Still claimed by the batch, which will run them or renew their leases.
                log_event(logging.WARNING, "waiting_release_failed", error=repr(exc))
                with contextlib.suppress(*DatabaseErrors):
                    connections[watched.alias].close()
                return
            # Even those not released (their claim was lost meanwhile) are no longer the
            # batch's to run: fenced by the claim, they are someone else's.
            watched.released = True
        log_event(
            logging.INFO,
            "waiting_released",
            count=released,
            reason="the handler before them in their batch ran over half their lease",
        )


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
