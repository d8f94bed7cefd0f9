"""``manage.py batchframework_register_poller``: create or update the poller's PeriodicTask."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser

from batchframework.management.arguments import add_database_argument, queue_name


class Command(BaseCommand):
    help = "Create or update the django-celery-beat PeriodicTask that runs batchframework.poll."

    def add_arguments(self, parser: CommandParser) -> None:
        add_database_argument(
            parser, "Database alias (default: the one the router picks for PeriodicTask)."
        )
        parser.add_argument(
            "--queue",
            default=None,
            type=queue_name,
            help="Celery queue for the poll task (default: DEFAULT_QUEUE).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not apps.is_installed("django_celery_beat"):
            raise CommandError(
                "django_celery_beat is not in INSTALLED_APPS. Add it, or use "
                "batchframework_celery.beat.beat_schedule() in Celery's beat_schedule instead."
            )
        from batchframework_celery.beat import register_poller

        task, changed = register_poller(using=options["database"], queue=options["queue"])
        state = "registered/updated" if changed else "already up to date"
        every = task.schedule.run_every.total_seconds()  # ``interval.every`` may be microseconds
        self.stdout.write(f"{task.name}: {state} (every {every:g}s)")
