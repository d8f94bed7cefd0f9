"""Registering the poller with celery beat, idempotently.

With django-celery-beat's ``DatabaseScheduler``, :func:`register_poller` creates or updates one
``PeriodicTask`` (named :data:`PERIODIC_TASK_NAME`) running ``batchframework.poll`` every
``POLL_INTERVAL`` (exactly: the poller's window and expiries assume ticks that far apart); it
runs after ``migrate`` (while batchframework's migrations are applied) and from ``manage.py
batchframework_register_poller``.
Without the database scheduler, put :func:`beat_schedule` into Celery's ``beat_schedule``; this
module can be imported from a project's ``celery.py``, before Django's apps are loaded.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.apps import apps as global_apps
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, IntegrityError, transaction

from batchframework.conf import get_settings

from .names import POLL_TASK

PERIODIC_TASK_NAME = "batchframework: poll for due operations"

#: The largest ``IntervalSchedule.every`` (a 32-bit integer column): in microseconds, 35 minutes.
MAX_EVERY = 2**31 - 1


def beat_schedule() -> dict[str, dict[str, Any]]:
    """A ``beat_schedule`` entry for projects that don't use the database scheduler::

    app.conf.beat_schedule = {**app.conf.beat_schedule, **beat_schedule()}
    """
    settings = get_settings()
    seconds = settings.POLL_INTERVAL.total_seconds()
    return {
        "batchframework-poll": {
            "task": POLL_TASK,
            "schedule": seconds,
            "options": {"expires": seconds * 2, "queue": settings.DEFAULT_QUEUE},
        }
    }


def register_poller(
    *, using: str | None = None, queue: str | None = None, keep_choices: bool = False
) -> tuple[Any, bool]:
    """Create or update the poller's ``PeriodicTask``. Returns ``(task, changed)``.

    Running it again with the same settings changes nothing; a changed ``POLL_INTERVAL``
    updates the existing row instead of adding a second one. The poll task goes to ``queue``,
    by default ``DEFAULT_QUEUE`` (which every deployment's workers consume): Celery's own default
    queue, ``celery``, is not consumed by workers started with ``-Q default,…``; and it is
    enabled. With ``keep_choices`` (as after ``migrate``), an existing task keeps its queue and
    whether it is enabled: only its schedule follows ``POLL_INTERVAL``. ``using`` defaults to
    the database the router picks for ``PeriodicTask``.
    """
    from django.db import router
    from django_celery_beat.models import PeriodicTask

    settings = get_settings()
    using = using or router.db_for_write(PeriodicTask) or DEFAULT_DB_ALIAS
    try:
        return _register(using, queue or settings.DEFAULT_QUEUE, keep_choices)
    except (IntegrityError, ValidationError):
        # Another process (a second deployment's migrate) created the task since we looked:
        # the unique name stopped our twin, in the database or in django-celery-beat's check
        # before the INSERT. Now it exists, and this is an update (anything else raises again).
        return _register(using, queue or settings.DEFAULT_QUEUE, keep_choices)


def _interval(poll: timedelta) -> tuple[int, str]:
    """``POLL_INTERVAL`` as an ``IntervalSchedule``'s ``(every, period)``, exactly.

    The poller's window (one and a half intervals ahead) and its drains' expiry (two) assume
    beat ticks every ``POLL_INTERVAL``: ticks further apart than that would leave operations
    due in between without their ETA message, late by up to the difference. Whole seconds are
    stored as seconds, a fraction as microseconds. Only an interval with a fraction of a second
    that is too long for microseconds (over 35 minutes) is cut to whole seconds: ticks a
    fraction of a second early only overlap, which the poller's watermark makes harmless.
    """
    from django_celery_beat.models import IntervalSchedule

    seconds, fraction = divmod(poll, timedelta(seconds=1))
    if not fraction or poll > timedelta(microseconds=MAX_EVERY):
        return seconds, IntervalSchedule.SECONDS
    return poll // timedelta(microseconds=1), IntervalSchedule.MICROSECONDS


def _register(using: str, queue: str, keep_choices: bool) -> tuple[Any, bool]:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    poll = get_settings().POLL_INTERVAL
    every, period = _interval(poll)
    with transaction.atomic(using=using):
        schedules = IntervalSchedule.objects.using(using)
        # Not get_or_create: nothing makes these rows unique (the admin, or two deployments'
        # migrate at once, can add a twin), and a twin would make it raise on every migrate.
        schedule = schedules.filter(every=every, period=period).order_by(
            "pk"
        ).first() or schedules.create(every=every, period=period)
        wanted = {
            "task": POLL_TASK,
            "interval": schedule,
            "enabled": True,
            "queue": queue,
            # A tick that waited longer than two intervals is stale: the next one will do.
            # (Whole seconds: django-celery-beat stores no fraction, so rounded up.)
            "expire_seconds": math.ceil(poll.total_seconds() * 2),
        }
        task = (
            PeriodicTask.objects.using(using)
            .select_for_update()
            .filter(name=PERIODIC_TASK_NAME)
            .first()
        )
        if task is None:
            task = PeriodicTask.objects.using(using).create(name=PERIODIC_TASK_NAME, **wanted)
            return task, True
        if keep_choices:  # an operator's: a queue of their choice, a poller they disabled
            wanted.update(queue=task.queue, enabled=task.enabled)
            if task.interval_id is None:  # a schedule of another kind (crontab, solar, ...)
                del wanted["interval"]
            if task.expires is not None:  # an expiry date of theirs (beat takes one or the other)
                del wanted["expire_seconds"]
        else:  # asked for this schedule: it replaces one of another kind (one per task)
            wanted.update(crontab=None, solar=None, clocked=None, expires=None)
        changed = [name for name, value in wanted.items() if getattr(task, name) != value]
        if changed:
            for name in changed:
                setattr(task, name, wanted[name])
            task.save(using=using)
        return task, bool(changed)


def register_poller_after_migrate(
    sender: Any, using: str = DEFAULT_DB_ALIAS, apps: Any = global_apps, **kwargs: Any
) -> None:
    """``post_migrate`` receiver: register the poller once django-celery-beat's tables exist,
    while the tables it polls are migrated."""
    if not global_apps.is_installed("django_celery_beat"):
        return
    if getattr(sender, "label", None) != "batchframework_celery":
        return
    # ``apps`` is the state this migrate left ``using`` in (as for Django's own content types
    # and permissions): after ``migrate batchframework zero`` it has no BatchOperation, and a
    # task registered now would have beat poll tables that are gone. (Not the tables
    # themselves: with a router, operations may live in another database than beat's.)
    try:
        apps.get_model("batchframework", "BatchOperation")
        apps.get_model("batchframework_celery", "PollerWatermark")
    except LookupError:
        return
    from django.db import connections, router
    from django_celery_beat.models import PeriodicTask

    # Only where beat reads its schedule: a project with several databases migrates each, and
    # django-celery-beat validates a new task's name against its routed database.
    if router.db_for_write(PeriodicTask) != using:
        return
    tables = connections[using].introspection.table_names()
    if "django_celery_beat_periodictask" not in tables:
        return
    register_poller(using=using, keep_choices=True)
