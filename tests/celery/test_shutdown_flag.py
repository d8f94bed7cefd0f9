"""The shutdown flag's signal hooks, with real signals sent to this process: raised by the
``celery worker`` program's stop handlers, never by a handler that doesn't stop the worker (a
flag raised then would keep every later task from claiming anything)."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
from celery.apps.worker import Worker

from batchframework_celery import shutdown

pytestmark = [pytest.mark.celery, pytest.mark.timeout(30)]


@pytest.fixture
def hooks(monkeypatch):
    """A fresh flag, and this process's SIGTERM/SIGHUP handlers restored afterwards."""
    monkeypatch.setattr(shutdown, "_flag", None)
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    shutdown.create_flag()
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def _handler(name: str, calls: list[str]):
    def handler(signum, frame):
        calls.append(name)

    handler.__name__ = name
    return handler


def test_celerys_stop_handlers_raise_the_flag_and_others_do_not(hooks):
    calls: list[str] = []
    # As the program installs them: SIGTERM's warm shutdown; SIGHUP's warning (macOS, no tty).
    signal.signal(signal.SIGTERM, _handler("worker_Warm", calls))
    signal.signal(signal.SIGHUP, _handler("warn_on_HUP_handler", calls))
    program = SimpleNamespace(controller=Worker.__new__(Worker))  # a `celery worker` program
    shutdown.raise_flag_on_stop_signals(sender=program)

    os.kill(os.getpid(), signal.SIGHUP)
    assert calls == ["warn_on_HUP_handler"]
    assert not shutdown.worker_shutting_down(), "a SIGHUP that doesn't stop raised the flag"

    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == ["warn_on_HUP_handler", "worker_Warm"]  # Celery's handler still runs
    assert shutdown.worker_shutting_down()


def test_an_embedded_worker_leaves_its_programs_handlers_alone(hooks):
    calls: list[str] = []
    own = _handler("worker_Warm", calls)
    signal.signal(signal.SIGTERM, own)
    shutdown.raise_flag_on_stop_signals(sender=SimpleNamespace(controller=object()))
    assert signal.getsignal(signal.SIGTERM) is own
