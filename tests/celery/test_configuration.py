"""Wiring and configuration of the Celery transport: which dispatcher ``enqueue`` uses, the
idempotent registration of the poller with django-celery-beat, the system checks, and Celery's
eager mode and ``ALWAYS_SYNCHRONOUS`` for users' tests."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import OperationalError, connection, connections, transaction
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from batchframework import BatchOperation, enqueue
from batchframework.dispatch import ImmediateDispatcher, get_dispatcher
from batchframework.signals import operation_started
from batchframework.testing import run_due
from batchframework_celery import tasks as tasks_module
from batchframework_celery.beat import PERIODIC_TASK_NAME, beat_schedule, register_poller
from batchframework_celery.checks import (
    _first_broker_url,
    check_celery,
    check_wiring,
    check_worker_connections,
)
from batchframework_celery.dispatcher import CeleryDispatcher
from batchframework_celery.poller import poll_once
from batchframework_celery.tasks import POLL_TASK, reconnecting
from tests.celery_app import app as celery_app
from tests.integration.helpers import ROOT, subprocess_env

from .conftest import CELERY_DISPATCHER, NO_DISPATCH
from .helpers import assert_ran_once_each, executions

pytestmark = [pytest.mark.celery, pytest.mark.django_db(transaction=True), pytest.mark.timeout(30)]


@pytest.fixture
def celery_conf(monkeypatch):
    """Change the tests' Celery app configuration for one test."""
    saved = {}

    def change(**values):
        for key, value in values.items():
            saved.setdefault(key, celery_app.conf[key])
            celery_app.conf[key] = value
        if "broker_url" in values:
            # Celery answers the environment's CELERY_BROKER_URL first, whatever is assigned.
            monkeypatch.setenv("CELERY_BROKER_URL", values["broker_url"])

    yield change
    for key, value in saved.items():
        celery_app.conf[key] = value


def test_installing_batchframework_celery_makes_enqueue_dispatch_through_celery():
    without_dispatcher = {k: v for k, v in NO_DISPATCH.items() if k != "DISPATCHER"}
    with override_settings(BATCHFRAMEWORK=without_dispatcher):
        assert isinstance(get_dispatcher(), CeleryDispatcher)
    with override_settings(BATCHFRAMEWORK={**without_dispatcher, "ALWAYS_SYNCHRONOUS": True}):
        assert isinstance(get_dispatcher(), ImmediateDispatcher)


def test_migrate_registers_the_poller():
    PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).delete()
    call_command("migrate", verbosity=0)  # nothing to apply; post_migrate still runs
    assert PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME, task=POLL_TASK).count() == 1
    call_command("migrate", verbosity=0)
    assert PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).count() == 1


def test_register_poller_is_idempotent_and_follows_the_poll_interval():
    PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).delete()  # (migrate/flush registered it)
    task, changed = register_poller()
    assert changed
    again, changed_again = register_poller()
    assert (again.pk, changed_again) == (task.pk, False)
    assert PeriodicTask.objects.filter(task=POLL_TASK).count() == 1
    assert (task.interval.every, task.interval.period) == (1, IntervalSchedule.SECONDS)
    assert task.queue == "default" and task.enabled and task.expire_seconds == 2

    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "POLL_INTERVAL": 3}):
        updated, changed = register_poller()
        out = io.StringIO()
        call_command("batchframework_register_poller", stdout=out)
    assert changed and updated.pk == task.pk
    assert "already up to date" in out.getvalue() and "every 3s" in out.getvalue()
    assert PeriodicTask.objects.filter(task=POLL_TASK).count() == 1
    assert PeriodicTask.objects.get(task=POLL_TASK).interval.every == 3

    # A disabled or re-queued task is put back as it should be.
    PeriodicTask.objects.filter(task=POLL_TASK).update(enabled=False)
    out = io.StringIO()
    call_command("batchframework_register_poller", "--queue", "ops", stdout=out)
    assert "registered/updated" in out.getvalue()
    task = PeriodicTask.objects.get(task=POLL_TASK)
    assert (task.enabled, task.queue, task.interval.every) == (True, "ops", 1)


