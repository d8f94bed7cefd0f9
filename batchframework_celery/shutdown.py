"""Telling the batches that run in a Celery worker that the worker is shutting down.

Celery's warm shutdown waits for the tasks in hand to return, and a message's task runs a
whole batch: up to ``BATCH_SIZE`` handlers one after another. A deployment's grace period
(Kubernetes: 30 s) may run out first and end in ``SIGKILL``, and the operations the batch had
not started then stay leased until recovery finds them, which also marks them to be claimed
alone from then on. So the worker's main process raises a flag when it is told to stop, and a
batch checks it between handlers: it ends after the handler in hand and gives back the
operations it has not started, unprocessed and without spending an attempt, for the poller's
next drain to hand to a worker that is not stopping. A task that starts once the flag is up
claims nothing.

The flag is raised from the stop signals themselves (``SIGTERM``, ``SIGQUIT``, ``SIGINT``,
``SIGHUP``): Celery's own handler for a cold or soft shutdown first waits out
``worker_soft_shutdown_timeout`` and only then sends ``worker_shutting_down``, which raises it
too (it covers other ways a shutdown starts).

The flag is a byte of shared memory created in the main process before the pool starts its
children (``worker_init``), so prefork children forked from it (Celery's default on Linux) see
it; solo and thread pools run the tasks in the main process itself. Where it was not created
(the task runs eagerly, or in a child started with the ``spawn`` method), nothing ever reads as
stopping, and a batch runs to its end as before.
"""

from __future__ import annotations

import multiprocessing
import signal
from typing import Any

_flag: Any = None

#: The signals that stop a Celery worker (``SIGHUP``: a restart, which stops it first).
STOP_SIGNALS = ("SIGTERM", "SIGQUIT", "SIGINT", "SIGHUP")
#: The names of the ``celery worker`` program's handlers that do stop it (``celery.apps.worker``:
#: warm, cold and soft shutdown, restart). Any other handler of those signals is left alone: a
#: flag raised by a signal that does not stop the worker (Celery's warning that macOS can't
#: restart, a project's own handler) would keep its tasks from claiming anything, for good.
CELERY_STOP_HANDLERS = frozenset({"worker_Warm", "worker_Cold", "restart_worker_sig_handler"})


def create_flag(**kwargs: Any) -> None:
    """``worker_init`` receiver (main process, before the pool forks): the shared flag."""
    global _flag
    _flag = multiprocessing.RawValue("b", 0)


def raise_flag(**kwargs: Any) -> None:
    """``worker_shutting_down`` receiver, and the first thing the stop signals do."""
    if _flag is not None:
        _flag.value = 1


def worker_shutting_down() -> bool:
    """Whether this process's Celery worker has begun shutting down."""
    return _flag is not None and bool(_flag.value)


def raise_flag_on_stop_signals(sender: Any = None, **kwargs: Any) -> None:
    """``worker_ready`` receiver: put :func:`raise_flag` in front of the handlers the
    ``celery worker`` program installed for the stop signals (by then it has), those in
    :data:`CELERY_STOP_HANDLERS` only. Only there: a worker embedded in another program
    (``celery.contrib.testing``) leaves that program's handlers alone."""
    from celery.apps.worker import Worker

    if _flag is None or not isinstance(getattr(sender, "controller", None), Worker):
        return
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is None:
            continue
        previous = signal.getsignal(number)
        if callable(previous) and getattr(previous, "__name__", "") in CELERY_STOP_HANDLERS:
            signal.signal(number, _raising_first(previous))


def _raising_first(previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> Any:
        raise_flag()
        return previous(signum, frame)

    return handler
