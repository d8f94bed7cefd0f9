"""Finishing, as failed, running operations whose process is gone and that nobody recovers.

A worker's claim sets a lease, and recovery takes back what a dead worker held. A synchronous
operation (``create_synchronous``, ``synchronous()``) or one of the original manual flow
(``mark_as_running()``) has no claim and no lease: it runs in the caller's process, which alone
knows whether it still does. If that process dies (a web server's timeout killed it, say), the
operation stays running for good. Nothing can tell such an operation from a slow one, so no
rule here decides; a person or a scheduled job of the project's does, with :func:`fail_abandoned`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..clock import now_expression
from ..errors import storable_text
from ..models import BatchOperation, BatchOperationQuerySet
from ..signals import log_event

ABANDONED_ERROR_TYPE = "batchframework.Abandoned"

DEFAULT_REASON = "Marked abandoned: the process running it stopped without finishing it."


def fail_abandoned(operations: BatchOperationQuerySet, *, reason: str = DEFAULT_REASON) -> int:
    """Finish as failed the operations in ``operations`` that are running unclaimed, and say
    why in ``output_data["error"]`` (type ``batchframework.Abandoned``), as a synchronous block
    that raised records its error.

    Only running operations that no worker claimed (``running_unclaimed()``) are changed: the
    engine's own are recovered when their lease expires, and others are left as they are. One
    conditional UPDATE, so an operation whose block finished meanwhile keeps its own outcome;
    a block that is in fact still running and finishes later records its outcome over this one.
    Returns how many were marked.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"reason must be a non-empty string, not {reason!r}.")
    reason = storable_text(reason)
    marked = operations.running_unclaimed().update(
        status=BatchOperation.STATUS_FINISHED,
        result=BatchOperation.RESULT_FAILED,
        finished_datetime=now_expression(),
        # Not in last_error: a block still running would finish over the mark, and keep it.
        output_data=_error(reason),
    )
    if marked:
        log_event(logging.WARNING, "operations_abandoned", count=marked, reason=reason)
    return marked


def _error(reason: str) -> dict[str, Any]:
    return {"error": {"type": ABANDONED_ERROR_TYPE, "message": reason, "traceback": ""}}
