"""The library's settings: one typed, documented object read from ``settings.BATCHFRAMEWORK``.

Settings are resolved once and cached; the cache is dropped on Django's ``setting_changed``
signal so ``override_settings`` works in tests. Every default is documented on
:class:`BatchframeworkSettings` and in ``docs/settings.rst``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

SETTING_NAME = "BATCHFRAMEWORK"

#: The longest duration any setting or handler option may have: far beyond any sensible value,
#: and short enough that a time that far from now is still one every database can store.
MAX_DURATION = timedelta(days=36525)  # a hundred years
#: The longest pause between polls: ``POLL_INTERVAL``, a worker's ``--poll-interval``.
MAX_POLL_INTERVAL = timedelta(days=1)
#: The shortest lease: the lease keeper renews a running handler's lease every third of it,
#: at most every 0.2 s; a shorter lease would run out under a live worker.
MIN_LEASE = timedelta(seconds=1)
#: The most operations one claim may take (``BATCH_SIZE``, ``--batch-size``): far beyond any
#: sensible batch, and far below what overflows a query's LIMIT (recovery reads ten batches'
#: worth per pass).
MAX_BATCH_SIZE = 1_000_000


class InvalidSettingError(ImproperlyConfigured):
    """A ``BATCHFRAMEWORK`` value that can't be used; ``check_id`` is the system check that
    reports it (``manage.py check``), though it stops every process at startup first."""

    def __init__(self, message: str, check_id: str = "batchframework.E002") -> None:
        super().__init__(message)
        self.check_id = check_id


def _invalid(
    name: str, wanted: str, value: Any, check_id: str = "batchframework.E002"
) -> InvalidSettingError:
    return InvalidSettingError(
        f"{SETTING_NAME}[{name!r}] must be {wanted}, got {value!r}.", check_id
    )


def _as_timedelta(name: str, value: Any) -> timedelta:
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:  # isfinite() raises OverflowError too, for an int beyond any float
            if not math.isfinite(value):
                raise OverflowError
            duration = timedelta(seconds=value)
        except OverflowError:
            raise _invalid(name, "a finite number of seconds or a timedelta", value) from None
    else:
        raise _invalid(name, "a number of seconds or a timedelta", value)
    if name in _MAY_BE_ZERO:
        if duration < timedelta(0):
            raise _invalid(name, "zero or more", value, "batchframework.E004")
    elif duration <= timedelta(0):
        raise _invalid(name, "positive", value, "batchframework.E004")
    if duration > MAX_DURATION:
        raise _invalid(name, "at most a hundred years", value, "batchframework.E004")
    if name == "DEFAULT_LEASE" and duration < MIN_LEASE:
        raise _invalid(name, "at least a second", value, "batchframework.E004")
    if name == "POLL_INTERVAL" and duration > MAX_POLL_INTERVAL:
        # Workers sleep that long (a sleep of 1e10 s overflows), and beat stores it in a
        # 32-bit column.
        raise _invalid(name, "at most a day", value, "batchframework.E004")
    return duration


def _as_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, "an integer", value)
    if value < 1:
        raise _invalid(name, "a positive integer", value, "batchframework.E003")
    if name == "BATCH_SIZE" and value > MAX_BATCH_SIZE:
        raise _invalid(name, f"at most {MAX_BATCH_SIZE:,}", value, "batchframework.E003")
    return value


def is_queue_name(value: Any) -> bool:
    """Whether ``value`` fits the ``queue`` column and every broker: 1-100 characters, no NUL."""
    return isinstance(value, str) and 0 < len(value) <= MAX_QUEUE_LENGTH and "\x00" not in value


def _as_names(name: str, value: Any, what: str = "module names") -> tuple[str, ...]:
    # A bare string is a sequence of one-letter names: refused, not split.
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise _invalid(name, f"a list of {what}", value)


def _as_aliases(name: str, value: Any) -> tuple[str, ...]:
    aliases = _as_names(name, value, "database aliases")
    unknown = [alias for alias in aliases if alias not in django_settings.DATABASES]
    if unknown:
        raise _invalid(name, "aliases in DATABASES", unknown)
    return aliases


def _as_routes(name: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict) and all(
        isinstance(k, str) and is_queue_name(v) for k, v in value.items()
    ):
        return dict(value)
    raise _invalid(name, "a dict of operationtype to queue name (1-100 characters, no NUL)", value)


def _check_value(name: str, value: Any) -> None:
    if name in _FLAGS and not isinstance(value, bool):
        raise _invalid(name, "True or False", value)
    if name == "DEFAULT_QUEUE" and not is_queue_name(value):
        raise _invalid(name, "a queue name of 1-100 characters (no NUL)", value)
    if name == "DISPATCHER" and not (value is None or (isinstance(value, str) and value)):
        raise _invalid(name, "a dotted path or None", value)


#: Settings that are True or False (a string such as "False" would be truthy).
_FLAGS = frozenset({"ALWAYS_SYNCHRONOUS", "CORRECT_CLOCK_SKEW", "PUBLISH_IN_BACKGROUND"})
#: The ``queue`` column's length.
MAX_QUEUE_LENGTH = 100
#: Durations that may be zero (the others must be positive).
_MAY_BE_ZERO = frozenset({"DEFAULT_RETRY_BACKOFF", "FINISH_WINDOW"})
#: Settings that are positive integers.
_POSITIVE_INTS = frozenset({"BATCH_SIZE", "DEFAULT_MAX_ATTEMPTS", "MAX_INPUT_BYTES"})


@dataclasses.dataclass(frozen=True)
class BatchframeworkSettings:
    """All settings, with their defaults. Set any of them in ``settings.BATCHFRAMEWORK``."""

    #: Run operations that are due in-process when the enqueuing transaction commits, through
    #: the same claim as a worker. For development and tests. Delayed operations still wait
    #: for their due time (see :func:`batchframework.testing.run_due`).
    ALWAYS_SYNCHRONOUS: bool = False
    #: Compute due times from ``delay`` on the database clock (this process's clock corrected by
    #: its measured offset, refreshed every minute), so a web server with a slow clock can't
    #: make operations run early. Turn off in tests that freeze or move the process clock.
    CORRECT_CLOCK_SKEW: bool = True
    #: Dotted path of the dispatcher class. ``None`` picks one: the immediate dispatcher when
    #: ``ALWAYS_SYNCHRONOUS`` is set, the Celery dispatcher when ``batchframework_celery`` is
    #: installed, else no dispatch (a DB-polling worker runs operations).
    DISPATCHER: str | None = None
    #: Queue of operations whose handler names none.
    DEFAULT_QUEUE: str = "default"
    #: How long a claim is valid before another worker may recover the operation.
    DEFAULT_LEASE: timedelta = timedelta(minutes=5)
    #: Attempts of a handler that does not set ``max_attempts``.
    DEFAULT_MAX_ATTEMPTS: int = 1
    #: Base of the exponential backoff between attempts (``base * 2 ** (attempt - 1)``).
    DEFAULT_RETRY_BACKOFF: timedelta = timedelta(seconds=10)
    #: Longest delay between attempts: the backoff (a handler's own schedule too) stops
    #: growing there, and so stays a time the databases can store.
    MAX_RETRY_BACKOFF: timedelta = timedelta(days=1)
    #: How often pollers (the DB worker, the Celery beat poller) look for due operations.
    POLL_INTERVAL: timedelta = timedelta(seconds=5)
    #: How many operations one claim statement takes.
    BATCH_SIZE: int = 50
    #: Successful finishes of quick handlers are written together, one UPDATE per window (and
    #: at the end of each claimed batch). 0 writes each finish at once. A worker that dies
    #: within the window has those operations retried, as after any crash before a finish.
    FINISH_WINDOW: timedelta = timedelta(milliseconds=200)
    #: Largest accepted ``input_data``, as bytes of its JSON encoding.
    MAX_INPUT_BYTES: int = 1_000_000
    #: Module name looked up in every installed app to discover handlers.
    HANDLER_MODULES: tuple[str, ...] = ("batch_handlers",)
    #: Celery transport: operations due within this window are published with an ETA; the
    #: poller hands on those further out as they come due. Keep it well under the broker's
    #: visibility timeout.
    DISPATCH_HORIZON: timedelta = timedelta(minutes=5)
    #: Celery transport: map of operationtype to Celery queue, overriding handlers' queues.
    ROUTES: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Celery transport: longest time a publish may block the caller before it gives up and
    #: leaves the operation to the poller.
    PUBLISH_TIMEOUT: timedelta = timedelta(seconds=1)
    #: Celery transport: publish after commit on a background thread without waiting for the
    #: broker, so ``enqueue`` costs little more than its INSERT. A message still unsent when the
    #: process dies is not lost: the poller runs the operation when it is due.
    PUBLISH_IN_BACKGROUND: bool = False
    #: Celery transport: the databases the beat poller polls each tick, if not only the
    #: router's write database for ``BatchOperation``. List every database you ``enqueue``
    #: to with ``using=``: the poller alone hands on their operations due beyond the horizon,
    #: recovers their lost workers' and publishes those whose message was lost.
    POLL_DATABASES: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BatchframeworkSettings:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        _refuse_unknown_keys(values, fields)
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            default = getattr(cls, name, None)
            if isinstance(default, timedelta):
                value = _as_timedelta(name, value)
            elif name == "HANDLER_MODULES":
                value = _as_names(name, value)
            elif name == "POLL_DATABASES":
                value = _as_aliases(name, value)
            elif name == "ROUTES":
                value = _as_routes(name, value)
            elif name in _POSITIVE_INTS:
                value = _as_positive_int(name, value)
            else:
                _check_value(name, value)
            kwargs[name] = value
        return cls(**kwargs)


def _refuse_unknown_keys(values: dict[Any, Any], known: Collection[str]) -> None:
    """Raise ``ImproperlyConfigured`` (check E002) listing the keys that name no setting.

    Keys are shown and sorted by their ``repr``: a key need not be a string (``{1: 2}``), and
    joining or sorting the keys themselves raised a bare ``TypeError`` at startup instead."""
    unknown = sorted(repr(key) for key in values if key not in known)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown key(s) in {SETTING_NAME}: {', '.join(unknown)}. "
            f"Known keys: {', '.join(sorted(known))}."
        )


@functools.cache
def get_settings() -> BatchframeworkSettings:
    """Return the resolved settings (cached until a ``setting_changed`` signal)."""
    values = getattr(django_settings, SETTING_NAME, None)
    if values is None:
        return BatchframeworkSettings()
    if not isinstance(values, dict):
        raise ImproperlyConfigured(f"{SETTING_NAME} must be a dict, got {values!r}.")
    return BatchframeworkSettings.from_dict(values)


@receiver(setting_changed)
def _reset_on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        get_settings.cache_clear()
