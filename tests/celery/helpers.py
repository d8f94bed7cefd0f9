"""Helpers for the Celery tests: waiting with a deadline, looking into the broker, switching
the tests' Celery app to another broker, and the environment of worker/beat subprocesses."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from unittest import mock
from urllib.parse import quote

from celery import Celery
from django.conf import settings
from django.db import connection, connections

from batchframework import BatchOperation
from tests.testapp.models import Effect, Execution

#: The queues the tests' handlers use (and the worker consumes).
QUEUES = ("default", "other")


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def all_finished(ids: list[int]) -> Callable[[], bool]:
    return lambda: BatchOperation.objects.finished().filter(pk__in=ids).count() == len(ids)


def executions(op_id: int) -> int:
    """How often the handler ran for the operation (test-effect and test-sleep record this)."""
    return Execution.objects.filter(key=str(op_id)).count()


def effects() -> set[str]:
    return set(Effect.objects.values_list("key", flat=True))


def assert_ran_once_each(ids: list[int]) -> None:
    """Every operation finished successfully and its handler ran exactly once."""
    ops = BatchOperation.objects.filter(pk__in=ids)
    assert ops.count() == len(ids)
    assert ops.successful().count() == len(ids), list(
        ops.values_list("pk", "status", "result", "last_error")
    )
    assert all(op.attempts == 1 for op in ops)
    runs = {key: 0 for key in map(str, ids)}
    for key in Execution.objects.filter(key__in=runs).values_list("key", flat=True):
        runs[key] += 1
    assert set(runs.values()) == {1}, {k: v for k, v in runs.items() if v != 1}
    assert {str(i) for i in ids} <= effects()


def assert_never_early(ids: list[int], *, late_by: float) -> None:
    """Each operation started at or after its due time, and at most ``late_by`` seconds after."""
    for op in BatchOperation.objects.filter(pk__in=ids):
        assert op.started_running_datetime is not None, op.pk
        lateness = (op.started_running_datetime - op.run_after).total_seconds()
        assert lateness >= 0, f"operation {op.pk} started {-lateness:.3f}s early"
        assert lateness < late_by, f"operation {op.pk} started {lateness:.3f}s late"


def reset_producer_pool(app: Celery) -> None:
    """Forget the app's broker connection pools, so the next publish uses ``broker_url``.

    The pools are not closed: kombu keeps them in a process-wide registry keyed by broker URL
    and would hand the closed pool out again when we switch back."""
    app._pool = None
    with contextlib.suppress(AttributeError, KeyError):
        app.__dict__["amqp"]._producer_pool = None


@contextlib.contextmanager
def use_broker(app: Celery, url: str) -> Iterator[None]:
    """Point the app (publishing and workers started meanwhile) at ``url``, then back."""
    old_url, old_heartbeat = app.conf.broker_url, app.conf.broker_heartbeat
    app.conf.broker_url = url
    # Celery's ``conf.broker_url`` answers the environment's CELERY_BROKER_URL first (the
    # variable the suite reads for its own broker), whatever was assigned to it.
    environment = mock.patch.dict(os.environ, {"CELERY_BROKER_URL": url})
    environment.start()
    if url.startswith(("amqp", "pyamqp")):
        # The worker's event loop wakes for its AMQP heartbeat timer; with the default (120 s)
        # it sleeps up to 10 s between wake-ups, which delays the test worker's shutdown.
        app.conf.broker_heartbeat = 2
    reset_producer_pool(app)
    try:
        yield
    finally:
        environment.stop()
        app.conf.broker_url, app.conf.broker_heartbeat = old_url, old_heartbeat
        reset_producer_pool(app)


class BrokerProbe:
    """Looks into the broker's queues: what is waiting, what a consumer holds unacknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_redis = url.startswith(("redis://", "rediss://"))
        self._redis: Any = None

    @property
    def redis(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.url, socket_timeout=5)
        return self._redis

    def waiting(self, queue: str = "default") -> int:
        """Messages waiting in ``queue`` (not delivered to any consumer)."""
        if self.is_redis:
            # kombu keeps priority levels in separate lists: "<queue>" and "<queue>\x06\x16<n>".
            keys = [queue, *(f"{queue}\x06\x16{level}" for level in (3, 6, 9))]
            return sum(self.redis.llen(key) for key in keys)
        from amqp.exceptions import NotFound
        from kombu import Connection

        with Connection(self.url, connect_timeout=2) as conn:
            try:
                return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
            except NotFound:
                return 0

    def unacked(self) -> int:
        """Messages delivered to a consumer and not yet acknowledged (Redis: ETA messages a
        worker holds in memory sit here). For RabbitMQ, 0: unacked messages are not counted
        by a passive declare, and the tests only ask this with no consumer running."""
        if self.is_redis:
            return int(self.redis.hlen("unacked"))
        return 0

    def total(self) -> int:
        return sum(self.waiting(q) for q in QUEUES) + self.unacked()

    def purge(self) -> None:
        if self.is_redis:
            # Redis DB 15 belongs to these tests: drop every queue and the unacked index.
            self.redis.flushdb()
            return
        from amqp.exceptions import NotFound
        from kombu import Connection

        with Connection(self.url, connect_timeout=2) as conn:
            for queue in (*QUEUES, "celery"):
                try:
                    conn.default_channel.queue_purge(queue)
                except NotFound:
                    conn.close()
                    conn.connect()

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def database_url_for_subprocesses() -> str:
    """A ``DATABASE_URL`` naming the test database pytest-django created, for subprocesses."""
    s = connection.settings_dict
    engine = s["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"sqlite:///{s['NAME']}"
    scheme = {"postgresql": "postgres", "mysql": "mysql"}[engine]
    auth = quote(s.get("USER") or "", safe="")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"], safe="")
    host = s.get("HOST") or "127.0.0.1"
    port = f":{s['PORT']}" if s.get("PORT") else ""
    return f"{scheme}://{auth}@{host}{port}/{s['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a worker/beat subprocess: the test database, the Celery settings."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "DJANGO_SETTINGS_MODULE": "tests.celery.settings_celery",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def add_postgresql_alias(alias: str, change: Callable[[dict[str, Any]], None]) -> bool:
    """Add ``alias`` to ``DATABASES`` as a copy of ``default`` that ``change`` adjusts (its own
    test database, a mirror of default's, other options), when default is PostgreSQL. Done at
    import, before pytest-django sets up the test databases. Returns whether it could."""
    default = settings.DATABASES["default"]
    if not default["ENGINE"].endswith("postgresql"):
        return False
    if alias not in settings.DATABASES:
        copied = copy.deepcopy(default)
        copied["TEST"] = dict(default.get("TEST") or {})
        change(copied)
        settings.DATABASES[alias] = copied
        connections.configure_settings(settings.DATABASES)
    return True


def waiting_messages(broker, queue: str = "default") -> list[dict]:
    """The messages waiting in ``queue`` on Redis, oldest first: task name, ETA, expiry, the
    positional and keyword arguments."""
    found = []
    for raw in reversed(broker.redis.lrange(queue, 0, -1)):  # kombu LPUSHes, workers BRPOP
        message = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        headers = message["headers"]
        found.append(
            {
                "task": headers["task"],
                "eta": headers.get("eta") and datetime.fromisoformat(headers["eta"]),
                "expires": headers.get("expires") and datetime.fromisoformat(headers["expires"]),
                "args": args,
                "kwargs": kwargs,
            }
        )
    return found
