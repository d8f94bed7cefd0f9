"""The example project's views, through Django's test client, under the project's own settings.

The view tests live in the project (``blog/tests.py``, ``game/tests.py``,
``operations/tests.py``: login, 404 for another user's operation and for malformed ids, staff
seeing all, create/edit/cancel of the blog email); here Django's test runner runs them in a
subprocess, so the suite's own settings stay untouched.
"""

from __future__ import annotations

import re

import pytest

from .helpers import example_environment, run_manage

pytestmark = pytest.mark.slow


def test_example_project_view_tests_pass(tmp_path):
    result = run_manage(
        "test",
        "blog",
        "game",
        "operations",
        "--noinput",
        "-v",
        "2",
        env=example_environment(tmp_path),
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for name in (
        "test_another_users_operation_is_404_not_403",
        "test_malformed_ids_are_404",
        "test_staff_see_all_but_not_others_output",
        "test_cancel_notification_prevents_the_email",
        "test_editing_postpones_the_pending_email",
        "test_synchronous_deal_takes_five_queries_whatever_the_number_of_players",
    ):
        assert re.search(rf"{name} \(.*\) \.\.\. ok", output), name
    assert "\nOK" in output


def test_example_project_system_checks_pass(tmp_path):
    result = run_manage(
        "check", "--fail-level", "WARNING", env=example_environment(tmp_path), timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
