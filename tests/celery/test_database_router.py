"""The Celery transport with a database router that stores operations in a second database.

``using=None`` means the router's write database for ``BatchOperation`` everywhere: in
``enqueue``, in the tasks, in the beat poller (whose ``PeriodicTask`` has no kwargs). And a
message names the database its operations were written to, even ``"default"``, since the
worker resolves a message without one through its router. PostgreSQL only: the second alias
is a second test database on the same server.
"""

from __future__ import annotations

import pytest
from django.test import override_settings

from batchframework import BatchOperation, enqueue
from batchframework_celery.tasks import poll

from .conftest import CELERY_DISPATCHER, NO_DISPATCH
from .helpers import add_postgresql_alias, wait_for

#: Where the router stores batchframework's tables (its own test database).
ELSEWHERE = "celery_router_elsewhere"


def _own_test_database(database: dict) -> None:
    test_name = database["TEST"].get("NAME") or f"test_{database['NAME']}"
    database["TEST"]["NAME"] = f"{test_name}_elsewhere"


pytestmark = [
    pytest.mark.celery,
    pytest.mark.skipif(
        not add_postgresql_alias(ELSEWHERE, _own_test_database),
        reason="a second PostgreSQL test database is needed",
    ),
    pytest.mark.django_db(transaction=True, databases=["default", ELSEWHERE]),
    pytest.mark.timeout(60),
]


class OperationsElsewhere:
    """Reads and writes batchframework's tables in :data:`ELSEWHERE`; migrates everywhere."""

    labels = frozenset({"batchframework", "batchframework_celery"})

    def db_for_read(self, model, **hints):
        return ELSEWHERE if model._meta.app_label in self.labels else None

    db_for_write = db_for_read


ROUTED = override_settings(DATABASE_ROUTERS=[f"{__name__}.OperationsElsewhere"])


def finished(alias: str, pk: int) -> bool:
    return BatchOperation.objects.using(alias).finished().filter(pk=pk).exists()


@ROUTED
def test_the_beat_poller_without_kwargs_polls_the_routers_database(inprocess_worker):
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):  # its message was lost
        operation = enqueue("test-noop")
    assert operation._state.db == ELSEWHERE
    poll.apply_async(queue="default")  # what beat sends: no kwargs
    assert wait_for(lambda: finished(ELSEWHERE, operation.pk), timeout=15)


@ROUTED
def test_a_poll_naming_a_database_polls_that_database(inprocess_worker):
    """``poll`` with ``using`` (a ``PeriodicTask`` per database) finds that database's due
    operations, not the router's."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):  # its message was lost
        operation = enqueue("test-noop", using="default")
    poll.apply_async(kwargs={"using": "default"}, queue="default")
    assert wait_for(lambda: finished("default", operation.pk), timeout=15)


@ROUTED
def test_an_operation_enqueued_on_default_runs_from_its_message(inprocess_worker):
    """``using="default"`` is named in the message: the worker's router says otherwise."""
    operation = enqueue("test-noop", using="default")
    assert wait_for(lambda: finished("default", operation.pk), timeout=15)


@ROUTED
def test_a_message_without_using_still_runs_on_the_routers_database(inprocess_worker):
    """Messages published before ``using`` was always named keep working."""
    from batchframework_celery.tasks import run_operations

    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        operation = enqueue("test-noop")
    run_operations.apply_async(args=[[operation.pk]], queue="default")
    assert wait_for(lambda: finished(ELSEWHERE, operation.pk), timeout=15)


@ROUTED
def test_background_publishing_names_each_operations_own_database(inprocess_worker):
    """With ``PUBLISH_IN_BACKGROUND``, enqueues on two databases wait in the publishing
    thread's buffer together; each message still names the database its operations are in."""
    background = {**CELERY_DISPATCHER, "PUBLISH_IN_BACKGROUND": True}
    with override_settings(BATCHFRAMEWORK=background):
        routed = enqueue("test-noop")
        on_default = enqueue("test-noop", using="default")
    assert routed._state.db == ELSEWHERE
    assert wait_for(
        lambda: finished(ELSEWHERE, routed.pk) and finished("default", on_default.pk),
        timeout=15,
    )


@ROUTED
def test_the_beat_poller_polls_every_database_in_poll_databases(inprocess_worker):
    """Operations enqueued with ``using=`` a database other than the router's are found by
    the beat poller (whose task has no kwargs) once ``POLL_DATABASES`` lists both."""
    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):  # their messages were lost
        elsewhere = enqueue("test-noop")
        on_default = enqueue("test-noop", using="default")
    both = {**NO_DISPATCH, "POLL_DATABASES": [ELSEWHERE, "default"]}
    with override_settings(BATCHFRAMEWORK=both):
        poll.apply_async(queue="default")  # what beat sends: no kwargs
        assert wait_for(
            lambda: finished(ELSEWHERE, elsewhere.pk) and finished("default", on_default.pk),
            timeout=15,
        )


@ROUTED
def test_enqueueing_to_a_database_no_poller_polls_is_warned_about_once(caplog, monkeypatch):
    from batchframework_celery import dispatcher

    monkeypatch.setattr(dispatcher, "_warned_unpolled", set())
    caplog.set_level("WARNING", logger="batchframework")
    with override_settings(BATCHFRAMEWORK=CELERY_DISPATCHER):
        enqueue("test-noop")  # the router's database: polled
        assert "database_not_polled" not in caplog.text
        for _ in range(2):
            enqueue("test-noop", using="default", delay=3600)
    warnings = [r for r in caplog.records if "event=database_not_polled" in r.getMessage()]
    assert len(warnings) == 1 and "alias=default" in warnings[0].getMessage()
    with override_settings(
        BATCHFRAMEWORK={**CELERY_DISPATCHER, "POLL_DATABASES": [ELSEWHERE, "default"]}
    ):
        monkeypatch.setattr(dispatcher, "_warned_unpolled", set())
        enqueue("test-noop", using="default", delay=3600)
    assert len([r for r in caplog.records if "database_not_polled" in r.getMessage()]) == 1
