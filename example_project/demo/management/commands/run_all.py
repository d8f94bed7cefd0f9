"""``manage.py run_all``: the development server, a Celery worker and celery beat, together.

For local development: migrates, registers the beat poller, then runs ``runserver``, ``celery
worker`` and ``celery beat`` as child processes sharing this terminal, until Ctrl-C (or until
one of them exits), and then stops all three.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from demo.processes import (
    ChildProcess,
    celery_beat_command,
    celery_worker_command,
    child_environment,
    runserver_command,
)


class Command(BaseCommand):
    help = (
        "Run runserver, a Celery worker and celery beat for local development (Ctrl-C stops all)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("addrport", nargs="?", default="127.0.0.1:8000")

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", interactive=False, verbosity=1)
        call_command("batchframework_register_poller", stdout=self.stdout)
        env = child_environment()
        children = [
            ChildProcess("worker", celery_worker_command(name="dev-worker"), env=env),
            ChildProcess("beat", celery_beat_command(settings.VAR_DIR / "beat.pid"), env=env),
            # No autoreloader: it would restart only the web process, not the worker.
            ChildProcess("web", [*runserver_command(options["addrport"]), "--noreload"], env=env),
        ]
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            for child in children:
                child.start()
            self.stdout.write(
                f"Running on http://{options['addrport']}/ — Ctrl-C stops web, worker and beat."
            )
            while all(child.running() for child in children):
                time.sleep(0.5)
            exited = [child.name for child in children if not child.running()]
            self.stderr.write(f"{', '.join(exited)} exited; stopping the others.")
        except KeyboardInterrupt:
            self.stdout.write("\nStopping…")
        finally:
            for child in reversed(children):
                code = child.stop()
                self.stdout.write(f"Stopped {child.name} (exit code {code}).")


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