def test_migrate_keeps_an_operators_queue_and_disabled_poller():
    """``migrate`` (every deploy) only keeps the schedule in step with POLL_INTERVAL."""
    call_command("batchframework_register_poller", "--queue", "polling", stdout=io.StringIO())
    PeriodicTask.objects.filter(task=POLL_TASK).update(enabled=False)
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "POLL_INTERVAL": 4}):
        call_command("migrate", verbosity=0)
    task = PeriodicTask.objects.get(task=POLL_TASK)
    assert (task.queue, task.enabled, task.interval.every) == ("polling", False, 4)


def test_register_poller_survives_twin_interval_schedules():
    """Nothing makes IntervalSchedule rows unique; a twin must not break every migrate."""
    seconds = 1  # the tests' POLL_INTERVAL
    for _ in range(2):
        IntervalSchedule.objects.create(every=seconds, period=IntervalSchedule.SECONDS)
    call_command("migrate", verbosity=0)
    task, _ = register_poller()
    assert task.interval.every == seconds
    assert PeriodicTask.objects.filter(task=POLL_TASK).count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="an INSERT waiting on another")
def test_register_poller_survives_a_concurrent_first_registration():
    """Two first registrations at once (two deployments' migrate): both find no task, and the
    second INSERT fails on the unique name once the first commits. It must then update the
    task the first created, not raise."""
    PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).delete()
    schedule = IntervalSchedule.objects.create(every=7, period=IntervalSchedule.SECONDS)
    inserted = threading.Event()

    def first_registration():
        try:
            with transaction.atomic():
                PeriodicTask.objects.create(
                    name=PERIODIC_TASK_NAME, task=POLL_TASK, interval=schedule, queue="x"
                )
                inserted.set()
                time.sleep(1.0)  # meanwhile the other registration finds no task, and waits
        finally:
            connections.close_all()

    thread = threading.Thread(target=first_registration)
    thread.start()
    try:
        assert inserted.wait(10)
        task, changed = register_poller()
    finally:
        thread.join(10)
    assert changed
    assert PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).count() == 1
    stored = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    assert (stored.pk, stored.queue, stored.interval.every) == (task.pk, "default", 1)


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="elsewhere the other registration waits on ours (locks), the other order",
)
def test_register_poller_survives_a_registration_committed_between_its_look_and_its_insert():
    """The other order of two first registrations: ours finds no task, then the other one
    commits, then ours creates. django-celery-beat's save checks the name before the INSERT
    and raises ``ValidationError`` (not the database's ``IntegrityError``): still an update."""
    from unittest import mock

    from django.db.models.query import QuerySet

    PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).delete()
    real_first = QuerySet.first
    other_committed = []

    def first_then_the_other_commits(queryset):
        found = real_first(queryset)
        if queryset.model is PeriodicTask and found is None and not other_committed:
            other_committed.append(True)
            thread = threading.Thread(target=lambda: (register_poller(), connections.close_all()))
            thread.start()
            thread.join(10)
        return found

    with mock.patch.object(QuerySet, "first", first_then_the_other_commits):
        task, _ = register_poller(keep_choices=True)
    assert other_committed
    assert PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).count() == 1
    assert PeriodicTask.objects.get(name=PERIODIC_TASK_NAME).pk == task.pk


def test_migrate_keeps_an_operators_crontab_schedule_for_the_poller():
    """An operator moved the poller to a crontab (django-celery-beat's admin): ``migrate``
    must keep it, not set an interval beside it (which beat refuses: one schedule per task)."""
    from django_celery_beat.models import CrontabSchedule

    register_poller()
    crontab = CrontabSchedule.objects.create(minute="*")
    PeriodicTask.objects.filter(name=PERIODIC_TASK_NAME).update(interval=None, crontab=crontab)
    call_command("migrate", verbosity=0)
    task = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    assert (task.interval_id, task.crontab_id) == (None, crontab.pk)
    # Asked for explicitly, the interval replaces it.
    call_command("batchframework_register_poller", stdout=io.StringIO())
    task = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    assert (task.interval.every, task.crontab_id) == (1, None)


