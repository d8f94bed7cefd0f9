"""Scenario 11: hostile messages → rejected or ignored with a log line; nothing executes; the
worker keeps running and still runs a normal operation afterwards.

A real prefork ``celery worker`` on a private Redis receives, on its ``default`` queue:

- a pickle-typed message whose payload would create a marker file if it were unpickled;
- a JSON-typed message whose body is not JSON;
- a message naming a task that does not exist (``os.system``);
- ``batchframework.run_operations`` with forged ids (non-existent, negative, strings, booleans,
  too many, not a list), no arguments at all, and an unknown database alias;
- ``batchframework.drain`` / ``batchframework.poll`` with bad queue names and aliases;
- ``run_operations`` naming real rows it must not run: one whose operationtype has no handler,
  one that already finished, one due in an hour.

Then a normal operation is published; it must run once.
"""

from __future__ import annotations

import contextlib
import pickle
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.test import override_settings
from kombu import Connection

from batchframework import BatchOperation, enqueue
from batchframework.testing import run_due
from tests.celery.helpers import use_broker
from tests.celery_app import app as celery_app
from tests.testapp.models import Execution

from .pg_private import Processes, private_redis, subprocess_env, wait_until

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(60),
]

RUN = "batchframework.run_operations"


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: proof of execution if the file appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _headers(task: str) -> dict:
    task_id = str(uuid.uuid4())
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "hostile@test",
    }


def _push_raw(url: str, task: str, body: bytes, content_type: str, encoding: str) -> None:
    with Connection(url, connect_timeout=2) as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key="default",
            serializer=None,
            content_type=content_type,
            content_encoding=encoding,
            headers=_headers(task),
            retry=False,
        )


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


def test_hostile_messages_are_rejected_and_the_worker_keeps_running(tmp_path, reliability_report):
    started = time.monotonic()
    marker = tmp_path / "pickle-payload-executed"
    # Real rows that hostile messages name.
    unregistered = BatchOperation.objects.create_asynchronous(
        operationtype="not-registered-anywhere"
    )
    finished = enqueue("test-effect")
    run_due()
    future = enqueue("test-effect", delay=timedelta(hours=1))
    with private_redis(tmp_path) as redis_server:
        processes = Processes(tmp_path, subprocess_env(CELERY_BROKER_URL=redis_server.url))
        try:
            worker = processes.celery_worker()
            # 1. pickle: Celery must refuse it (accept_content is JSON only), never unpickle it.
            evil = pickle.dumps(((_CreatesFile(str(marker)),), {}, {}), protocol=2)
            _push_raw(redis_server.url, RUN, evil, "application/x-python-serialize", "binary")
            # 2. "JSON" that is not JSON.
            _push_raw(redis_server.url, RUN, b"{not json", "application/json", "utf-8")
            with use_broker(celery_app, redis_server.url):
                send = celery_app.send_task
                # 3. a task that does not exist.
                send("os.system", args=[f"touch {marker}"], queue="default")
                # 4. forged or malformed ids / aliases.
                hostile_runs = [
                    ([[999_999_999]], {}),
                    ([[-1]], {}),
                    ([["1; DROP TABLE x"]], {}),
                    ([[True]], {}),
                    ([[1.5]], {}),
                    (["not-a-list"], {}),
                    ([[]], {}),
                    ([list(range(1, 10_002))], {}),
                    ([[finished.pk]], {"using": "../../evil"}),
                    ([], {}),
                ]
                for args, kwargs in hostile_runs:
                    send(RUN, args=args, kwargs=kwargs, queue="default")
                send("batchframework.drain", args=["x" * 500], queue="default")
                send("batchframework.drain", args=[123], queue="default")
                send(
                    "batchframework.drain",
                    args=["default"],
                    kwargs={"using": "nope"},
                    queue="default",
                )
                send("batchframework.poll", kwargs={"using": {"evil": 1}}, queue="default")
                # 5. real rows that must not run: no handler, already finished, not yet due.
                send(RUN, args=[[unregistered.pk, finished.pk, future.pk]], queue="default")
                send("batchframework.drain", args=["default"], queue="default")
            hostile_count = 2 + 1 + len(hostile_runs) + 4 + 2
            # 6. a normal operation, published after all of the above.
            with _celery_dispatch(redis_server.url):
                normal = enqueue("test-effect")
            wait_until(
                lambda: BatchOperation.objects.get(pk=normal.pk).status == "finished",
                timeout=40,
                what="the normal operation after the hostile messages",
            )
            time.sleep(1.0)
            log = processes.log_of(worker)
            alive = worker.poll() is None
            for op in (unregistered, finished, future, normal):
                op.refresh_from_db()
            runs = {
                op.pk: Execution.objects.filter(key=str(op.pk)).count()
                for op in (finished, future, normal)
            }
            executed = (
                int(marker.exists())
                + int(unregistered.status != "unprocessed")
                + int(future.status != "unprocessed")
                + int(runs[finished.pk] != 1)
            )
            waiting = redis_server.client.llen("default")
            reliability_report(
                11,
                operations=4,
                runs=sum(runs.values()),
                duplicates=int(runs[finished.pk] > 1),
                lost=int(normal.result != "successful"),
                seconds=time.monotonic() - started,
                hostile_messages=hostile_count,
                executed=executed,
                worker_alive=alive,
            )

            assert not marker.exists(), "the pickle payload (or os.system) was executed"
            assert alive, log[-5000:]
            assert normal.result == "successful" and runs[normal.pk] == 1
            assert (unregistered.status, unregistered.attempts) == ("unprocessed", 0)
            assert (future.status, future.attempts) == ("unprocessed", 0)
            assert finished.attempts == 1 and runs[finished.pk] == 1
            assert runs[future.pk] == 0
            assert waiting == 0, f"{waiting} message(s) still waiting (stuck or redelivered)"
            # Each hostile message left a line in the log.
            assert "ContentDisallowed" in log or "untrusted content" in log, log[-5000:]
            assert "unregistered task" in log.lower(), log[-5000:]
            assert log.count("event=message_rejected") >= 11, log[-5000:]
            assert "event=message_noop" in log
        finally:
            processes.cleanup()
