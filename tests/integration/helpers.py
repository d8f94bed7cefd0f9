"""Helpers for the engine's integration tests: a recording dispatcher, and real subprocesses
(workers and short scripts) that work on the *test* database pytest-django created.

Every wait here is bounded: subprocesses get a timeout, and DB polls a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from django.db import connection

from batchframework.dispatch import Dispatcher

ROOT = Path(__file__).resolve().parents[2]


class RecordingDispatcher(Dispatcher):
    """Records every dispatch as ``(alias, [pk, ...])``, and the operations it was given;
    dispatches nothing else."""

    calls: ClassVar[list[tuple[str, list[Any]]]] = []
    operations: ClassVar[list[Any]] = []

    def dispatch(self, operations: Sequence[Any], *, using: str) -> None:
        RecordingDispatcher.calls.append((using, [op.pk for op in operations]))
        RecordingDispatcher.operations.extend(operations)


RECORDING_DISPATCHER = f"{__name__}.RecordingDispatcher"


class AnnouncingDispatcher(RecordingDispatcher):
    """Asks ``enqueue`` to announce on :data:`ANNOUNCE_CHANNEL` (PostgreSQL) instead."""

    def notify_channel(self, using: str) -> str | None:
        return ANNOUNCE_CHANNEL


ANNOUNCE_CHANNEL = "batchframework_test_announce"
ANNOUNCING_DISPATCHER = f"{__name__}.AnnouncingDispatcher"


def assert_close(actual: Any, expected: Any, tolerance: timedelta = timedelta(seconds=5)) -> None:
    """``actual`` is a time within ``tolerance`` of ``expected``."""
    assert actual is not None
    assert abs(actual - expected) <= tolerance, f"{actual} is not within {tolerance} of {expected}"


# --- Subprocesses on the test database ------------------------------------------------------
def test_database_url() -> str:
    """A DATABASE_URL for the test database of this process's default connection."""
    settings = connection.settings_dict
    name = settings["NAME"]
    if connection.vendor == "sqlite":
        return f"sqlite:///{name}"
    scheme = {"postgresql": "postgres", "mysql": "mysql"}[connection.vendor]
    original = os.environ.get("DATABASE_URL")
    if original:
        # Keep user, password, host and port exactly as configured; swap the database name.
        return urlsplit(original)._replace(path="/" + quote(name)).geturl()
    auth = quote(settings["USER"] or "")
    if settings.get("PASSWORD"):
        auth += ":" + quote(settings["PASSWORD"])
    host = settings.get("HOST") or "127.0.0.1"
    port = f":{settings['PORT']}" if settings.get("PORT") else ""
    return f"{scheme}://{auth}@{host}{port}/{quote(name)}"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["DATABASE_URL"] = test_database_url()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PRELUDE = "import django\ndjango.setup()\n"


def run_python(code: str, *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (after ``django.setup()``) in a fresh interpreter; fail on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def start_python(code: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``code`` (after ``django.setup()``) in a fresh interpreter, output to ``log_path``."""
    # The child keeps its own copy of the file descriptor; ours can close at once.
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def start_worker(*args: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m django batchframework_worker *args`` on the test database."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "django", "batchframework_worker", *args],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_exit(
    process: subprocess.Popen[bytes], *, timeout: float, log_path: Path | None = None
) -> int:
    """Wait for ``process`` to exit, at most ``timeout`` seconds; return its exit code."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        log = log_path.read_text(errors="replace") if log_path else ""
        raise AssertionError(
            f"process {process.pid} did not exit within {timeout}s\n{log}"
        ) from None


class ProcessReaper:
    """Keeps the processes a test started and kills the ones still alive at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def log_path(self, label: str) -> Path:
        self._count += 1
        return self.directory / f"{self._count:02d}-{label}.log"

    def worker(self, *args: str, label: str = "worker") -> tuple[subprocess.Popen[bytes], Path]:
        path = self.log_path(label)
        process = start_worker(*args, log_path=path)
        self.processes.append(process)
        return process, path

    def python(self, code: str, *, label: str = "script") -> tuple[subprocess.Popen[bytes], Path]:
        path = self.log_path(label)
        process = start_python(code, path)
        self.processes.append(process)
        return process, path

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


class ExplodingDispatcher(Dispatcher):
    """A dispatcher whose broker is down: every dispatch raises."""

    def dispatch(self, operations: Sequence[Any], *, using: str) -> None:
        raise ConnectionError("broker down")


EXPLODING_DISPATCHER = f"{__name__}.ExplodingDispatcher"
