"""Publishing messages to Celery, bounded in time and never raising into the caller.

Celery retries a failed publish by default, which can block a web request for seconds while
the broker is down. Here every publish is made with ``retry=False``; the first connection
failure stops the rest of the round (the poller will find those operations), so a dead broker
costs the caller at most one failed connection attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from celery import Task
from kombu.exceptions import KombuError, OperationalError

from batchframework.signals import log_event

# Errors that mean "the broker can't be reached now": stop publishing this round.
BROKER_DOWN_ERRORS: tuple[type[BaseException], ...] = (OperationalError, KombuError, OSError, TimeoutError)


class Publisher:
    """Publishes a round of messages; after the first broker failure it publishes no more."""

    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.broker_down = False

    def publish(
        self, task: Task, args: Iterable[Any], *, queue: str, eta: datetime | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> bool:
        if self.broker_down:
            self.failed += 1
            return False
        try:
            task.apply_async(args=tuple(args), kwargs=kwargs or {}, queue=queue, eta=eta, retry=False)
        except BROKER_DOWN_ERRORS as exc:
            self.broker_down = True
            self.failed += 1
            log_event(logging.WARNING, "publish_failed", task=task.name, queue=queue,
                      error=repr(exc), fallback="poller")
            return False
        self.published += 1
        return True
