"""The handler registry and the ``@handler`` decorator.

A handler is found only by looking an operation's ``operationtype`` up here, never by importing
a name taken from data, so a message or a row can't make a worker run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from django.apps import apps
from django.utils.module_loading import module_has_submodule

from .conf import MAX_DURATION, MAX_QUEUE_LENGTH, MIN_LEASE, get_settings, is_queue_name
from .exceptions import HandlerRegistrationError, UnknownOperationTypeError
from .signals import log_event

if TYPE_CHECKING:
    from .models import BatchOperation

HandlerFunction = Callable[["BatchOperation"], Any]
Backoff = timedelta | float | int | Callable[[int], timedelta | float]
F = TypeVar("F", bound=HandlerFunction)

_OPERATIONTYPE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclasses.dataclass(frozen=True)
class Handler:
    """A registered handler and its options. ``None`` options fall back to the settings."""

    operationtype: str
    function: HandlerFunction
    queue: str | None = None
    max_attempts: int | None = None
    retry_backoff: Backoff | None = None
    lease: timedelta | None = None
    atomic: bool = False

    @property
    def name(self) -> str:
        return _qualified_name(self.function)

    def resolved_queue(self) -> str:
        settings = get_settings()
        return settings.ROUTES.get(self.operationtype) or self.queue or settings.DEFAULT_QUEUE

    def resolved_max_attempts(self) -> int:
        return self.max_attempts or get_settings().DEFAULT_MAX_ATTEMPTS

    def resolved_lease(self) -> timedelta:
        return self.lease or get_settings().DEFAULT_LEASE

    def backoff_for(self, attempt: int) -> timedelta:
        """Delay before the attempt after ``attempt`` (1-based): exponential by default, and
        never longer than ``MAX_RETRY_BACKOFF``.

        A callable ``retry_backoff`` may return a timedelta or a number of seconds. If it
        raises or returns anything else, the default backoff applies and a warning is logged:
        the failure it is called for must still be recorded.
        """
        return min(self._backoff_for(attempt), get_settings().MAX_RETRY_BACKOFF)

    def _backoff_for(self, attempt: int) -> timedelta:
        backoff = self.retry_backoff
        if callable(backoff):
            returned: Any
            try:
                returned = backoff(attempt)
            except Exception as exc:
                returned = exc
            delay = as_backoff(returned)
            if delay is not None:
                return delay
            log_event(
                logging.WARNING,
                "retry_backoff_invalid",
                operationtype=self.operationtype,
                attempt=attempt,
                returned=repr(returned),
                fallback="DEFAULT_RETRY_BACKOFF",
            )
            backoff = None
        base = get_settings().DEFAULT_RETRY_BACKOFF if backoff is None else backoff
        if not isinstance(base, timedelta):
            base = timedelta(seconds=base)
        try:
            return base * (2 ** max(0, attempt - 1))
        except OverflowError:  # beyond timedelta's range: past any cap
            return timedelta.max


def as_backoff(value: Any) -> timedelta | None:
    """``value`` as a backoff: a timedelta or a number of seconds, finite and not negative;
    ``None`` when it is not one."""
    if isinstance(value, timedelta):
        return value if value >= timedelta(0) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    try:
        return timedelta(seconds=value)
    except OverflowError:
        return None


def _same_handler(existing: Handler, registered: Handler) -> bool:
    """Whether ``registered`` may take the place of ``existing``: the same registration again,
    or the module-level function of a module imported again (``importlib.reload``), which
    holds the module's code now. Lambdas, functions made by a factory and bound methods share
    their names with others, so only the very same one counts."""
    if existing.function is registered.function:
        return existing == registered
    function = registered.function
    return (
        inspect.isfunction(function)
        and inspect.isfunction(existing.function)
        and "<" not in function.__qualname__  # <lambda>, <locals>
        and existing.name == registered.name
    )


class HandlerRegistry:
    """Maps operationtypes to handlers. Thread-safe to register into; read without locks."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()

    def register(self, registered: Handler) -> Handler:
        with self._lock:
            existing = self._handlers.get(registered.operationtype)
            if existing is not None and not _same_handler(existing, registered):
                raise HandlerRegistrationError(
                    f"Operationtype {registered.operationtype!r} is already handled by "
                    f"{existing.name}; cannot register {registered.name} for it too"
                    + (" with other options." if existing.function is registered.function else ".")
                )
            self._handlers[registered.operationtype] = registered
        return registered

    def unregister(self, operationtype: str) -> None:
        with self._lock:
            self._handlers.pop(operationtype, None)

    def get(self, operationtype: str) -> Handler | None:
        return self._handlers.get(operationtype)

    def __getitem__(self, operationtype: str) -> Handler:
        found = self._handlers.get(operationtype)
        if found is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise UnknownOperationTypeError(
                f"No handler is registered for operationtype {operationtype!r}. "
                f"Registered operationtypes: {known}."
            )
        return found

    def queue_for(self, operationtype: str) -> str:
        """The queue a new operation of ``operationtype`` goes to: its handler's (as routed),
        or, with no handler registered, its ``ROUTES`` entry or ``DEFAULT_QUEUE``."""
        found = self._handlers.get(operationtype)
        if found is not None:
            return found.resolved_queue()
        settings = get_settings()
        return settings.ROUTES.get(operationtype) or settings.DEFAULT_QUEUE

    def __contains__(self, operationtype: object) -> bool:
        return operationtype in self._handlers

    def __iter__(self) -> Iterator[Handler]:
        return iter(sorted(self._handlers.values(), key=lambda h: h.operationtype))

    def __len__(self) -> int:
        return len(self._handlers)

    def operationtypes(self) -> list[str]:
        return sorted(self._handlers)

    def operationtypes_for_queues(self, queues: list[str] | None) -> list[str]:
        """Registered operationtypes whose handler declares (or is routed to) one of ``queues``."""
        if queues is None:
            return self.operationtypes()
        return [h.operationtype for h in self if h.resolved_queue() in queues]


