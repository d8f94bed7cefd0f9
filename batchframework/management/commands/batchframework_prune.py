"""``manage.py batchframework_prune``: delete finished operations older than a given age."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import router
from django.db.models import ProtectedError, RestrictedError
from django.utils import timezone

from batchframework.models import BatchOperation

from ..arguments import add_database_argument

#: Older than any datetime Django stores (year 1): a larger age has nothing to delete.
MAX_DAYS = 700_000
#: The most operations deleted per transaction: their ids are held in memory and sent as
#: parameters (a larger number overflowed the database's LIMIT).
MAX_BATCH_SIZE = 1_000_000


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
            "--batch-size", type=int, default=5000, help="Operations deleted per transaction."
        )
        add_database_argument(
            parser, "Database alias to prune (default: where the router writes operations)."
        )
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        # Not ``days < 0``: NaN compares false with everything, and would pass.
        if not 0 <= options["days"] < MAX_DAYS or not 1 <= options["batch_size"] <= MAX_BATCH_SIZE:
            raise CommandError(
                f"--days must be from 0 to {MAX_DAYS} and --batch-size from 1 to {MAX_BATCH_SIZE}"
            )
        cutoff = timezone.now() - timedelta(days=options["days"])
        # The ids are read where they are deleted: ``db_for_read`` may name a lagging replica,
        # whose ids, already deleted on the primary, would come back on every pass.
        database = options["database"] or router.db_for_write(BatchOperation)
        operations = BatchOperation.objects.db_manager(database)
        old = operations.finished().filter(finished_datetime__lt=cutoff)
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
            # With a foreign key to BatchOperation, Django collects the operations to apply
            # its on_delete: only("pk") keeps it from reading their (large) data to do that.
            try:
                _, by_model = operations.filter(pk__in=pks).only("pk").delete()
            except (ProtectedError, RestrictedError) as error:
                raise CommandError(
                    f"{error.args[0]} Deleted {deleted} operation(s) before that."
                ) from error
            # Operations only: rows of other models that cascaded with them are not counted.
            deleted_now = by_model.get(BatchOperation._meta.label, 0)
            if not deleted_now:
                break  # Someone else deleted them first; don't loop on ids that are gone.
            deleted += deleted_now
        self.stdout.write(f"deleted {deleted} operation(s) finished before {cutoff.isoformat()}")
