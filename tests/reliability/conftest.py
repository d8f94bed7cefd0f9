"""Fixtures of the reliability (fault-injection) suite.

- ``private_redis``: a Redis server of this test's own (see :mod:`.servers`): tests that kill,
  freeze, restart or flush a broker never touch the shared one.
- ``processes``: start Celery workers, poller loops and DB workers as real subprocesses on the
  test database; every one is ``kill -9``'d (by process group) at teardown.
- ``celery_on``: point this process's Celery app at a broker and switch ``enqueue`` to the
  Celery dispatcher, for the duration of a ``with`` block.
- ``reliability_report``: print a test's one-line figure and record it; the lines are
  repeated in pytest's terminal summary, so they show without ``-s``.

The suite runs on PostgreSQL only (it is skipped elsewhere): 2,000 operations and a dozen
processes racing on SQLite would test SQLite's lock, not the engine.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.db import connection, connections
from django.test import override_settings

from batchframework_celery.publish import bounded_publishing
from tests.celery_app import app as celery_app

from .processes import Processes, reliability_env
from .servers import PrivateRedis

CELERY_DISPATCHER = "batchframework_celery.dispatcher.CeleryDispatcher"
REPORT_PROPERTY = "reliability"

#: A second database alias (same server, its own test database) for the rollback scenario.
OTHER_ALIAS = "reliability_other"


def _add_other_alias() -> None:
    default = settings.DATABASES["default"]
    if OTHER_ALIAS in settings.DATABASES or not default["ENGINE"].endswith("postgresql"):
        return
    other = copy.deepcopy(default)
    test_name = (default.get("TEST") or {}).get("NAME") or f"test_{default['NAME']}"
    other["TEST"] = {**(default.get("TEST") or {}), "NAME": f"{test_name}_other"}
    settings.DATABASES[OTHER_ALIAS] = other
    connections.configure_settings(settings.DATABASES)


_add_other_alias()


POSTGRESQL_ONLY = "the reliability suite runs on PostgreSQL (set DATABASE_URL=postgres://…)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's database tests elsewhere than on PostgreSQL, at collection: a skip
    from a fixture came after pytest-django had set up their databases, and a test using the
    second alias (which exists only on PostgreSQL) then failed with an error instead."""
    if connection.vendor == "postgresql":
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents and item.get_closest_marker("django_db"):
            item.add_marker(pytest.mark.skip(reason=POSTGRESQL_ONLY))


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def processes(tmp_path) -> Iterator[Any]:
    """``processes(broker_url, **timings)`` returns a :class:`Processes` for this test."""
    started: list[Processes] = []

    def make(broker_url: str, **timings: float) -> Processes:
        directory = tmp_path / f"procs{len(started) + 1}"
        directory.mkdir()
        procs = Processes(directory, reliability_env(broker_url, **timings))
        started.append(procs)
        return procs

    try:
        yield make
    finally:
        for procs in started:
            procs.cleanup()


def reset_producer_pool(app: Any) -> None:
    """Drop the app's broker connections, so the next publish connects to ``broker_url``."""
    pool = app._pool
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.force_close_all()
    app._pool = None
    with contextlib.suppress(AttributeError, KeyError):
        app.__dict__["amqp"]._producer_pool = None


@contextlib.contextmanager
def celery_on(
    broker_url: str, *, transport_options: dict[str, Any] | None = None, **batchframework: Any
) -> Iterator[Any]:
    """Publish to ``broker_url`` with the Celery dispatcher (and ``BATCHFRAMEWORK`` overrides)."""
    conf = celery_app.conf
    old = conf.broker_url, conf.broker_transport_options
    conf.broker_url = broker_url
    # Celery's ``conf.broker_url`` answers the environment's CELERY_BROKER_URL first.
    environment = mock.patch.dict(os.environ, {"CELERY_BROKER_URL": broker_url})
    environment.start()
    conf.broker_transport_options = {**(old[1] or {}), **(transport_options or {})}
    reset_producer_pool(celery_app)
    # No back-off from an earlier test's broker failure, and none left to the next one.
    bounded_publishing.reset()
    wanted = {**settings.BATCHFRAMEWORK, "DISPATCHER": CELERY_DISPATCHER, **batchframework}
    try:
        with override_settings(BATCHFRAMEWORK=wanted):
            yield celery_app
    finally:
        environment.stop()
        conf.broker_url, conf.broker_transport_options = old
        reset_producer_pool(celery_app)
        bounded_publishing.reset()


@pytest.fixture
def reliability_report(record_property) -> Any:
    """``report(scenario, operations=…, runs=…, duplicates=…, lost=…, seconds=…, **more)``."""

    def report(scenario: Any, **fields: Any) -> str:
        parts = [f"scenario={scenario}"]
        for name, value in fields.items():
            parts.append(f"{name}={value:.1f}" if isinstance(value, float) else f"{name}={value}")
        line = "RELIABILITY " + " ".join(parts)
        print(line, flush=True)
        record_property(REPORT_PROPERTY, line)
        return line

    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    lines: list[str] = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == REPORT_PROPERTY and value not in lines:
                    lines.append(value)
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
