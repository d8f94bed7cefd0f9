"""``manage.py batchframework_fail_abandoned``: finish as failed the synchronous operations that
have run, unclaimed, for longer than a given age (their process presumably died)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import router
from django.utils import timezone

from batchframework.engine import fail_abandoned
from batchframework.models import BatchOperation

from ..arguments import add_database_argument

#: Older than any datetime Django stores (year 1): a larger age finds nothing.
MAX_HOURS = 700_000 * 24


class Command(BaseCommand):
    help = (
        "Finish as failed the running operations that no worker claimed (synchronous ones, the "
        "manual flow) and that started more than --hours hours ago: nothing else recovers them "
        "when their process dies."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--hours",
            type=float,
            required=True,
            help="How long an operation must have been running to count as abandoned. Longer "
            "than your longest synchronous block.",
        )
        add_database_argument(
            parser, "Database alias to look in (default: where the router writes operations)."
        )
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        hours = options["hours"]
        # Not ``hours < 0``: NaN compares false with everything, and would pass.
        if not 0 <= hours < MAX_HOURS:
            raise CommandError(f"--hours must be from 0 to {MAX_HOURS}")
        cutoff = timezone.now() - timedelta(hours=hours)
        database = options["database"] or router.db_for_write(BatchOperation)
        # A running operation always has a start time (a check constraint says so).
        stale = (
            BatchOperation.objects.db_manager(database)
            .running_unclaimed()
            .filter(started_running_datetime__lt=cutoff)
        )
        if options["dry_run"]:
            self.stdout.write(f"would mark {stale.count()} operation(s) abandoned")
            return
        marked = fail_abandoned(
            stale,
            reason=f"Marked abandoned by batchframework_fail_abandoned: running, unclaimed, "
            f"for more than {hours:g} hours.",
        )
        self.stdout.write(
            f"marked {marked} operation(s) abandoned (running since before {cutoff.isoformat()})"
        )
