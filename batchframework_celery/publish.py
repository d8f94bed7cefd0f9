"""Publishing messages to Celery, bounded in time and never raising into the caller.

Celery retries a failed publish by default, which can block a web request for seconds while
the broker is down. Here every publish is made with ``retry=False``; the first connection
failure stops the rest of the round (the poller will find those operations), so a dead broker
costs the caller at most one failed connection attempt.

``retry=False`` alone is not enough: kombu connects a producer's connection with its own retry
loop (sleeping 2 s, 4 s, ... until ``broker_connection_timeout``, 4 s by default), whatever the
publish's ``retry`` says. So the connection is established here first, with one immediate retry
(for a stale pooled connection) and a deadline of ``PUBLISH_TIMEOUT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from celery import Task
from kombu.exceptions import KombuError, OperationalError

from batchframework.conf import get_settings
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
        options: dict[str, Any] = {"queue": queue, "eta": eta, "retry": False}
        try:
            if task.app.conf.task_always_eager:  # runs locally: no broker to connect to
                task.apply_async(args=tuple(args), kwargs=kwargs or {}, **options)
            else:
                with task.app.producer_or_acquire() as producer:
                    _connect(producer.connection)
                    options["producer"] = producer
                    task.apply_async(args=tuple(args), kwargs=kwargs or {}, **options)
        except BROKER_DOWN_ERRORS as exc:
            self.broker_down = True
            self.failed += 1
            log_event(logging.WARNING, "publish_failed", task=task.name, queue=queue,
                      error=repr(exc), fallback="poller")
            return False
        self.published += 1
        return True


def _connect(connection: Any) -> None:
    """Make sure ``connection`` is up: one attempt and one immediate retry, within
    ``PUBLISH_TIMEOUT``, instead of kombu's default retry loop with sleeps."""
    connection.ensure_connection(
        max_retries=1, interval_start=0, interval_step=0, interval_max=0,
        timeout=get_settings().PUBLISH_TIMEOUT.total_seconds(),
    )
