"""End to end with real processes: ``celery worker`` and ``celery beat`` (django-celery-beat's
``DatabaseScheduler``, the poller registered by ``manage.py batchframework_register_poller``)
run a mix of immediate, delayed and far-future operations, then shut down cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import override_settings
from django_celery_beat.models import PeriodicTask

from batchframework import enqueue
from batchframework_celery.beat import PERIODIC_TASK_NAME
from batchframework_celery.tasks import POLL_TASK

from .conftest import CELERY_DISPATCHER
from .helpers import (
    all_finished,
    assert_never_early,
    assert_ran_once_each,
    subprocess_env,
    wait_for,
)

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
HORIZON, POLL_INTERVAL = 3, 1


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, then wait; ``None`` if it did not exit in time (then it is killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def test_worker_and_beat_subprocesses_run_a_mix_end_to_end(celery_dispatch, tmp_path):
    broker = celery_dispatch
    env = subprocess_env(
        CELERY_BROKER_URL=broker.url,
        BF_POLL_INTERVAL=str(POLL_INTERVAL),
        BF_DISPATCH_HORIZON=str(HORIZON),
    )
    registered = subprocess.run(
        [sys.executable, "-m", "django", "batchframework_register_poller"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert registered.returncode == 0, registered.stderr
    assert PERIODIC_TASK_NAME in registered.stdout
    task = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    # On the queue the workers consume (not Celery's "celery" queue, which -Q default,… skips).
    assert (task.task, task.interval.every, task.enabled, task.queue) == (
        POLL_TASK,
        POLL_INTERVAL,
        True,
        "default",
    )

    worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            start(
                [
                    "celery",
                    "-A",
                    "tests.celery_app",
                    "worker",
                    "-l",
                    "info",
                    "-P",
                    "solo",
                    "-Q",
                    "default,other",
                    "-n",
                    f"bf-{uuid.uuid4().hex[:8]}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                ],
                worker_log,
                env,
            )
        )
        procs.append(
            start(
                [
                    "celery",
                    "-A",
                    "tests.celery_app",
                    "beat",
                    "-l",
                    "info",
                    "-S",
                    "django_celery_beat.schedulers:DatabaseScheduler",
                    "--max-interval",
                    "1",
                    "--pidfile",
                    str(tmp_path / "beat.pid"),
                    "-s",
                    str(tmp_path / "beat-schedule"),
                ],
                beat_log,
                env,
            )
        )
        assert wait_for(lambda: b" ready." in worker_log.read_bytes(), timeout=30), (
            worker_log.read_text()
        )

        with override_settings(BATCHFRAMEWORK={**CELERY_DISPATCHER, "DISPATCH_HORIZON": HORIZON}):
            immediate = [enqueue("test-effect").pk for _ in range(5)]
            other_queue = [enqueue("test-other-queue").pk for _ in range(2)]
            delayed = [
                enqueue("test-effect", delay=timedelta(seconds=2)).pk for _ in range(5)
            ]  # ETA messages
            far = [
                enqueue("test-effect", delay=timedelta(seconds=HORIZON + 2)).pk for _ in range(5)
            ]  # the poller's
        ids = [*immediate, *other_queue, *delayed, *far]
        assert wait_for(all_finished(ids), timeout=30, interval=0.2), (
            worker_log.read_text()[-3000:],
            beat_log.read_text()[-5000:],
        )
        assert_ran_once_each([*immediate, *delayed, *far])
        assert_never_early(delayed, late_by=1.5)
        # Handed to the worker by beat's poller with an ETA before they came due.
        assert_never_early(far, late_by=1.5)
        assert POLL_TASK.encode() in worker_log.read_bytes()

        codes = [stop(proc, timeout=20) for proc in procs]
        assert codes == [0, 0], (
            codes,
            worker_log.read_text()[-3000:],
            beat_log.read_text()[-3000:],
        )
        assert b"warm shutdown" in worker_log.read_bytes().lower()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize(("queues", "warned"), [("celery", True), ("celery,other", False)])
def test_a_worker_that_consumes_none_of_batchframeworks_queues_says_so(
    purge_broker, tmp_path, queues, warned
):
    """``celery worker`` without ``-Q`` consumes only ``celery``; operations go to "default"
    (and the tests' "other"), so such a worker idles beside them: it must say why."""
    log = tmp_path / "worker.log"
    env = subprocess_env(CELERY_BROKER_URL=purge_broker.url)
    name = f"bf-{uuid.uuid4().hex[:8]}@%h"
    args = ["celery", "-A", "tests.celery_app", "worker", "-l", "info", "-P", "solo"]
    args += [
        "-Q",
        queues,
        "-n",
        name,
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    worker = start(args, log, env)
    try:
        assert wait_for(lambda: b" ready." in log.read_bytes(), timeout=30), log.read_text()
    finally:
        assert stop(worker, 20) is not None, log.read_text()
    text = log.read_text()
    assert ("event=worker_consumes_no_batchframework_queue" in text) is warned, text
    if warned:
        assert "consumes=celery" in text and "-Q default,other" in text
