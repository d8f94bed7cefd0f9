"""System checks for the Celery transport: horizon vs visibility timeout (Redis, SQS) or
consumer timeout (RabbitMQ), secure serializers,
a loaded Celery app and a scheduled poller, the relay's database and driver, and (with
``--deploy``) workers that reconnect to the database around every task."""

from __future__ import annotations

import re
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from batchframework.conf import get_settings

#: kombu's default visibility timeout, in seconds, by transport (Redis, its sentinels; SQS).
DEFAULT_VISIBILITY_TIMEOUTS = {"redis": 3600, "rediss": 3600, "sentinel": 3600, "sqs": 1800}
#: RabbitMQ's default ``consumer_timeout`` (since 3.8.17; 15 minutes in 3.8.15 and 3.8.16), in
#: seconds. A server setting: a client can't read it.
RABBITMQ_CONSUMER_TIMEOUT = 1800


def _celery_conf() -> Any:
    from celery import current_app

    return current_app.conf


@checks.register()
def check_celery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    conf = _celery_conf()
    try:
        settings = get_settings()
    except ImproperlyConfigured:
        return []  # reported as batchframework.E002 by batchframework's own checks
    # Workers consume, and so hold ETA messages, on broker_read_url (broker_url unless set).
    broker = _first_broker_url(conf.broker_read_url)
    scheme = broker.partition(":")[0].lower()  # kombu takes REDIS:// and SQS:// too
    options = conf.broker_transport_options or {}
    # How long a worker may hold an ETA message before the broker acts: Redis and SQS deliver
    # it again, RabbitMQ closes the consumer's channel.
    limit: tuple[float, str, str, str] | None = None
    if scheme in DEFAULT_VISIBILITY_TIMEOUTS:
        timeout = _visibility_timeout(options, DEFAULT_VISIBILITY_TIMEOUTS[scheme])
        if timeout is None:
            return [
                checks.Warning(
                    "broker_transport_options['visibility_timeout'] is not a number of "
                    f"seconds: {options.get('visibility_timeout')!r}.",
                    hint="Give it in seconds (kombu reads None or '' as its default).",
                    id="batchframework_celery.W001",
                ),
                *messages,
            ]
        limit = (
            timeout,
            "the broker's visibility timeout",
            "Messages with an ETA beyond the visibility timeout are delivered again, and wait "
            "in worker memory. Lower DISPATCH_HORIZON (the poller publishes operations due "
            "later as they come due) or raise visibility_timeout.",
            "batchframework_celery.W001",
        )
    elif scheme in ("amqp", "amqps", "pyamqp"):
        limit = (
            RABBITMQ_CONSUMER_TIMEOUT,
            "RabbitMQ's default consumer_timeout",
            "A worker holds a message with an ETA unacknowledged until it is due, and RabbitMQ "
            "closes the channel of a consumer that holds one longer than consumer_timeout "
            "(PRECONDITION_FAILED): the worker restarts, and the messages it held are delivered "
            "again. Lower DISPATCH_HORIZON, or silence this check (SILENCED_SYSTEM_CHECKS) if "
            "your server's consumer_timeout is raised, or your queues are quorum queues (Celery "
            "5.5+ then delays ETA messages in RabbitMQ, not in the worker).",
            "batchframework_celery.W008",
        )
    horizon = settings.DISPATCH_HORIZON.total_seconds()
    if limit is not None and horizon > limit[0] / 2:
        seconds, name, hint, check_id = limit
        messages.append(
            checks.Warning(
                f"BATCHFRAMEWORK['DISPATCH_HORIZON'] ({horizon:g}s) is more than half {name} "
                f"({seconds:g}s).",
                hint=hint,
                id=check_id,
            )
        )
    unsafe = {"pickle", "application/x-python-serialize", "yaml", "application/x-yaml"}
    accepted = set(conf.accept_content or [])
    if accepted & unsafe or conf.task_serializer in unsafe:
        messages.append(
            checks.Warning(
                "Celery accepts or produces pickle/yaml messages.",
                hint="batchframework messages carry only ids and need nothing but JSON. Set "
                "CELERY_ACCEPT_CONTENT = ['json'] and CELERY_TASK_SERIALIZER = 'json' so a message "
                "pushed onto the queue can't execute code in the worker.",
                id="batchframework_celery.W002",
            )
        )
    poll = settings.POLL_INTERVAL.total_seconds()
    if settings.DISPATCH_HORIZON.total_seconds() < poll * 2:
        messages.append(
            checks.Warning(
                "BATCHFRAMEWORK['DISPATCH_HORIZON'] is shorter than two poll intervals.",
                hint="The poller publishes operations due before its next tick; a horizon shorter "
                "than that leaves gaps in which operations are late by up to a poll interval.",
                id="batchframework_celery.W003",
            )
        )
    return messages


