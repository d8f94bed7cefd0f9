"""App configuration: registers the Celery tasks, the checks, and the post-migrate hook."""

from __future__ import annotations

from django.apps import AppConfig


class BatchframeworkCeleryConfig(AppConfig):
    name = "batchframework_celery"
    label = "batchframework_celery"
    verbose_name = "Batch framework: Celery transport"
    default = True

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from . import checks, tasks  # noqa: F401  (register checks and shared tasks)
        from .beat import register_poller_after_migrate

        post_migrate.connect(
            register_poller_after_migrate, dispatch_uid="batchframework_celery.beat"
        )
