"""The management commands refuse a database alias that doesn't exist and an empty or too long
queue name with a usage error, before doing anything (instead of a traceback, or a worker
that polls a queue no operation can be in)."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from batchframework import BatchOperation, enqueue

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "command",
    [
        ("batchframework_worker", "--once"),
        ("batchframework_prune", "--days", "0"),
        ("batchframework_fail_abandoned", "--hours", "0"),
        ("batchframework_register_poller",),
    ],
)
def test_an_unknown_database_alias_is_a_usage_error(command):
    enqueue("test-noop")
    with pytest.raises(CommandError, match="invalid choice: 'nope'"):
        call_command(*command, "--database", "nope")
    assert BatchOperation.objects.unprocessed().count() == 1  # nothing ran


@pytest.mark.parametrize("command", ["batchframework_worker", "batchframework_register_poller"])
@pytest.mark.parametrize("queue", ["", "q" * 101])
def test_a_queue_name_the_queue_column_cannot_hold_is_a_usage_error(command, queue):
    with pytest.raises(CommandError, match="a queue name has 1-100 characters"):
        call_command(command, "--queue", queue)
