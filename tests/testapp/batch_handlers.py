"""Handlers used by the tests; discovered like a user's ``batch_handlers`` module."""

import os
import time

from django.db import connection

from batchframework import handler

from .models import Effect, Execution


@handler("test-noop")
def noop(operation):
    return None


@handler("test-echo")
def echo(operation):
    return {"echo": operation.input_data}


@handler("test-effect")
def effect(operation):
    """Records one Execution per call and one Effect per operation (unique)."""
    Execution.objects.create(key=str(operation.pk))
    Effect.objects.create(key=str(operation.pk))
    return {"ok": True}


@handler("test-always-fails", max_attempts=3, retry_backoff=0)
def always_fails(operation):
    Execution.objects.create(key=str(operation.pk))
    raise ValueError(f"boom {operation.pk}")


def fails_once(operation):
    Execution.objects.create(key=str(operation.pk))
    if operation.attempts == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt": operation.attempts}


handler("test-fails-once", max_attempts=2, retry_backoff=60)(fails_once)
# The same, with a back-off (1 s) shorter than the poller's look-ahead.
handler("test-fails-once-soon", max_attempts=2, retry_backoff=1)(fails_once)


@handler("test-atomic", atomic=True, max_attempts=3, retry_backoff=0)
def atomic_effect(operation):
    """Writes an effect, then optionally crashes; the write commits only with the finish."""
    Effect.objects.create(key=f"atomic-{operation.pk}")
    crash = (operation.input_data or {}).get("crash_on_attempt")
    if crash == operation.attempts:
        if (operation.input_data or {}).get("hard"):
            connection.close()
            os._exit(17)
        raise RuntimeError("simulated crash inside an atomic handler")
    return {"attempt": operation.attempts}


@handler("test-sleep", lease=2, max_attempts=3, retry_backoff=0)
def sleeper(operation):
    """Sleeps ``seconds``; writes an Execution row first so tests see it started, and an
    Effect row after the sleep unless ``no_effect``."""
    Execution.objects.create(key=str(operation.pk))
    data = operation.input_data or {}
    seconds = data.get("seconds", 1)
    if data.get("progress"):
        steps = int(seconds / 0.5)
        for step in range(steps):
            time.sleep(0.5)
            operation.set_progress(step + 1, steps)
    else:
        time.sleep(seconds)
    if not data.get("no_effect"):  # (to leave the database alone after the sleep)
        Effect.objects.create(key=f"sleep-{operation.pk}-{operation.attempts}")
    return {"slept": seconds}


@handler("test-bad-output")
def bad_output(operation):
    return {"when": object()}


@handler("test-other-queue", queue="other")
def other_queue(operation):
    return "other"
