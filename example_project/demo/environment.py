"""The demo's environment: short delays, a fresh working folder, and where things run.

``manage.py demo`` prepares this environment and runs the demo in a child process with it, so
the demo's settings (seconds instead of minutes, a fresh SQLite file, file emails) are real
Django settings read from the environment, exactly as the worker and beat processes read them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

from .processes import PROJECT_DIR

#: Seconds from creating (or editing) a post to its email: beyond the dispatch horizon, so the
#: emails reach Celery through the beat-driven poller.
NOTIFICATION_DELAY = 8.0
#: Operations due within this many seconds are published with an ETA when enqueued.
DISPATCH_HORIZON = 5.0
#: The poller's tick.
POLL_INTERVAL = 1.0

#: Set in the prepared child; its presence means "the environment is ready, run the demo".
PREPARED_MARKER = "EXAMPLE_DEMO_PREPARED"


@dataclasses.dataclass(frozen=True)
class DemoEnvironment:
    var_dir: Path
    uses_embedded_database: bool
    uses_embedded_broker: bool
    variables: dict[str, str]


def prepare_environment() -> DemoEnvironment:
    """Choose a fresh folder (``$EXAMPLE_VAR_DIR/demo``, or ``example_project/var/demo``),
    empty it, and return the variables the demo processes run with."""
    base = Path(os.environ.get("EXAMPLE_VAR_DIR") or PROJECT_DIR / "var")
    var_dir = (base / "demo").resolve()
    shutil.rmtree(var_dir, ignore_errors=True)
    var_dir.mkdir(parents=True)
    broker_url = os.environ.get("CELERY_BROKER_URL", "")
    variables = {
        PREPARED_MARKER: "1",
        "EXAMPLE_VAR_DIR": str(var_dir),
        "BLOG_NOTIFICATION_DELAY": str(NOTIFICATION_DELAY),
        "BATCHFRAMEWORK_DISPATCH_HORIZON": str(DISPATCH_HORIZON),
        "BATCHFRAMEWORK_POLL_INTERVAL": str(POLL_INTERVAL),
        "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
        "DJANGO_LOG_LEVEL": os.environ.get("DJANGO_LOG_LEVEL", "INFO"),
    }
    if broker_url.startswith(("redis", "rediss")):
        # Keep this run's queues apart from anything else on the same Redis database.
        variables["CELERY_BROKER_KEY_PREFIX"] = f"exampledemo-{uuid.uuid4().hex[:8]}:"
    return DemoEnvironment(
        var_dir=var_dir,
        uses_embedded_database=not os.environ.get("DATABASE_URL"),
        uses_embedded_broker=not broker_url,
        variables=variables,
    )