registry = HandlerRegistry()


def handler(
    operationtype: str,
    *,
    queue: str | None = None,
    max_attempts: int | None = None,
    retry_backoff: Backoff | None = None,
    lease: timedelta | float | None = None,
    atomic: bool = False,
) -> Callable[[F], F]:
    """Register the decorated function as the handler of ``operationtype``.

    The function is called as ``fn(operation)`` with the claimed
    :class:`~batchframework.models.BatchOperation`. What it returns (JSON-serializable) becomes
    ``output_data`` and the operation finishes as successful; if it raises, the attempt fails
    and is retried with backoff until ``max_attempts``. With ``atomic=True`` the handler's
    database writes and the finish commit in one transaction, so they happen exactly once.
    ``lease`` (at least a second; default ``DEFAULT_LEASE``) is how long a dead worker's
    operation waits before it is recovered; a live worker renews it.
    """
    if not isinstance(operationtype, str) or not _OPERATIONTYPE_RE.match(operationtype):
        raise HandlerRegistrationError(
            f"Invalid operationtype {operationtype!r}: use 1-255 letters, digits and . _ : -"
        )
    if queue is not None and not is_queue_name(queue):
        raise HandlerRegistrationError(
            f"queue must be a string of 1-{MAX_QUEUE_LENGTH} characters (no NUL), not {queue!r}"
        )
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise HandlerRegistrationError(
            f"max_attempts must be a positive integer, not {max_attempts!r}"
        )
    if not isinstance(atomic, bool):
        # A truthy string such as "no" would make the handler atomic.
        raise HandlerRegistrationError(f"atomic must be True or False, not {atomic!r}")
    if lease is not None:
        checked_lease = as_backoff(lease)
        if checked_lease is None or not MIN_LEASE <= checked_lease <= MAX_DURATION:
            raise HandlerRegistrationError(
                "lease must be at least a second and at most a hundred years (a timedelta or a "
                f"number of seconds), not {lease!r}"
            )
        lease = checked_lease
    if retry_backoff is not None and not callable(retry_backoff):
        checked = as_backoff(retry_backoff)
        if checked is None:
            raise HandlerRegistrationError(
                "retry_backoff must be a timedelta or a number of seconds (not negative), or a "
                f"callable taking the attempt number, not {retry_backoff!r}"
            )
        retry_backoff = checked

    def decorator(fn: F) -> F:
        if not callable(fn):
            raise HandlerRegistrationError(f"@handler({operationtype!r}) must decorate a callable")
        if _is_async(fn):
            # Called as fn(operation), it would return a coroutine that never runs, and every
            # attempt would fail on that return value.
            raise HandlerRegistrationError(
                f"@handler({operationtype!r}) must decorate a plain function, not an async "
                "one: handlers are called synchronously (run async code inside them with "
                "asgiref's async_to_sync)"
            )
        if _is_generator(fn):
            # Called, it would return a generator whose body never runs: every attempt would
            # fail on that return value, and the handler's code would never have run.
            raise HandlerRegistrationError(
                f"@handler({operationtype!r}) must decorate a function that returns its "
                "output, not a generator function (one with yield): its body would never run"
            )
        registry.register(
            Handler(
                operationtype=operationtype,
                function=fn,
                queue=queue,
                max_attempts=max_attempts,
                retry_backoff=retry_backoff,
                lease=lease,
                atomic=atomic,
            )
        )
        return fn

    return decorator


def _called_function(fn: Callable[..., Any]) -> Any:
    """What calling ``fn`` runs: the function under any ``functools.partial``, or an object's
    ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn if inspect.isroutine(fn) else type(fn).__call__


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a coroutine or an async generator: an ``async def``
    function (``functools.partial`` of one included), or an object whose ``__call__`` is one."""
    call = _called_function(fn)
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _is_generator(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a generator (its body runs only when iterated)."""
    return inspect.isgeneratorfunction(_called_function(fn))


def autodiscover() -> None:
    """Import the handler module (``batch_handlers`` by default) of every installed app."""
    for module_name in get_settings().HANDLER_MODULES:
        for app_config in apps.get_app_configs():
            if module_has_submodule(app_config.module, module_name):
                importlib.import_module(f"{app_config.name}.{module_name}")
