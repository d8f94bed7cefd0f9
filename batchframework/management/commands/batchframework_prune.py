"""``manage.py batchframework_prune``: delete finished operations older than a given age."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from batchframework.models import BatchOperation


class Command(BaseCommand):
    help = "Delete finished batch operations that finished more than --days days ago."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=float,
            required=True,
            help="Age, in days, of the finished operations to delete.",
        )
        parser.add_argument(
            "--failed-too",
            action="store_true",
            help="Also delete failed operations (kept by default).",
        )
        parser.add_argument(
            "--batch-size", type=int, default=5000, help="Rows deleted per statement."
        )
        parser.add_argument("--database", default=None)
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["days"] < 0 or options["batch_size"] < 1:
            raise CommandError("--days must be >= 0 and --batch-size >= 1")
        cutoff = timezone.now() - timedelta(days=options["days"])
        old = (
            BatchOperation.objects.db_manager(options["database"])
            .finished()
            .filter(finished_datetime__lt=cutoff)
        )
        if not options["failed_too"]:
            old = old.exclude(result=BatchOperation.RESULT_FAILED)
        if options["dry_run"]:
            self.stdout.write(f"would delete {old.count()} operation(s)")
            return
        deleted = 0
        while True:
            pks = list(
                old.order_by("finished_datetime").values_list("pk", flat=True)[
                    : options["batch_size"]
                ]
            )
            if not pks:
                break
            deleted += (
                BatchOperation.objects.db_manager(options["database"])
                .filter(pk__in=pks)
                .delete()[0]
            )
        self.stdout.write(f"deleted {deleted} row(s) finished before {cutoff.isoformat()}")
