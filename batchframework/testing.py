"""Helpers for users' test suites: run what is due, in the calling process, at any time.

``run_due(now=timezone.now() + timedelta(minutes=16))`` is time travel: it runs every operation
due at that moment through the same claim and finish a worker uses, and returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django.utils import timezone

from .clock import check_now
from .engine import claim_due, recover_expired, run_claimed
from .models import BatchOperation

#: Upper bound on claim rounds, so a handler that keeps re-enqueueing itself can't hang a test.
MAX_ROUNDS = 1000


def run_due(
    now: datetime | None = None,
    operationtype: str | Sequence[str] | None = None,
    *,
    using: str | None = None,
) -> list[BatchOperation]:
    """Run, in this process, every operation due at ``now`` (default: the current time).

    A failed attempt is rescheduled on the database clock (real time + backoff), so a retry
    runs in this call only when ``now`` lies beyond that; pass a later ``now`` to run retries.
    Expired leases at ``now`` are recovered first. Returns the operations that were run,
    in the order they ran, with their final status. A ``now`` that is not a timezone-aware
    datetime raises ``TypeError`` (``ValueError`` when naive, or outside the years 1000-9999).
    """
    # Checked here, not only where the queries build it: before the first query, and so that
    # a falsy wrong value (``""``, ``0``) is refused rather than taken for "the current time".
    if now is None:
        now = timezone.now()
    check_now(now)
    types = [operationtype] if isinstance(operationtype, str) else operationtype
    recover_expired(now=now, using=using)
    ran: list[BatchOperation] = []
    for _ in range(MAX_ROUNDS):
        claimed = claim_due(operationtypes=types, now=now, using=using, worker="run_due")
        if not claimed:
            break
        for operation in claimed:
            run_claimed(operation, using=using)
            ran.append(operation)
    return ran