def test_migrate_keeps_an_operators_expiry_date_for_the_poller():
    """django-celery-beat takes an expiry date or an expiry in seconds, not both: ``migrate``
    set the seconds beside an operator's date, and failed on every deploy."""
    task, _ = register_poller()
    expires = timezone.now() + timedelta(days=365)
    PeriodicTask.objects.filter(pk=task.pk).update(expire_seconds=None, expires=expires)
    call_command("migrate", verbosity=0)
    task = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    assert (task.expires, task.expire_seconds) == (expires, None)
    # Asked for explicitly, the library's expiry replaces it.
    call_command("batchframework_register_poller", stdout=io.StringIO())
    task = PeriodicTask.objects.get(name=PERIODIC_TASK_NAME)
    assert task.expires is None and task.expire_seconds == 2


def test_a_task_run_eagerly_inside_a_transaction_leaves_its_connection_alone():
    """An eager task runs in the caller's transaction (a test's atomic block): even after an
    earlier database error, its check of the connection must not close it there."""
    with transaction.atomic():
        connection.errors_occurred = True  # as after any DatabaseError the caller caught
        assert reconnecting(None, lambda: BatchOperation.objects.count()) == 0
        assert not connection.needs_rollback
        assert BatchOperation.objects.count() == 0  # the transaction still works
    connection.errors_occurred = False


@pytest.mark.skipif(connection.vendor != "postgresql", reason="pg_terminate_backend")
def test_a_task_after_a_database_error_it_saw_starts_on_a_new_session(caplog):
    """Django marks a connection whose query failed; the task's check replaces it if its session
    is gone, so the first use runs once, on a new session, with no failed attempt."""
    with pytest.raises(OperationalError), connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert connection.errors_occurred
    calls = []

    def first_use():
        calls.append(connection.connection)
        return BatchOperation.objects.count()

    with caplog.at_level(logging.INFO, logger="batchframework"):
        assert reconnecting(None, first_use) == 0
    assert len(calls) == 1
    assert "database_reconnect" not in caplog.text


@pytest.mark.skipif(connection.vendor != "postgresql", reason="pg_terminate_backend")
@pytest.mark.parametrize("task", ["run_operations", "drain"])
def test_a_claim_that_committed_before_its_session_was_lost_is_run(monkeypatch, task):
    """The claim's COMMIT went through and the session died before its answer arrived. The
    task claimed again on a new session, found the operation running and did nothing: it
    waited for its lease to expire and was then failed as a lost worker's, never having run."""
    real_claim_due = tasks_module.claim_due

    def committed_then_lost(**kwargs):
        claimed = real_claim_due(**kwargs)
        monkeypatch.setattr(tasks_module, "claim_due", real_claim_due)  # only the first
        with pytest.raises(OperationalError), connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        raise OperationalError(f"the answer to the claim of {len(claimed)} was lost")

    with override_settings(BATCHFRAMEWORK=NO_DISPATCH):
        op = enqueue("test-effect")
    monkeypatch.setattr(tasks_module, "claim_due", committed_then_lost)
    if task == "run_operations":
        assert tasks_module.run_operations([op.pk]) == 1
    else:
        assert tasks_module.drain(op.queue) == 1
    stored = BatchOperation.objects.get(pk=op.pk)
    assert (stored.result, stored.attempts) == (BatchOperation.RESULT_SUCCESSFUL, 1)
    assert executions(op.pk) == 1


def test_beat_schedule_is_the_plain_alternative():
    entry = beat_schedule()["batchframework-poll"]
    assert entry["task"] == POLL_TASK and entry["schedule"] == 1
    assert entry["options"] == {"expires": 2, "queue": "default"}


