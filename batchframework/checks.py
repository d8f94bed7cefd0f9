"""System checks: configuration mistakes are reported by ``manage.py check`` with a hint."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .conf import BatchframeworkSettings, get_settings


def _hint_settings() -> str:
    return "See the settings reference in the batchframework docs (docs/settings.rst)."


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    if not settings.USE_TZ:
        messages.append(
            checks.Error(
                "batchframework needs USE_TZ = True.",
                hint="Due times are compared on the database clock in UTC; naive datetimes are "
                "ambiguous. Set USE_TZ = True (Django's default).",
                id="batchframework.E001",
            )
        )
    try:
        conf: BatchframeworkSettings = get_settings()
    except (ImproperlyConfigured, TypeError) as exc:
        messages.append(
            checks.Error(
                f"Invalid BATCHFRAMEWORK setting: {exc}",
                hint=_hint_settings(),
                # E003/E004: a number out of range; E002: anything else unusable.
                id=getattr(exc, "check_id", "batchframework.E002"),
            )
        )
        return messages
    if conf.DISPATCHER:
        problem = _dispatcher_problem(conf.DISPATCHER)
        if problem:
            messages.append(
                checks.Error(
                    f"BATCHFRAMEWORK['DISPATCHER'] = {conf.DISPATCHER!r} {problem}",
                    hint="Use a dotted path to a batchframework.dispatch.Dispatcher subclass, or "
                    "leave it unset to pick one automatically.",
                    id="batchframework.E005",
                )
            )
    if conf.POLL_INTERVAL > conf.DEFAULT_LEASE:
        messages.append(
            checks.Warning(
                "BATCHFRAMEWORK['POLL_INTERVAL'] is longer than DEFAULT_LEASE.",
                hint="Lost workers are only noticed on a poll; keep the poll interval shorter "
                "than the lease.",
                id="batchframework.W001",
            )
        )
    return messages


@checks.register()
def check_routes(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .registry import registry

    try:
        routes = get_settings().ROUTES
    except ImproperlyConfigured:
        return []  # reported by check_settings
    return [
        checks.Warning(
            f"BATCHFRAMEWORK['ROUTES'] routes {operationtype!r}, which has no registered handler.",
            hint=f"Registered operationtypes: {', '.join(registry.operationtypes()) or 'none'}. "
            "Check the spelling, or that the handler module is discovered.",
            id="batchframework.W002",
        )
        for operationtype in routes
        if operationtype not in registry
    ]


@checks.register(checks.Tags.database)
def check_sqlite_transaction_mode(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """SQLite's default deferred transactions make concurrent workers fail with "database is
    locked" instead of waiting; IMMEDIATE makes them queue for the write lock."""
    from django.db import connections

    messages: list[checks.CheckMessage] = []
    for alias in databases or []:
        if connections[alias].vendor != "sqlite":  # SpatiaLite too
            continue
        options = connections[alias].settings_dict.get("OPTIONS") or {}
        # EXCLUSIVE also takes the write lock at BEGIN: writers wait for each other.
        if str(options.get("transaction_mode", "")).upper() not in ("IMMEDIATE", "EXCLUSIVE"):
            messages.append(
                checks.Warning(
                    f"Database {alias!r} is SQLite without transaction_mode IMMEDIATE.",
                    hint='Set DATABASES[...]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", '
                    '"timeout": 30} so that a worker and the web process (or several workers) '
                    'wait for each other instead of failing with "database is locked".',
                    id="batchframework.W003",
                )
            )
    return messages


def _dispatcher_problem(path: str) -> str | None:
    from .dispatch import AbstractDispatcherError, NotADispatcherError, load_dispatcher_class

    try:
        load_dispatcher_class(path)
    except AbstractDispatcherError as exc:
        return exc.problem
    except NotADispatcherError:
        return "is not a Dispatcher subclass."
    except ImportError as exc:
        return f"cannot be imported: {exc}"
    except Exception as exc:  # its module raised while importing (ImproperlyConfigured...)
        return f"cannot be imported: {exc!r}"
    return None
