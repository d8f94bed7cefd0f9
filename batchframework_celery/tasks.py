"""The Celery tasks: thin wrappers that ask the engine to claim and run.

Messages carry only primary keys (or a queue name) and an optional database alias; a handler is
found only by looking up the claimed row's ``operationtype`` in the registry. A message for an
operation that was deleted, cancelled, claimed elsewhere, finished or is not yet due does
nothing but log (invariants 1 and 8).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings as django_settings

from batchframework.engine import BatchRunner, claim_due
from batchframework.signals import log_event

RUN_OPERATIONS_TASK = "batchframework.run_operations"
DRAIN_TASK = "batchframework.drain"
POLL_TASK = "batchframework.poll"

#: Most ids one message may name; larger messages are refused as malformed.
MAX_IDS_PER_MESSAGE = 10_000


def _valid_alias(using: Any) -> str | None:
    if using is None:
        return None
    if isinstance(using, str) and using in django_settings.DATABASES:
        return using
    raise ValueError(f"unknown database alias {using!r}")


def _valid_ids(ids: Any) -> list[int]:
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_IDS_PER_MESSAGE:
        raise ValueError("ids must be a non-empty list of at most 10000 integers")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise ValueError("ids must be positive integers")
    return ids


def run_claimed_batch(operations: list[Any], using: str | None) -> int:
    with BatchRunner(using=using) as runner:
        return runner.run_batch(operations)


@shared_task(name=RUN_OPERATIONS_TASK, ignore_result=True)
def run_operations(ids: Any, using: Any = None) -> int:
    """Claim the named operations that are due (one statement per chunk) and run them."""
    try:
        ids = _valid_ids(ids)
        using = _valid_alias(using)
    except ValueError as exc:
        log_event(logging.ERROR, "message_rejected", task=RUN_OPERATIONS_TASK, reason=str(exc))
        return 0
    claimed = claim_due(ids=ids, limit=len(ids), using=using)
    if len(claimed) < len(ids):
        won = {op.pk for op in claimed}
        log_event(
            logging.INFO,
            "message_noop",
            task=RUN_OPERATIONS_TASK,
            named=len(ids),
            claimed=len(claimed),
            ids=",".join(str(i) for i in ids if i not in won)[:500],
            reason="gone, cancelled, claimed elsewhere, finished or not yet due",
        )
    return run_claimed_batch(claimed, using)


@shared_task(name=DRAIN_TASK, ignore_result=True)
def drain(queue: Any, using: Any = None) -> int:
    """Claim one batch of due operations of ``queue`` and run them."""
    if not isinstance(queue, str) or not queue or len(queue) > 100:
        log_event(logging.ERROR, "message_rejected", task=DRAIN_TASK, reason="bad queue name")
        return 0
    try:
        using = _valid_alias(using)
    except ValueError as exc:
        log_event(logging.ERROR, "message_rejected", task=DRAIN_TASK, reason=str(exc))
        return 0
    claimed = claim_due(queues=[queue], using=using)
    if not claimed:
        log_event(
            logging.INFO,
            "message_noop",
            task=DRAIN_TASK,
            queue=queue,
            reason="nothing due and unclaimed (others claimed it first)",
        )
        return 0
    return run_claimed_batch(claimed, using)


@shared_task(name=POLL_TASK, ignore_result=True)
def poll(using: Any = None) -> dict[str, int]:
    """The beat-driven poller; see :func:`batchframework_celery.poller.poll_once`."""
    from .poller import poll_once

    try:
        using = _valid_alias(using)
    except ValueError as exc:
        log_event(logging.ERROR, "message_rejected", task=POLL_TASK, reason=str(exc))
        return {}
    return poll_once(using=using)
