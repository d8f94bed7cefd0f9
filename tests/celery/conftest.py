"""Fixtures for the Celery transport tests: a real broker, the Celery dispatcher, and an
in-process worker (Celery's own testing worker) bound to the tests' Celery app.

The broker is Redis (``CELERY_BROKER_URL``, DB 15) unless a test parametrizes the ``broker``
fixture indirectly with ``"rabbitmq"``; either way ``broker`` is a :class:`BrokerProbe` that
can count the messages waiting in a queue, so tests can look into the broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings
from django.test import override_settings

from tests.celery_app import app as celery_app

from .helpers import BrokerProbe, use_broker

#: The tests' settings: no dispatch (for operations that must not be published).
NO_DISPATCH = {**settings.BATCHFRAMEWORK, "DISPATCHER": "batchframework.dispatch.NullDispatcher"}
CELERY_DISPATCHER = {
    **settings.BATCHFRAMEWORK,
    "DISPATCHER": "batchframework_celery.dispatcher.CeleryDispatcher",
}
REDIS_URL = settings.CELERY_BROKER_URL
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}


def _broker_answers(url: str) -> bool:
    parsed = urlparse(url)
    default_port = 5672 if parsed.scheme.startswith(("amqp", "pyamqp")) else 6379
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


def _require(url: str) -> None:
    if not _broker_answers(url):
        if os.environ.get("CI"):
            pytest.fail(f"broker {url} does not answer (CI: server tests must not skip)")
        pytest.skip(f"broker {url} does not answer")


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The Redis broker of the tests' settings (skips, or fails on CI, when it is down)."""
    _require(REDIS_URL)
    return REDIS_URL


@pytest.fixture
def broker(request, broker_url):
    """The broker the tests' Celery app publishes to, as a :class:`BrokerProbe`.

    Redis by default; ``@pytest.mark.parametrize("broker", ["redis", "rabbitmq"],
    indirect=True)`` runs a test against both. The app's broker is restored afterwards.
    """
    name = getattr(request, "param", "redis")
    url = BROKERS[name]
    _require(url)
    with use_broker(celery_app, url):
        probe = BrokerProbe(url)
        try:
            yield probe
        finally:
            probe.close()


@pytest.fixture
def purge_broker(broker):
    from batchframework_celery.publish import bounded_publishing

    broker.purge()
    bounded_publishing.reset()  # a test that killed the broker must not silence the next one
    yield broker
    broker.purge()
    bounded_publishing.reset()


@pytest.fixture
def celery_dispatch(purge_broker):
    with override_settings(BATCHFRAMEWORK=CELERY_DISPATCHER):
        yield purge_broker


@contextlib.contextmanager
def inprocess_worker_running():
    """A Celery worker thread consuming the default and 'other' queues."""
    with start_worker(
        celery_app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        queues=["default", "other"],
        shutdown_timeout=10,
    ) as worker:
        yield worker


@pytest.fixture
def inprocess_worker(celery_dispatch):
    """A Celery worker thread consuming the default and 'other' queues."""
    with inprocess_worker_running() as worker:
        yield worker


@pytest.fixture
def start_inprocess_worker(celery_dispatch):
    """Start the in-process worker later in the test: ``start_inprocess_worker()``."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(inprocess_worker_running())
