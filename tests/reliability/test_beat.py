"""Scenario 8: two celery beats, and a beat killed with ``kill -9`` and restarted → no operation
runs twice, none is lost.

Real subprocesses on a private Redis: a prefork ``celery worker`` and ``celery beat`` with
django-celery-beat's ``DatabaseScheduler``; the poller's ``PeriodicTask`` is registered with
``manage.py batchframework_register_poller``. Half of the operations are enqueued with the
Celery dispatcher (a message with an ETA races the pollers' drains), half without any message
(only a poller can find them). ``test-effect`` writes a unique Effect row per operation and an
Execution row per call, so a double run shows either as two Executions or as a failure.
"""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.test import override_settings

from batchframework import BatchOperation, enqueue
from tests.celery.helpers import use_broker
from tests.celery_app import app as celery_app
from tests.testapp.models import Execution

from .pg_private import Processes, private_redis, register_poller, subprocess_env, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

POLL_SENT = "Sending due task batchframework: poll for due operations"


@contextlib.contextmanager
def _celery_dispatch(url: str):
    with (
        use_broker(celery_app, url),
        override_settings(
            BATCHFRAMEWORK={
                **settings.BATCHFRAMEWORK,
                "DISPATCHER": "batchframework_celery.dispatcher.CeleryDispatcher",
            }
        ),
    ):
        yield


def _enqueue_mix(url: str, count: int, spread: float) -> list[int]:
    """``count`` operations due over ``spread`` seconds from now; every other one published."""
    ids: list[int] = []
    for i in range(count):
        delay = timedelta(seconds=spread * i / count)
        if i % 2:
            with _celery_dispatch(url):
                ids.append(enqueue("test-effect", delay=delay).pk)
        else:
            ids.append(enqueue("test-effect", delay=delay).pk)
    return ids


def _outcome(ids: list[int]) -> dict[str, int]:
    runs: dict[int, int] = {pk: 0 for pk in ids}
    for key in Execution.objects.filter(key__in=[str(pk) for pk in ids]).values_list(
        "key", flat=True
    ):
        runs[int(key)] += 1
    ops = BatchOperation.objects.filter(pk__in=ids)
    early = [
        op.pk
        for op in ops
        if op.started_running_datetime and op.started_running_datetime < op.run_after
    ]
    return {
        "runs": sum(runs.values()),
        "duplicates": sum(1 for n in runs.values() if n > 1),
        "lost": len(ids) - ops.successful().count(),
        "early": len(early),
    }


def _all_finished(ids: list[int]):
    return lambda: BatchOperation.objects.filter(pk__in=ids).finished().count() == len(ids)


@pytest.mark.timeout(90)
def test_two_beats_with_the_database_scheduler(tmp_path, reliability_report):
    started = time.monotonic()
    with private_redis(tmp_path) as redis_server:
        processes = Processes(
            tmp_path,
            subprocess_env(
                CELERY_BROKER_URL=redis_server.url, BF_DISPATCHER="celery", BF_POLL_INTERVAL="1"
            ),
        )
        try:
            register_poller(processes)
            again = register_poller(processes)
            assert "already up to date" in again
            worker = processes.celery_worker()
            beats = [processes.celery_beat("beat-a"), processes.celery_beat("beat-b")]
            ids = _enqueue_mix(redis_server.url, 60, spread=8.0)
            wait_until(
                _all_finished(ids), timeout=60, interval=0.2, what="all operations to finish"
            )
            time.sleep(2)  # two more ticks of both beats: nothing runs again
            outcome = _outcome(ids)
            beat_logs = [processes.log_of(beat) for beat in beats]
            reliability_report(
                8, operations=len(ids), seconds=time.monotonic() - started, beats=2, **outcome
            )
            assert all(log.count(POLL_SENT) >= 2 for log in beat_logs), processes.logs("beat")[
                -4000:
            ]
            assert worker.poll() is None and all(beat.poll() is None for beat in beats)
            assert outcome == {"runs": len(ids), "duplicates": 0, "lost": 0, "early": 0}, outcome
        finally:
            processes.cleanup()


@pytest.mark.timeout(90)
def test_beat_killed_and_restarted(tmp_path, reliability_report):
    started = time.monotonic()
    with private_redis(tmp_path) as redis_server:
        processes = Processes(
            tmp_path,
            subprocess_env(
                CELERY_BROKER_URL=redis_server.url, BF_DISPATCHER="celery", BF_POLL_INTERVAL="1"
            ),
        )
        try:
            register_poller(processes)
            worker = processes.celery_worker()
            beat = processes.celery_beat("beat-1")
            wait_until(
                lambda: POLL_SENT in processes.log_of(beat), timeout=30, what="the first tick"
            )
            ids = _enqueue_mix(redis_server.url, 40, spread=8.0)
            time.sleep(2.5)
            Processes.kill(beat)  # kill -9 of the whole beat process group
            killed_at = time.monotonic()
            time.sleep(3.0)
            # Operations that came due while no beat ran, and had no message, are still waiting.
            unpublished_waiting = BatchOperation.objects.filter(pk__in=ids[0::2]).due().count()
            beat = processes.celery_beat("beat-2")
            wait_until(
                _all_finished(ids), timeout=60, interval=0.2, what="all operations to finish"
            )
            time.sleep(2)
            outcome = _outcome(ids)
            reliability_report(
                8,
                operations=len(ids),
                seconds=time.monotonic() - started,
                case="beat-kill-9",
                waited_for_restart=unpublished_waiting,
                downtime=f"{time.monotonic() - killed_at:.0f}s",
                **outcome,
            )
            assert worker.poll() is None and beat.poll() is None, processes.logs()[-4000:]
            assert outcome == {"runs": len(ids), "duplicates": 0, "lost": 0, "early": 0}, outcome
        finally:
            processes.cleanup()
