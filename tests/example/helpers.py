"""Running the example project as a subprocess: it has its own settings, which can't be loaded
into the test suite's process (that runs under ``tests.settings``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
MANAGE_PY = REPOSITORY_ROOT / "example_project" / "manage.py"
#: Variables of the main suite that must not leak into the example project's settings.
SUITE_VARIABLES = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "DJANGO_SETTINGS_MODULE",
    "EXAMPLE_DEMO_PREPARED",
)


def example_environment(var_dir: Path, **variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SUITE_VARIABLES}
    env.update(EXAMPLE_VAR_DIR=str(var_dir), DJANGO_LOG_LEVEL="WARNING", **variables)
    return env


def run_manage(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python example_project/manage.py *args`` from the repository root, as ``make`` runs it."""
    return subprocess.run(
        [sys.executable, str(MANAGE_PY), *args],
        cwd=REPOSITORY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def server_answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2
        ):
            return True
    except OSError:
        return False


def require_server(url: str, default_port: int) -> None:
    """Skip when a server is not there, except in CI, where that is a failure."""
    if server_answers(url, default_port):
        return
    message = f"{url} does not answer"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI: server tests must not skip)")
    pytest.skip(message)
