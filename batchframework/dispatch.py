"""Dispatchers: what happens to operations once their enqueuing transaction commits.

A dispatcher only decides *when and where* to ask the engine to run an operation; the engine
decides *whether* it may. Dispatch is best effort: if it fails, the operation is still stored
and a poller (the DB worker or the Celery beat poller) runs it when it is due: the database,
not the broker, is the source of truth.
"""

from __future__ import annotations

import abc
import functools
import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from .conf import get_settings
from .signals import log_event

if TYPE_CHECKING:
    from .models import BatchOperation

CELERY_DISPATCHER = "batchframework_celery.dispatcher.CeleryDispatcher"
IMMEDIATE_DISPATCHER = "batchframework.dispatch.ImmediateDispatcher"
NULL_DISPATCHER = "batchframework.dispatch.NullDispatcher"


class Dispatcher(abc.ABC):
    """Interface of a dispatcher. Subclasses implement :meth:`dispatch`."""

    #: ``False`` lets ``enqueue`` skip registering an on-commit callback at all.
    dispatches_anything: ClassVar[bool] = True
    #: Whether an operation put back for another attempt (a failed attempt with attempts left)
    #: is dispatched again, with its new ``run_after``, once the failure is recorded. A retry
    #: whose back-off is shorter than the poller's look-ahead would otherwise wait for the
    #: poller's next drain.
    dispatches_retries: ClassVar[bool] = True

    @abc.abstractmethod
    def dispatch(self, operations: Sequence[BatchOperation], *, using: str) -> None:
        """Hand committed operations on. May raise; :meth:`dispatch_safely` logs it."""

    def notify_channel(self, using: str) -> str | None:
        """A PostgreSQL channel on which ``enqueue`` announces new operations instead.

        For a channel, ``enqueue`` sends ``NOTIFY <channel>, '<id>'`` in the statement that
        inserts the operation and registers no on-commit callback: PostgreSQL delivers the
        notification only once the transaction commits (invariant 5), and a listener in another
        process hands the operation on (see ``batchframework_celery``'s relay). Only asked for
        PostgreSQL databases. ``None``, the default: :meth:`dispatch` after commit.
        """
        return None

    def dispatch_safely(self, operations: Sequence[BatchOperation], *, using: str) -> None:
        """Dispatch, never raising into the caller of ``enqueue``: a failure is logged and the
        operations are left for the poller."""
        try:
            self.dispatch(operations, using=using)
        except Exception as exc:
            log_event(
                logging.WARNING,
                "dispatch_failed",
                count=len(operations),
                first_id=operations[0].pk if operations else "",
                error=repr(exc),
                fallback="poller",
            )


class NullDispatcher(Dispatcher):
    """Dispatches nothing: a DB-polling worker (``batchframework_worker``) runs operations."""

    dispatches_anything = False

    def dispatch(self, operations: Sequence[BatchOperation], *, using: str) -> None:
        return None


class ImmediateDispatcher(Dispatcher):
    """Runs due operations in the committing process, through the same claim as a worker.

    Used for ``ALWAYS_SYNCHRONOUS``. Operations that are not yet due are left for
    :func:`batchframework.testing.run_due` or a worker: never early, even in development.
    Retries too: one due at once would otherwise run inside its failed attempt's finish, and
    the attempts of a handler that keeps failing would nest.
    """

    dispatches_retries = False

    def dispatch(self, operations: Sequence[BatchOperation], *, using: str) -> None:
        from .clock import database_now
        from .engine import run

        # The database's clock, as enqueue's due time: a process clock running fast must not
        # make an operation due early. (Within clock.NOISE the two count as the same.)
        now = database_now(using)
        for operation in operations:
            if operation.run_after <= now:
                run(operation.pk, using=using, now=now)
            else:
                log_event(
                    logging.DEBUG,
                    "dispatch_deferred",
                    id=operation.pk,
                    reason="not_due",
                    run_after=operation.run_after.isoformat(),
                )


def dispatcher_path() -> str:
    settings = get_settings()
    if settings.DISPATCHER:
        return settings.DISPATCHER
    if settings.ALWAYS_SYNCHRONOUS:
        return IMMEDIATE_DISPATCHER
    if apps.is_installed("batchframework_celery"):
        return CELERY_DISPATCHER
    return NULL_DISPATCHER


@functools.cache
def get_dispatcher() -> Dispatcher:
    """The configured dispatcher instance (cached until settings change).

    Raises ``ImproperlyConfigured`` when ``DISPATCHER`` can't be imported, is not a
    :class:`Dispatcher` subclass, or is abstract (system check ``batchframework.E005`` says so
    at startup)."""
    path = dispatcher_path()
    try:
        found = load_dispatcher_class(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"The dispatcher {path!r} (BATCHFRAMEWORK['DISPATCHER'], or the default) can't be "
            f"imported: {exc}"
        ) from exc
    return found()


class NotADispatcherError(ImproperlyConfigured):
    """``DISPATCHER`` names something that is not a :class:`Dispatcher` subclass."""


class AbstractDispatcherError(ImproperlyConfigured):
    """``DISPATCHER`` is a :class:`Dispatcher` subclass that leaves abstract methods
    unimplemented, so it can't be instantiated. ``problem`` is what system check
    ``batchframework.E005`` says of it."""

    def __init__(self, path: str, found: type[Dispatcher]) -> None:
        missing = ", ".join(sorted(found.__abstractmethods__))
        self.problem = f"is an abstract Dispatcher subclass: it does not implement {missing}."
        super().__init__(f"BATCHFRAMEWORK['DISPATCHER'] = {path!r} {self.problem}")


def load_dispatcher_class(path: str) -> type[Dispatcher]:
    """The dispatcher class at ``path``: ``ImportError`` if it can't be imported,
    ``ImproperlyConfigured`` if it is not a :class:`Dispatcher` subclass or is abstract."""
    found: Any = import_string(path)
    if not (isinstance(found, type) and issubclass(found, Dispatcher)):
        raise NotADispatcherError(
            f"BATCHFRAMEWORK['DISPATCHER'] = {path!r} is not a "
            "batchframework.dispatch.Dispatcher subclass."
        )
    if inspect.isabstract(found):
        # Checked here, not left to instantiation: that raised a bare TypeError in every
        # enqueue, and the system check passed it (the base class itself, or a subclass whose
        # ``dispatch`` is misspelled).
        raise AbstractDispatcherError(path, found)
    return found


@receiver(setting_changed)
def _reset_dispatcher(*, setting: str, **kwargs: Any) -> None:
    if setting in ("BATCHFRAMEWORK", "INSTALLED_APPS"):
        get_dispatcher.cache_clear()
