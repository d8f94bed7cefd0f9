"""App configuration: registers the Celery tasks, the checks, the post-migrate hook, the
relay's start and stop in workers, and the warning for a worker that consumes none of
batchframework's queues."""

from __future__ import annotations

from django.apps import AppConfig


class BatchframeworkCeleryConfig(AppConfig):
    name = "batchframework_celery"
    label = "batchframework_celery"
    verbose_name = "Batch framework: Celery transport"
    default = True

    def ready(self) -> None:
        from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown
        from django.db.models.signals import post_migrate

        from . import checks, tasks  # noqa: F401  (register checks and shared tasks)
        from .beat import register_poller_after_migrate
        from .queues import warn_if_no_queue_is_consumed
        from .relay import start_relay, stop_relay

        post_migrate.connect(
            register_poller_after_migrate, dispatch_uid="batchframework_celery.beat"
        )
        # Only RelayDispatcher wants a relay; start_relay does nothing otherwise.
        worker_ready.connect(start_relay, dispatch_uid="batchframework_celery.relay.start")
        worker_shutdown.connect(stop_relay, dispatch_uid="batchframework_celery.relay.stop")
        celeryd_after_setup.connect(
            warn_if_no_queue_is_consumed, dispatch_uid="batchframework_celery.queues.warn"
        )
