"""Telling the batches that run in a Celery worker that the worker is shutting down.

Celery's warm shutdown waits for the tasks in hand to return, and a message's task runs a
whole batch: up to ``BATCH_SIZE`` handlers one after another. A deployment's grace period
(Kubernetes: 30 s) may run out first and end in ``SIGKILL``, and the operations the batch had
not started then stay leased until recovery finds them, which also marks them to be claimed
alone from then on. So the worker's main process raises a flag when its shutdown begins
(``worker_shutting_down``, sent from its signal handler), and a batch checks it between
handlers: it ends after the handler in hand and gives back the operations it has not started,
unprocessed and without spending an attempt, for the poller's next drain to hand to a worker
that is not stopping.

The flag is a byte of shared memory created in the main process before the pool starts its
children (``worker_init``), so prefork children, which are forked from it, see it; solo and
thread pools run the tasks in the main process itself. Where it was not created (the task
runs eagerly, or in a process that did not inherit it), nothing ever reads as stopping.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

_flag: Any = None


def create_flag(**kwargs: Any) -> None:
    """``worker_init`` receiver (main process, before the pool forks): the shared flag."""
    global _flag
    _flag = multiprocessing.RawValue("b", 0)


def raise_flag(**kwargs: Any) -> None:
    """``worker_shutting_down`` receiver (main process, in its signal handler)."""
    if _flag is not None:
        _flag.value = 1


def worker_shutting_down() -> bool:
    """Whether this process's Celery worker has begun shutting down."""
    return _flag is not None and bool(_flag.value)
