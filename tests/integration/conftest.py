"""Shared fixtures for the engine's integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import override_settings

from batchframework import handler
from batchframework.registry import registry

from .helpers import RECORDING_DISPATCHER, ProcessReaper, RecordingDispatcher


@pytest.fixture
def reaper(tmp_path) -> Iterator[ProcessReaper]:
    """Start subprocesses through this; any still alive at teardown are killed."""
    processes = ProcessReaper(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


@pytest.fixture
def recording_dispatcher() -> Iterator[list]:
    """Use :class:`RecordingDispatcher`; yields its list of ``(alias, [pk, ...])`` calls."""
    RecordingDispatcher.calls.clear()
    with override_settings(BATCHFRAMEWORK={"DISPATCHER": RECORDING_DISPATCHER}):
        yield RecordingDispatcher.calls
    RecordingDispatcher.calls.clear()


@pytest.fixture
def registered():
    """Registers handlers for one test and unregisters them afterwards."""
    names: list[str] = []

    def register(operationtype: str, **options):
        def decorate(function):
            names.append(operationtype)
            return handler(operationtype, **options)(function)

        return decorate

    yield register
    for name in names:
        registry.unregister(name)
