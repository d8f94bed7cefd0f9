"""``manage.py batchframework_worker``: run operations from the database, without Celery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from batchframework.conf import MAX_BATCH_SIZE, MAX_POLL_INTERVAL
from batchframework.worker import DATABASE_ERRORS, Worker

from ..arguments import add_database_argument, queue_name


class Command(BaseCommand):
    help = (
        "Run due batch operations from the database (no broker needed). Stops gracefully on "
        "SIGTERM/SIGINT/SIGHUP after the operation in hand; a second signal stops at once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--queue",
            action="append",
            dest="queues",
            metavar="QUEUE",
            type=queue_name,
            help="Only take operations from this queue (repeatable).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help=f"Operations claimed per statement, 1 to {MAX_BATCH_SIZE} (default: BATCH_SIZE).",
        )
        parser.add_argument(
            "--max-operations",
            type=int,
            default=None,
            help="Exit after this many runs (attempts) of operations.",
        )
        parser.add_argument("--once", action="store_true", help="Run what is due now, then exit.")
        parser.add_argument(
            "--poll-interval",
            type=float,
            default=None,
            help="Seconds between polls when idle (default: POLL_INTERVAL).",
        )
        parser.add_argument("--name", default=None, help="Worker name shown in claimed_by.")
        add_database_argument(parser, "Database alias to work on (default: the router's).")

    def handle(self, *args: Any, **options: Any) -> None:
        for option in ("batch_size", "max_operations"):
            if options[option] is not None and options[option] < 1:
                self.stderr.write(f"--{option.replace('_', '-')} must be at least 1")
                raise SystemExit(2)
        if options["batch_size"] is not None and options["batch_size"] > MAX_BATCH_SIZE:
            self.stderr.write(f"--batch-size must be at most {MAX_BATCH_SIZE}")
            raise SystemExit(2)
        poll_interval = options["poll_interval"]
        longest = MAX_POLL_INTERVAL.total_seconds()
        # Also refused: what rounds to no time at all (1e-300 s is timedelta(0)).
        if poll_interval is not None and not (
            0 < poll_interval <= longest and timedelta(seconds=poll_interval)
        ):
            self.stderr.write(
                f"--poll-interval must be a positive number of seconds, at most {longest:.0f}"
            )
            raise SystemExit(2)
        worker = Worker(
            queues=options["queues"],
            batch_size=options["batch_size"],
            max_operations=options["max_operations"],
            once=options["once"],
            poll_interval=None if poll_interval is None else timedelta(seconds=poll_interval),
            name=options["name"],
            using=options["database"],
            log=lambda message: self.stdout.write(message),
        )
        worker.install_signal_handlers()
        try:
            worker.run()
        except DATABASE_ERRORS as exc:  # only with --once: a loop retries
            raise CommandError(f"database error: {exc}") from exc
