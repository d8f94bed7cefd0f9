"""Lifecycle signals, and the receivers that log them as ``key=value`` lines.

Receivers get ``sender=BatchOperation`` and the keyword arguments listed on each signal. The
logging receivers are connected by the app config; disconnect them to silence the library.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("batchframework")

#: ``operations``: the list of operations stored by one ``enqueue``/``enqueue_many`` call.
operations_enqueued = Signal()
#: ``operation``: a claimed operation whose handler is about to run.
operation_started = Signal()
#: ``operation``, ``succeeded`` (bool), ``error`` (dict or ``None``): the operation finished.
#: Its ``finished_datetime`` is this process's estimate of the database's time the row holds.
operation_finished = Signal()
#: ``operation``, ``error``, ``attempt``: an attempt failed and another is scheduled; the
#: instance's ``run_after`` estimates the retry's due time as the row holds it.
operation_retry_scheduled = Signal()
#: ``operation_id``: an unprocessed operation was cancelled and will never run. Sent once the
#: cancel has committed (never for one a rollback undid).
operation_cancelled = Signal()


#: Control characters written as escapes, so that no value (a queue name from a hostile
#: message, an error text) can start a line of its own and pass for another event.
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(32), 127, 0x85]} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",  # line and paragraph separators: line breaks to some log viewers
    0x2029: "\\u2029",
}
#: Characters that make a value quoted.
_QUOTED = frozenset('="\\') | {chr(i) for i in _ESCAPES}


def kv(**fields: Any) -> str:
    """Format fields as ``key=value`` pairs, quoting values that contain spaces, and escaping
    quotes, backslashes and control characters inside quotes: one event is one line."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in _QUOTED for c in text):
            escaped = text.replace("\\", "\\\\").replace('"', '\\"').translate(_ESCAPES)
            text = f'"{escaped}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def log_event(level: int, event: str, /, **fields: Any) -> None:
    """Log one event as ``event=... key=value ...``; the line is built only if it is emitted."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", kv(event=event, **fields))


def _log_enqueued(operations: list[Any], **kwargs: Any) -> None:
    if not logger.isEnabledFor(logging.INFO) or not operations:
        return
    from django.db import connections, transaction

    alias = operations[0]._state.db
    if alias and connections[alias].in_atomic_block:
        # Logged when the rows are there for everyone: a rolled-back enqueue logs nothing.
        transaction.on_commit(lambda: _emit_enqueued(operations), using=alias)
    else:
        _emit_enqueued(operations)


def _emit_enqueued(operations: list[Any]) -> None:
    if len(operations) == 1:
        op = operations[0]
        log_event(
            logging.INFO,
            "enqueued",
            id=op.pk,
            operationtype=op.operationtype,
            queue=op.queue,
            run_after=op.run_after.isoformat(),
        )
    else:
        log_event(logging.INFO, "enqueued_many", count=len(operations))


def _log_started(operation: Any, **kwargs: Any) -> None:
    log_event(
        logging.DEBUG,
        "started",
        id=operation.pk,
        operationtype=operation.operationtype,
        attempt=operation.attempts,
        claimed_by=operation.claimed_by,
    )


def _log_finished(operation: Any, succeeded: bool, error: Any = None, **kwargs: Any) -> None:
    if succeeded:
        log_event(
            logging.INFO,
            "finished",
            id=operation.pk,
            operationtype=operation.operationtype,
            result="successful",
        )
    else:
        # The traceback is a field like any other, escaped into the event's one line: it ends
        # with the error's message, which may come from outside.
        log_event(
            logging.ERROR,
            "finished",
            id=operation.pk,
            operationtype=operation.operationtype,
            result="failed",
            error_type=(error or {}).get("type", ""),
            traceback=(error or {}).get("traceback", ""),
        )


def _log_retry(operation: Any, error: Any, attempt: int, **kwargs: Any) -> None:
    log_event(
        logging.WARNING,
        "retry_scheduled",
        id=operation.pk,
        operationtype=operation.operationtype,
        attempt=attempt,
        error_type=error.get("type", ""),
        traceback=error.get("traceback", ""),
    )


def _log_cancelled(operation_id: Any, **kwargs: Any) -> None:
    log_event(logging.INFO, "cancelled", id=operation_id)


def connect_logging_receivers() -> None:
    operations_enqueued.connect(_log_enqueued, dispatch_uid="batchframework.log.enqueued")
    operation_started.connect(_log_started, dispatch_uid="batchframework.log.started")
    operation_finished.connect(_log_finished, dispatch_uid="batchframework.log.finished")
    operation_retry_scheduled.connect(_log_retry, dispatch_uid="batchframework.log.retry")
    operation_cancelled.connect(_log_cancelled, dispatch_uid="batchframework.log.cancelled")
