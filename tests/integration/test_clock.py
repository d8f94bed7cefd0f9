"""The clock ``delay`` counts from: this process's clock corrected by its measured offset to
the database's (``CORRECT_CLOCK_SKEW``), with a noise floor under which no offset is applied,
and none at all when the setting is off."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from batchframework.clock import clock_offset, database_now, forget_clock_offsets

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]


@pytest.fixture
def process_clock(monkeypatch):
    """Move this process's clock (``timezone.now``) by a given offset from the real time; the
    database's clock is left alone. Cached clock offsets are forgotten before and after."""
    real_now = timezone.now

    def move(by: timedelta) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real_now() + by)
        forget_clock_offsets()

    forget_clock_offsets()
    yield move
    monkeypatch.undo()
    forget_clock_offsets()


def test_a_skew_below_the_noise_floor_counts_as_none(process_clock):
    """A process whose clock is a few milliseconds off the database's (the measurement's own
    noise) uses its own clock as is: ``database_now`` is exactly this process's time, so
    processes on the database's own machine don't shift every due time by a jittery offset."""
    process_clock(timedelta(milliseconds=-2))  # well within the 10 ms floor, whatever the noise
    assert clock_offset() == timedelta(0)
    before = timezone.now()
    now = database_now()
    assert before <= now <= timezone.now()


def test_a_real_skew_is_corrected(process_clock):
    """A process clock an hour slow is corrected by the measured offset: due times follow the
    database's clock, not the slow process's."""
    process_clock(timedelta(hours=-1))
    offset = clock_offset()
    assert abs(offset - timedelta(hours=1)) < timedelta(seconds=1)
    assert abs(database_now() - (timezone.now() + timedelta(hours=1))) < timedelta(seconds=1)


def test_correct_clock_skew_false_uses_the_process_clock_without_asking_the_database(
    process_clock, django_assert_num_queries
):
    """``CORRECT_CLOCK_SKEW = False`` (for tests that freeze or move the process clock): no
    offset is measured or applied, however far the process clock is from the database's."""
    process_clock(timedelta(hours=-1))
    no_correction = override_settings(BATCHFRAMEWORK={"CORRECT_CLOCK_SKEW": False})
    with no_correction, django_assert_num_queries(0):
        assert clock_offset() == timedelta(0)
        before = timezone.now()
        now = database_now()
    assert before <= now <= timezone.now()
