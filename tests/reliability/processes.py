"""Real subprocesses for the reliability suite: Celery workers, poller loops, DB workers.

Each runs in its own session (process group), so a whole Celery worker (master and pool
children) can be ``kill -9``'d with one ``killpg``; :class:`Processes` kills every group it
started at teardown. Logs go to files under the test's ``tmp_path``; :meth:`Proc.log` reads one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.helpers import test_database_url

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "tests.reliability.settings_reliability"

POLLER_LOOP = """
import time, django
django.setup()
from tests.celery_app import app  # noqa: F401  (the Celery app the poller publishes with)
from batchframework.conf import get_settings
from batchframework_celery.poller import poll_once
interval = get_settings().POLL_INTERVAL.total_seconds()
print("poller ready", flush=True)
while True:
    started = time.monotonic()
    try:
        print("tick", poll_once(), flush=True)
    except Exception as exc:  # a tick that fails is retried on the next one
        print("tick failed", repr(exc), flush=True)
    time.sleep(max(0.0, interval - (time.monotonic() - started)))
"""


def reliability_env(broker_url: str, **timings: float) -> dict[str, str]:
    """Environment of a subprocess: test database, private broker, ``BF_*`` timings."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "DATABASE_URL": test_database_url(),
        "CELERY_BROKER_URL": broker_url,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for name, value in timings.items():
        env[f"BF_{name.upper()}"] = str(value)
    return env


@dataclass
class Proc:
    label: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    children: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_log(self, pattern: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log()):
            if not self.alive():
                raise AssertionError(
                    f"{self.label} exited ({self.popen.returncode}):\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.label}: no {pattern!r} within {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)

    def kill_group(self) -> None:
        """``kill -9`` the process and everything in its session."""
        if self.popen.poll() is None or _group_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Processes:
    """Starts subprocesses for one test; :meth:`cleanup` kills every group it started."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.started: list[Proc] = []

    def start(self, label: str, argv: list[str]) -> Proc:
        path = self.directory / f"{len(self.started) + 1:02d}-{label}.log"
        with open(path, "wb") as log:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(label, popen, path)
        self.started.append(proc)
        return proc

    def celery_worker(
        self, name: str, *, concurrency: int = 2, ready: bool = True, args: Sequence[str] = ()
    ) -> Proc:
        proc = self.start(
            f"celery-{name}",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(concurrency),
                "-Q",
                "default,other",
                "-l",
                "info",
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                *args,
            ],
        )
        if ready:
            proc.wait_log(r"\bready\.", timeout=60)
        return proc

    def poller(self, name: str = "poller", *, ready: bool = True) -> Proc:
        proc = self.start(name, [sys.executable, "-c", POLLER_LOOP])
        if ready:
            proc.wait_log("poller ready", timeout=60)
        return proc

    def db_worker(self, name: str, *args: str) -> Proc:
        return self.start(
            f"dbworker-{name}",
            [
                sys.executable,
                "-m",
                "django",
                "batchframework_worker",
                "--name",
                name,
                *args,
            ],
        )

    def logs(self) -> str:
        return "\n".join(f"===== {p.label}\n{p.log()}" for p in self.started)

    def cleanup(self) -> None:
        for proc in self.started:
            proc.kill_group()
