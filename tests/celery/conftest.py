"""Fixtures for the Celery transport tests: a real broker, the Celery dispatcher, and an
in-process worker (Celery's own testing worker) bound to the tests' Celery app."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings
from django.test import override_settings

from tests.celery_app import app as celery_app

CELERY_DISPATCHER = {**settings.BATCHFRAMEWORK, "DISPATCHER": "batchframework_celery.dispatcher.CeleryDispatcher"}


def _broker_answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    url = celery_app.conf.broker_url
    if not _broker_answers(url):
        if os.environ.get("CI"):
            pytest.fail(f"broker {url} does not answer (CI: server tests must not skip)")
        pytest.skip(f"broker {url} does not answer")
    return url


@pytest.fixture
def purge_broker(broker_url):
    celery_app.control.purge()
    yield
    celery_app.control.purge()


@pytest.fixture
def celery_dispatch(purge_broker):
    with override_settings(BATCHFRAMEWORK=CELERY_DISPATCHER):
        yield


@pytest.fixture
def inprocess_worker(celery_dispatch):
    """A Celery worker thread consuming the default and 'other' queues."""
    with start_worker(
        celery_app, pool="solo", concurrency=1, perform_ping_check=False,
        queues=["default", "other"], shutdown_timeout=10,
    ) as worker:
        yield worker
