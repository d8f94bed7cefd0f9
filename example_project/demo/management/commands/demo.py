"""``manage.py demo``: the whole product at work in about half a minute, then checked.

It migrates a fresh database, registers the beat poller, starts a real Celery worker and a
real celery beat (django-celery-beat's DatabaseScheduler) as child processes, runs the
scenario of :mod:`demo.scenario` through the project's views while printing live progress,
stops the children, prints a summary table and checks what happened. Exit status 0 only if
every check passed.

With nothing configured it needs no server: SQLite and kombu's filesystem broker, in a fresh
``var/demo/`` folder. With ``DATABASE_URL`` and ``CELERY_BROKER_URL`` set it runs on them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, OutputWrapper

from demo.environment import PREPARED_MARKER, prepare_environment
from demo.processes import (
    PROJECT_DIR,
    ChildProcess,
    celery_beat_command,
    celery_worker_command,
    child_environment,
    tail,
)

#: Longest wait for the worker and beat to start (a cold start on a slow machine).
STARTUP_TIMEOUT = 60.0
POLL_TASK_LOG_MARKER = "(batchframework.poll)"


class Command(BaseCommand):
    help = "Run the example project's demo: real Celery worker and beat, live progress, checks."

    def handle(self, *args: Any, **options: Any) -> None:
        if os.environ.get(PREPARED_MARKER):
            sys.exit(DemoRunner(self.stdout).run())
        environment = prepare_environment()
        self.stdout.write(f"Demo folder: {environment.var_dir}")
        command = [sys.executable, str(PROJECT_DIR / "manage.py"), "demo"]
        try:
            result = subprocess.run(
                command, env={**os.environ, **environment.variables}, check=False
            )
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(result.returncode)


def forget_broker_keys() -> None:
    """On Redis, delete this run's keys (all under its own prefix); nothing else is touched."""
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("global_keyprefix")
    if not prefix:
        return
    import redis

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


class DemoRunner:
    """The demo itself, run inside the prepared environment."""

    def __init__(self, stdout: OutputWrapper) -> None:
        self.stdout = stdout
        self.var_dir = Path(settings.VAR_DIR)

    def say(self, text: str = "") -> None:
        self.stdout.write(text)

    def run(self) -> int:
        from demo.report import run_checks, summary_table
        from demo.scenario import Scenario

        started = time.monotonic()
        # The worker and beat log every event to their files; here, only trouble.
        logging.getLogger("batchframework").setLevel(logging.WARNING)
        # The 404s the checks provoke on purpose are not news.
        logging.getLogger("django.request").setLevel(logging.ERROR)
        database = settings.DATABASES["default"]
        self.say(f"Database: {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}")
        self.say(f"Broker:   {settings.CELERY_BROKER_URL}")
        self.say(
            f"Settings: BLOG_NOTIFICATION_DELAY={settings.BLOG_NOTIFICATION_DELAY:g}s, "
            f"DISPATCH_HORIZON={settings.BATCHFRAMEWORK['DISPATCH_HORIZON']:g}s, "
            f"POLL_INTERVAL={settings.BATCHFRAMEWORK['POLL_INTERVAL']:g}s"
        )
        call_command("migrate", interactive=False, verbosity=0)
        call_command("batchframework_register_poller", stdout=self.stdout)
        env = child_environment()
        worker = ChildProcess(
            "worker",
            celery_worker_command(name="demo-worker"),
            env=env,
            log_path=self.var_dir / "worker.log",
        )
        beat = ChildProcess(
            "beat",
            celery_beat_command(self.var_dir / "beat.pid"),
            env=env,
            log_path=self.var_dir / "beat.log",
        )
        try:
            worker.start()
            beat.start()
            self.say(
                f"Started celery worker (pid {worker.pid}) and celery beat (pid {beat.pid}); "
                f"logs in {self.var_dir}"
            )
            if not (
                worker.wait_for_output(" ready.", STARTUP_TIMEOUT)
                and beat.wait_for_output("beat: Starting", STARTUP_TIMEOUT)
            ):
                self.say("FAILED: the worker or beat did not start.")
                self.show_logs(worker, beat)
                return 1
            self.say(f"Worker and beat are up after {time.monotonic() - started:.1f}s.\n")
            run = Scenario(self.say).run()
        finally:
            # Beat first, so it publishes nothing the stopped worker would leave behind. Stop
            # both before reporting anything: a closed terminal must not leave them running.
            codes = {child.name: child.stop() for child in (beat, worker)}
        self.say(f"Stopped beat and worker (exit codes {codes['beat']}, {codes['worker']}).")
        forget_broker_keys()
        poll_ticks = beat.log_text().count(POLL_TASK_LOG_MARKER)

        self.say(
            f"\nOperations (times after the scenario started at {run.started_at:%H:%M:%S} UTC; "
            "late = started - due):\n"
        )
        self.say(summary_table(run))
        checks = run_checks(run, poll_ticks=poll_ticks)
        self.say("\nChecks:")
        for check in checks:
            mark = "ok  " if check.passed else "FAIL"
            self.say(
                f"  {mark} {check.description}" + (f"  ({check.detail})" if check.detail else "")
            )
        failed = [check for check in checks if not check.passed]
        elapsed = time.monotonic() - started
        if failed:
            self.say(
                f"\nDEMO FAILED: {len(failed)} of {len(checks)} checks failed ({elapsed:.1f}s)."
            )
            self.show_logs(worker, beat)
            return 1
        self.say(f"\nDemo passed: all {len(checks)} checks ({elapsed:.1f}s).")
        return 0

    def show_logs(self, *children: ChildProcess) -> None:
        for child in children:
            self.say(f"\n--- last lines of the {child.name} log ({child.log_path}) ---")
            self.say(tail(child.log_text()))
