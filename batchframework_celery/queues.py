"""Which Celery queues batchframework publishes to, and a warning for a worker that consumes
none of them.

``celery worker`` without ``-Q`` consumes only Celery's own default queue, ``celery``, while
operations and the poller's tasks go to ``DEFAULT_QUEUE`` (``"default"``): such a worker would
sit idle beside a growing queue, and say nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from batchframework.conf import get_settings
from batchframework.registry import registry
from batchframework.signals import log_event


def batchframework_queues() -> set[str]:
    """``DEFAULT_QUEUE``, every queue ``ROUTES`` names, and every handler's own queue."""
    settings = get_settings()
    return {settings.DEFAULT_QUEUE, *settings.ROUTES.values()} | {
        registered.resolved_queue() for registered in registry
    }


def warn_if_no_queue_is_consumed(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``celeryd_after_setup`` receiver: the worker's queues are known (``-Q`` applied)."""
    if instance is None:
        return
    consumed = set(instance.app.amqp.queues.consume_from)
    ours = batchframework_queues()
    if consumed & ours:
        return
    log_event(
        logging.WARNING,
        "worker_consumes_no_batchframework_queue",
        consumes=",".join(sorted(consumed)),
        batchframework_queues=",".join(sorted(ours)),
        hint="start the worker with -Q " + ",".join(sorted(ours)),
    )