def test_beat_schedule_works_in_a_celery_module_before_django_is_set_up():
    """As docs/celery.rst shows it: in ``proj/celery.py``, which Django imports from
    ``proj/__init__.py`` before its apps are loaded."""
    code = """
from celery import Celery
from batchframework_celery.beat import beat_schedule
app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.beat_schedule = {**app.conf.beat_schedule, **beat_schedule()}
print(app.conf.beat_schedule["batchframework-poll"]["task"])
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == POLL_TASK


def _ids(messages):
    return {m.id for m in messages}


def test_check_warns_when_the_horizon_nears_the_visibility_timeout(celery_conf):
    assert "batchframework_celery.W001" not in _ids(check_celery())  # 10 s vs 60 s
    celery_conf(broker_transport_options={"visibility_timeout": 15})
    assert "batchframework_celery.W001" in _ids(check_celery())
    celery_conf(broker_transport_options={})  # Celery's default: one hour
    assert "batchframework_celery.W001" not in _ids(check_celery())
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 3600}):
        assert "batchframework_celery.W001" in _ids(check_celery())
    # RabbitMQ has no visibility timeout.
    celery_conf(
        broker_url="amqp://guest:guest@127.0.0.1:5672//",
        broker_transport_options={"visibility_timeout": 15},
    )
    assert "batchframework_celery.W001" not in _ids(check_celery())


def test_the_visibility_timeout_check_knows_sqs_and_kombus_ways_of_saying_default(celery_conf):
    """SQS's default visibility timeout is half Redis's (kombu: 1800 s), a timeout of None or
    "" means that default (and crashed ``manage.py check``), and kombu takes a scheme in
    capitals."""
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 1200}):
        celery_conf(broker_url="sqs://", broker_transport_options={})
        assert "batchframework_celery.W001" in _ids(check_celery())
        celery_conf(broker_transport_options={"visibility_timeout": None})
        assert "batchframework_celery.W001" in _ids(check_celery())
        celery_conf(broker_url="REDIS://127.0.0.1:6379/9", broker_transport_options={})
        assert "batchframework_celery.W001" not in _ids(check_celery())  # 1200 s vs 3600 s
        celery_conf(broker_transport_options={"visibility_timeout": 600})
        assert "batchframework_celery.W001" in _ids(check_celery())
        celery_conf(broker_transport_options={"visibility_timeout": "soon"})
        [warning] = [m for m in check_celery() if m.id == "batchframework_celery.W001"]
        assert "not a number" in warning.msg


def test_check_warns_when_the_horizon_nears_rabbitmqs_consumer_timeout(celery_conf):
    """RabbitMQ closes the channel of a consumer holding a message unacknowledged for longer
    than its consumer_timeout (30 minutes by default), as Celery holds an ETA message."""
    celery_conf(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert "batchframework_celery.W008" not in _ids(check_celery())  # 10 s
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 900}):
        assert "batchframework_celery.W008" not in _ids(check_celery())
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 901}):
        assert "batchframework_celery.W008" in _ids(check_celery())
        celery_conf(broker_url="redis://127.0.0.1:6379/0")
        assert "batchframework_celery.W008" not in _ids(check_celery())
        # Failover lists: the first is the one connected to.
        celery_conf(broker_url="amqp://a//;amqp://b//")
        assert "batchframework_celery.W008" in _ids(check_celery())
        # Workers hold ETA messages where they consume: broker_read_url, when it is set.
        celery_conf(broker_url="redis://127.0.0.1:6379/0", broker_read_url="amqp://a//")
        assert "batchframework_celery.W008" in _ids(check_celery())
        celery_conf(broker_url="amqp://a//", broker_read_url="redis://127.0.0.1:6379/0")
        assert "batchframework_celery.W008" not in _ids(check_celery())
    # A list in the settings (the environment's CELERY_BROKER_URL, which the fixture sets,
    # is a string); unset means Celery's default, RabbitMQ.
    assert _first_broker_url(["pyamqp://a//", "redis://b"]) == "pyamqp://a//"
    assert _first_broker_url(None) == "amqp://"


def test_check_warns_when_no_celery_app_is_loaded(monkeypatch):
    """A web process whose project never imports its Celery app (no ``proj/__init__.py``
    import) would publish through Celery's made-up default app, to another broker."""
    import celery._state

    assert "batchframework_celery.W006" not in _ids(check_wiring())
    monkeypatch.setattr(celery._state._tls, "current_app", None)
    monkeypatch.setattr(celery._state, "default_app", None)
    assert "batchframework_celery.W006" in _ids(check_wiring())