def _visibility_timeout(options: Any, default: float) -> float | None:
    """The visibility timeout the transport uses: its default for a value kombu takes as
    unset (``None``, ``""``), ``None`` for one that is no number."""
    value = options.get("visibility_timeout")
    if value is None or value == "":
        return float(default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first_broker_url(url: Any) -> str:
    """The broker Celery connects to first: ``broker_url`` may be a failover list (or a
    ``;``-separated string), and unset means Celery's default, RabbitMQ on localhost."""
    if isinstance(url, list | tuple):
        url = url[0] if url else None
    return str(url or "amqp://").split(";")[0].strip()


def _is_celerys_fallback_app(app: Any) -> bool:
    """Whether ``app`` is the app Celery makes up when no app was loaded in this process
    (it publishes to ``amqp://guest@localhost//``, whatever the project's settings say).

    Celery makes it with no fix-ups; a project's app, even one named ``"default"`` and made
    the default with ``set_default()``, has Celery's Django fix-up."""
    from celery import _state

    fallback = getattr(_state, "default_app", None)  # not in celery-types' stubs
    return fallback is not None and app is fallback and app.main == "default" and not app.fixups


@checks.register()
def check_wiring(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The two mistakes that leave operations silently unrun: no Celery app loaded in this
    process, and nothing that schedules the poller."""
    from celery import _state
    from django.apps import apps

    from .names import POLL_TASK

    messages: list[checks.CheckMessage] = []
    app = _state.get_current_app()
    if _is_celerys_fallback_app(app):
        messages.append(
            checks.Warning(
                "No Celery app is loaded in this process: enqueue would publish with Celery's "
                "defaults (amqp://guest@localhost//), not with your CELERY_* settings.",
                hint="Import your Celery app when Django starts: in proj/__init__.py, "
                "'from .celery import app as celery_app'.",
                id="batchframework_celery.W006",
            )
        )
        return messages  # the app's beat_schedule below would be the fallback's
    scheduled = any(
        isinstance(entry, dict) and entry.get("task") == POLL_TASK
        for entry in (app.conf.beat_schedule or {}).values()
    )
    if not scheduled and not apps.is_installed("django_celery_beat"):
        messages.append(
            checks.Warning(
                "Nothing schedules batchframework.poll: operations due beyond "
                "DISPATCH_HORIZON, and those whose message was lost, would never run.",
                hint="Add 'django_celery_beat' to INSTALLED_APPS (migrate registers the poller) "
                "and run beat with its DatabaseScheduler, or add "
                "batchframework_celery.beat.beat_schedule() to Celery's beat_schedule.",
                id="batchframework_celery.W007",
            )
        )
    return messages


@checks.register(deploy=True)
def check_worker_connections(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if _celery_conf().get("CELERY_DB_REUSE_MAX"):
        return []
    return [
        checks.Warning(
            "CELERY_DB_REUSE_MAX is not set: Celery's Django fix-up closes the database "
            "connection before and after every task.",
            hint="Every batchframework message then opens a new database connection, which "
            "costs several milliseconds of lateness and throughput per message. Set "
            "CELERY_DB_REUSE_MAX (e.g. 1000) in the workers' settings, with CONN_MAX_AGE and "
            "CONN_HEALTH_CHECKS = True.",
            id="batchframework_celery.W004",
        )
    ]


#: The oldest psycopg whose ``notifies()`` keeps notifications that arrive during a query.
RELAY_PSYCOPG = (3, 2, 4)


@checks.register()  # reads settings and the driver only, so plain ``manage.py check`` runs it
def check_relay(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``RelayDispatcher`` announces with NOTIFY on PostgreSQL; its relay needs psycopg 3.2.4+:
    its ``notifies()`` (3.2) with the backlog (3.2.4) that keeps the notifications arriving
    while the relay's connection runs a query, which earlier versions dropped."""
    from django.db import connections
    from django.utils.module_loading import import_string

    from batchframework.dispatch import dispatcher_path
    from batchframework.engine import write_alias

    from .dispatcher import RelayDispatcher

    try:
        dispatcher = import_string(dispatcher_path())
    except Exception:  # its module fails to import: batchframework.E005 says so
        return []
    if not (isinstance(dispatcher, type) and issubclass(dispatcher, RelayDispatcher)):
        return []
    try:
        alias = write_alias()
        connection = connections[alias]
    except Exception as exc:  # a router that raises, or names no database
        return [
            checks.Error(
                f"RelayDispatcher: the database router gives no usable database for "
                f"operations: {exc!r}.",
                hint="Fix DATABASE_ROUTERS' db_for_write for batchframework.BatchOperation.",
                id="batchframework_celery.E001",
            )
        ]
    if connection.vendor != "postgresql":
        return [
            checks.Warning(
                f"RelayDispatcher has no effect on {connection.vendor} (database {alias!r}): "
                "enqueue publishes after commit, as CeleryDispatcher does.",
                hint="The relay listens for PostgreSQL NOTIFY. Use CeleryDispatcher here.",
                id="batchframework_celery.W005",
            )
        ]
    driver = connection.Database  # type: ignore[attr-defined]  # the driver module
    version = tuple(int(part) for part in re.findall(r"\d+", driver.__version__)[:3])
    if driver.__name__ != "psycopg" or version < RELAY_PSYCOPG:
        return [
            checks.Error(
                f"RelayDispatcher's relay needs psycopg 3.2.4 or newer; database {alias!r} "
                f"uses {driver.__name__} {driver.__version__}.",
                hint="pip install 'psycopg[binary]>=3.2.4', or use CeleryDispatcher.",
                id="batchframework_celery.E001",
            )
        ]
    return []
