"""Child processes of the demo and of ``run_all``: a real Celery worker, celery beat, runserver.

Each child runs in its own session (process group), so that stopping it also stops the
processes it forked (the worker's pool, runserver's reloader) and so that a Ctrl-C in the
terminal reaches only the parent, which then stops the children in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

PROJECT_DIR = Path(__file__).resolve().parent.parent
REPOSITORY_ROOT = PROJECT_DIR.parent
BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with the project importable from the child's working
    directory (the children run ``celery -A exampleproject`` from ``example_project/``)."""
    env = {**os.environ, **(extra or {})}
    paths = [str(PROJECT_DIR), str(REPOSITORY_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def celery_worker_command(*, concurrency: int = 2, name: str = "example") -> list[str]:
    # Mingle and gossip talk to other workers at start-up (a 1 s wait each); one local worker
    # has nobody to talk to.
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "exampleproject",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--queues",
        "default",
        "--hostname",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
    ]


def celery_beat_command(pidfile: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "exampleproject",
        "beat",
        "--loglevel",
        "INFO",
        "--scheduler",
        BEAT_SCHEDULER,
        "--pidfile",
        str(pidfile),
        # Look at the schedule every second: the poller runs every POLL_INTERVAL seconds.
        "--max-interval",
        "1",
    ]


def runserver_command(address: str) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "manage.py"), "runserver", address]


class ChildProcess:
    """One child process whose output goes to a log file (or to our terminal)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: dict[str, str],
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ChildProcess:
        output: IO[bytes] | None = None
        if self.log_path is not None:
            self._log = output = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.command,
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, marker: str, timeout: float) -> bool:
        """Wait until ``marker`` appears in the log; ``False`` on timeout or if the child died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_text():
                return True
            if not self.running():
                return False
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the child (a warm shutdown for Celery: it stops its own pool), wait up to
        ``timeout`` seconds, then SIGKILL its whole process group. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(5)
        # Processes the child forked and left behind (e.g. a killed worker's pool) go too.
        self._signal_group(signal.SIGKILL)
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