def test_check_takes_a_project_app_named_default_for_a_loaded_app(monkeypatch):
    """Celery's made-up app is named "default"; a project may name its own app so too."""
    import celery._state
    from celery import Celery

    monkeypatch.setattr(celery._state._tls, "current_app", None)
    monkeypatch.setattr(celery._state, "default_app", None)
    project_app = Celery("default", set_as_current=False)
    project_app.set_default()
    assert "batchframework_celery.W006" not in _ids(check_wiring())


def test_check_warns_when_nothing_schedules_the_poller(celery_conf, monkeypatch):
    from django.apps import apps

    assert "batchframework_celery.W007" not in _ids(check_wiring())
    installed = apps.is_installed
    monkeypatch.setattr(
        apps, "is_installed", lambda name: name != "django_celery_beat" and installed(name)
    )
    assert "batchframework_celery.W007" in _ids(check_wiring())
    celery_conf(beat_schedule=beat_schedule())  # the docs' way without the database scheduler
    assert "batchframework_celery.W007" not in _ids(check_wiring())


def test_check_warns_when_celery_accepts_pickle(celery_conf):
    assert "batchframework_celery.W002" not in _ids(check_celery())
    celery_conf(accept_content=["json", "pickle"])
    assert "batchframework_celery.W002" in _ids(check_celery())
    celery_conf(accept_content=["json"], task_serializer="pickle")
    assert "batchframework_celery.W002" in _ids(check_celery())


def test_check_warns_when_the_horizon_is_shorter_than_two_poll_intervals():
    assert "batchframework_celery.W003" not in _ids(check_celery())
    with override_settings(
        BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 1, "POLL_INTERVAL": 1}
    ):
        assert "batchframework_celery.W003" in _ids(check_celery())


def test_deploy_check_warns_when_workers_reconnect_around_every_task():
    assert "batchframework_celery.W004" in _ids(check_worker_connections())
    celery_app.conf.update(CELERY_DB_REUSE_MAX=1000)
    try:
        assert "batchframework_celery.W004" not in _ids(check_worker_connections())
    finally:
        celery_app.conf.update(CELERY_DB_REUSE_MAX=None)
    assert "batchframework_celery.W004" in _ids(check_worker_connections())


@pytest.mark.parametrize("dispatcher", ["CeleryDispatcher", "RelayDispatcher"])
def test_eager_mode_runs_due_operations_at_commit_and_leaves_delayed_ones_to_run_due(
    celery_conf, caplog, dispatcher
):
    # No broker is needed (or touched) in eager mode.
    celery_conf(task_always_eager=True, broker_url="redis://127.0.0.1:1/15")
    caplog.set_level(logging.WARNING, logger="batchframework")
    threads: list[int] = []

    def record_thread(sender, operation, **kwargs):
        threads.append(threading.get_ident())

    eager = {**CELERY_DISPATCHER, "DISPATCHER": f"batchframework_celery.dispatcher.{dispatcher}"}
    operation_started.connect(record_thread)
    try:
        with override_settings(BATCHFRAMEWORK=eager):
            now = enqueue("test-effect")
            later = enqueue("test-effect", delay=timedelta(seconds=5))
    finally:
        operation_started.disconnect(record_thread)
    assert_ran_once_each([now.pk])
    # In the caller's thread, as Celery's eager mode runs any task (not announced to a relay,
    # nor handed to the publishing thread).
    assert threads == [threading.get_ident()]
    later.refresh_from_db()
    assert (later.status, executions(later.pk)) == (BatchOperation.STATUS_UNPROCESSED, 0)
    assert not [r for r in caplog.records if "publish_failed" in r.getMessage()]
    assert run_due() == []  # never early
    assert [op.pk for op in run_due(now=timezone.now() + timedelta(seconds=6))] == [later.pk]
    assert_ran_once_each([now.pk, later.pk])


