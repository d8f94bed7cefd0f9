"""Handlers only the reliability subprocesses register (via ``settings_part2``).

The pytest process never imports this module, so no in-process ``run_due`` can ever claim
``poison-exit`` and kill the test runner; tests create such rows with ``create_asynchronous``.
"""

import os
import time

from django.db import connection

from batchframework import handler
from tests.testapp.models import Effect, Execution


@handler("poison-raise", max_attempts=3, retry_backoff=0)
def poison_raise(operation):
    """Always raises; records one Execution per call."""
    Execution.objects.create(key=str(operation.pk))
    raise RuntimeError(
        f"poison operation {operation.pk} always fails (attempt {operation.attempts})"
    )


@handler("poison-exit", max_attempts=3, retry_backoff=0, lease=1)
def poison_exit(operation):
    """Kills the whole worker process (no exception, no cleanup): ``os._exit``."""
    Execution.objects.create(key=str(operation.pk))
    connection.close()
    os._exit(13)


@handler("db-effect", atomic=True, max_attempts=10, retry_backoff=0, lease=2)
def db_effect(operation):
    """Exactly-once effect (its writes commit with the finish); sleeps a little so that
    workers are busy when the database goes away."""
    Execution.objects.create(key=str(operation.pk))
    time.sleep(float((operation.input_data or {}).get("seconds", 0.02)))
    Effect.objects.create(key=f"db-{operation.pk}")
    return {"ok": True}
