"""Registering the poller with django-celery-beat: the ``PeriodicTask`` runs the poller at the
interval the poller's window and drain expiry assume, and ``migrate`` registers it only while
the tables the poller works on are migrated."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from batchframework import enqueue
from batchframework_celery.beat import PERIODIC_TASK_NAME, register_poller
from batchframework_celery.poller import poll_once
from batchframework_celery.tasks import DRAIN_TASK

from .conftest import NO_DISPATCH
from .helpers import waiting_messages

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def _poll_interval(seconds: float, **more):
    return override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "POLL_INTERVAL": seconds, **more})


def _registered_tick() -> timedelta:
    """How often beat's database scheduler runs the poller, as it reads the stored task."""
    return PeriodicTask.objects.get(name=PERIODIC_TASK_NAME).schedule.run_every


@pytest.mark.parametrize("seconds", [0.4, 1, 1.5, 2.5, 90])
def test_beat_runs_the_poller_every_poll_interval_exactly(seconds):
    """Fractions of a second included: the poller assumes ticks ``POLL_INTERVAL`` apart."""
    with _poll_interval(seconds):
        register_poller()
    assert _registered_tick() == timedelta(seconds=seconds)
    task = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    # A tick is stale after two intervals; beat counts that in whole seconds, so never sooner.
    assert 2 * seconds <= task.expire_seconds < 2 * seconds + 1


def test_a_long_poll_interval_with_a_fraction_is_registered_no_longer_than_it_is():
    """Microseconds of over 35 minutes overflow django-celery-beat's integer column: such an
    interval is cut to whole seconds, so beat ticks a fraction of a second sooner, never later
    than the poller assumes."""
    interval = timedelta(hours=1, milliseconds=500)
    with _poll_interval(interval.total_seconds()):
        register_poller()
    assert interval - timedelta(seconds=1) < _registered_tick() <= interval


def test_a_changed_poll_interval_below_a_second_updates_the_registered_schedule():
    with _poll_interval(1):
        task, _ = register_poller()
    with _poll_interval(0.25):
        updated, changed = register_poller()
    assert changed and updated.pk == task.pk
    assert _registered_tick() == timedelta(milliseconds=250)
    assert PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).count() == 1


def test_an_operation_due_just_before_the_next_registered_tick_gets_its_eta_message(
    purge_broker,
):
    """The window of a tick reaches past the next tick of the schedule beat runs: an operation
    beyond the horizon (so without a message) that comes due just before that tick is
    published now with its ETA, not left to the next tick's drain, late by the gap."""
    broker = purge_broker
    with _poll_interval(0.4, DISPATCH_HORIZON=0.1):
        register_poller()
        tick = _registered_tick()
        op = enqueue("test-noop", delay=tick - timedelta(milliseconds=20))
        counts = poll_once()
    assert counts["scheduled"] == 1, counts
    [message] = waiting_messages(broker)
    assert message["args"] == [[op.pk]] and message["eta"] == op.run_after


def test_the_pollers_drains_outlive_the_next_registered_tick(purge_broker):
    """A drain expires two ticks of the registered schedule after it was sent: never before
    the next tick could send a fresh one."""
    broker = purge_broker
    with _poll_interval(0.4):
        register_poller()
        tick = _registered_tick()
        enqueue("test-noop")
        before = timezone.now()
        assert poll_once()["drain_messages"] == 1
        after = timezone.now()
    [drain] = waiting_messages(broker)
    assert drain["task"] == DRAIN_TASK
    assert before + 2 * tick <= drain["expires"] <= after + 2 * tick


def _poller_task():
    return PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME)


def test_migrating_batchframework_backward_does_not_register_the_poller():
    """``migrate batchframework zero`` drops the tables the poller polls: neither it nor a
    later ``migrate`` of another app brings back the task an operator deleted, which beat
    would run against missing tables. Migrating forward again registers it."""
    try:
        call_command("migrate", "testapp", "zero", verbosity=0)  # it depends on batchframework
        assert _poller_task().exists()  # batchframework's tables are still there
        _poller_task().delete()
        call_command("migrate", "batchframework", "zero", verbosity=0)
        assert not _poller_task().exists()
        call_command("migrate", "batchframework_celery", verbosity=0)  # nothing to apply
        assert not _poller_task().exists()
    finally:
        call_command("migrate", verbosity=0)
    assert _poller_task().filter(enabled=True).count() == 1


def test_migrating_batchframework_celery_backward_does_not_register_the_poller():
    """The poller's watermark table is batchframework_celery's own."""
    _poller_task().delete()
    try:
        call_command("migrate", "batchframework_celery", "zero", verbosity=0)
        assert not _poller_task().exists()
    finally:
        call_command("migrate", verbosity=0)
    assert _poller_task().filter(enabled=True).count() == 1


def test_the_command_says_the_interval_in_seconds():
    """It printed the stored ``every``: "every 400000s" for a 0.4 s interval in microseconds."""
    out = io.StringIO()
    with _poll_interval(0.4):
        call_command("batchframework_register_poller", stdout=out)
    assert "(every 0.4s)" in out.getvalue()