def test_eager_mode_leaves_a_failed_attempts_retry_to_run_due(celery_conf):
    """Eager mode runs a task where it is published: a retry dispatched from the failed
    attempt's finish would run inside it, and a handler that keeps failing would nest all its
    attempts (each traceback chaining the ones before). As with ``ALWAYS_SYNCHRONOUS``, the
    retry is left to ``run_due``."""
    celery_conf(task_always_eager=True, broker_url="redis://127.0.0.1:1/15")
    with override_settings(BATCHFRAMEWORK=CELERY_DISPATCHER):
        op = enqueue("test-always-fails")  # max_attempts=3, retry_backoff=0
    op.refresh_from_db()
    assert (op.attempts, op.status, executions(op.pk)) == (1, BatchOperation.STATUS_UNPROCESSED, 1)
    for attempt in (2, 3):
        assert [o.pk for o in run_due()] == [op.pk]
        op.refresh_from_db()
        assert op.attempts == attempt
    assert op.result == BatchOperation.RESULT_FAILED
    assert "During handling of the above exception" not in op.last_error


def test_always_synchronous_runs_due_operations_at_commit():
    settings = {k: v for k, v in NO_DISPATCH.items() if k != "DISPATCHER"}
    with override_settings(BATCHFRAMEWORK={**settings, "ALWAYS_SYNCHRONOUS": True}):
        now = enqueue("test-effect")
        later = enqueue("test-effect", delay=timedelta(seconds=5))
    assert_ran_once_each([now.pk])
    assert executions(later.pk) == 0
    assert [op.pk for op in run_due(now=timezone.now() + timedelta(seconds=6))] == [later.pk]


@pytest.fixture
def celery_knows_only_the_default_queue(monkeypatch):
    """``CELERY_TASK_CREATE_MISSING_QUEUES = False`` and ``CELERY_TASK_QUEUES`` without the
    queue of ``test-other-queue``'s handler ("other"), say a handler added later whose queue
    nobody added: Celery raises ``QueueNotFound`` for it."""
    queues = celery_app.amqp.queues
    queues["default"]  # created now, while missing queues still may be
    saved = queues.pop("other", None)
    monkeypatch.setattr(queues, "create_missing", False)
    yield
    if saved is not None:
        queues["other"] = saved


def test_a_queue_celery_cannot_route_to_fails_alone_in_the_poller(
    purge_broker, celery_knows_only_the_default_queue, caplog
):
    """One unroutable queue is logged (``publish_unroutable``) and its operations wait in the
    database; the tick still wakes workers for the other queues and publishes its window."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    with override_settings(BATCHFRAMEWORK={**NO_DISPATCH, "DISPATCH_HORIZON": 1}):
        enqueue("test-other-queue")
        enqueue("test-noop")  # due in "default", without a message
        enqueue("test-noop", delay=1.2)  # beyond the horizon: in the tick's window
        result = poll_once()
    assert purge_broker.waiting("default") == 2, result  # a drain and an ETA message
    assert result["publish_failures"] == 1
    assert "event=publish_unroutable" in caplog.text and "queue=other" in caplog.text
    assert "event=publish_failed" not in caplog.text  # not taken for a broker outage


def test_a_queue_celery_cannot_route_to_does_not_stop_publishing_to_the_others(
    celery_dispatch, celery_knows_only_the_default_queue, caplog
):
    """The web side: the unroutable round is not taken for a broker outage, so the next
    enqueue, to a queue Celery knows, is published at once rather than skipped."""
    caplog.set_level(logging.WARNING, logger="batchframework")
    enqueue("test-other-queue")
    enqueue("test-noop")
    assert celery_dispatch.waiting("default") == 1, caplog.text
    assert "event=publish_skipped" not in caplog.text
