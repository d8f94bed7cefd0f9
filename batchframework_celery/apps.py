"""App configuration: registers the Celery tasks, the checks, the post-migrate hook, the
relay's start and stop in workers, the shutdown flag batches check, and the warning for a
worker that consumes none of batchframework's queues."""

from __future__ import annotations

from django.apps import AppConfig


class BatchframeworkCeleryConfig(AppConfig):
    name = "batchframework_celery"
    label = "batchframework_celery"
    verbose_name = "Batch framework: Celery transport"
    default = True

    def ready(self) -> None:
        from celery.signals import (
            celeryd_after_setup,
            worker_init,
            worker_ready,
            worker_shutdown,
            worker_shutting_down,
        )
        from django.db.models.signals import post_migrate

        from . import checks, tasks  # noqa: F401  (register checks and shared tasks)
        from .beat import register_poller_after_migrate
        from .queues import warn_if_no_queue_is_consumed
        from .relay import start_relay, stop_relay
        from .shutdown import create_flag, raise_flag, raise_flag_on_stop_signals

        post_migrate.connect(
            register_poller_after_migrate, dispatch_uid="batchframework_celery.beat"
        )
        # Only RelayDispatcher wants a relay; start_relay does nothing otherwise.
        worker_ready.connect(start_relay, dispatch_uid="batchframework_celery.relay.start")
        worker_shutdown.connect(stop_relay, dispatch_uid="batchframework_celery.relay.stop")
        # Batches end after the handler in hand once their worker begins to shut down.
        worker_init.connect(create_flag, dispatch_uid="batchframework_celery.shutdown.create")
        worker_shutting_down.connect(
            raise_flag, dispatch_uid="batchframework_celery.shutdown.raise"
        )
        # Sent after the ``celery worker`` program installed its signal handlers.
        worker_ready.connect(
            raise_flag_on_stop_signals, dispatch_uid="batchframework_celery.shutdown.signals"
        )
        celeryd_after_setup.connect(
            warn_if_no_queue_is_consumed, dispatch_uid="batchframework_celery.queues.warn"
        )
