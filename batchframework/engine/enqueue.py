"""Storing operations: ``enqueue`` (one INSERT) and ``enqueue_many`` (one INSERT per chunk).

Everything is validated before anything is written, and the dispatcher is called only after
the enclosing transaction commits, on the alias the row was written to (invariant 5).
"""

from __future__ import annotations

import hashlib
import reprlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, OperationalError, connections, models, transaction
from django.db.models import F
from django.utils import timezone

from ..clock import STORABLE_RANGE, database_now, storable
from ..conf import get_settings, is_queue_name
from ..exceptions import InvalidOperationError, OperationStateError, UnknownOperationTypeError
from ..jsondata import encode_json
from ..models import BatchOperation, check_context_object, is_unsaved
from ..registry import registry
from ..signals import operations_enqueued
from ._common import is_deadlock, write_alias
from .bulk import Row, store
from .insert_postgresql import insert

#: How often a ``replace=True`` enqueue retries when a concurrent one won the insert.
_REPLACE_ATTEMPTS = 8


def resolve_run_after(
    delay: timedelta | float | None, run_after: datetime | None, using: str | None = None
) -> datetime:
    """The due time from ``delay`` or ``run_after`` (at most one), validated.

    A ``delay`` counts from the database's clock (see :func:`batchframework.clock.database_now`).
    """
    if delay is not None and run_after is not None:
        raise InvalidOperationError("Pass either delay or run_after, not both.")
    if run_after is not None:
        if not isinstance(run_after, datetime):
            raise InvalidOperationError(f"run_after must be a datetime, not {run_after!r}.")
        if timezone.is_naive(run_after):
            raise InvalidOperationError(
                "run_after must be timezone-aware (e.g. django.utils.timezone.now() + delta); "
                "a naive datetime is ambiguous."
            )
        if not storable(run_after):
            raise InvalidOperationError(f"run_after must be {STORABLE_RANGE}, not {run_after}.")
        return run_after
    if delay is None:
        # Due now: by this process's clock and by the database's, whichever is earlier, and
        # in whole milliseconds (SQLite's clock reads no finer), so that a claim straight
        # after (a test's run_due(), a message) finds it due.
        now = min(timezone.now(), database_now(using))
        return now.replace(microsecond=now.microsecond - now.microsecond % 1000)
    delay = _as_delay(delay)
    now = database_now(using)
    try:
        due = now + delay
    except OverflowError:
        due = None
    if due is None or not storable(due):
        raise InvalidOperationError(
            f"delay {delay!r} is too large: the due time must be {STORABLE_RANGE}."
        )
    return due


def _as_delay(delay: Any) -> timedelta:
    given = delay  # for messages: as the caller wrote it, not timedelta(days=-1, ...)
    if isinstance(delay, bool) or not isinstance(delay, timedelta | int | float):
        raise InvalidOperationError(
            f"delay must be a timedelta or a number of seconds, not {delay!r}."
        )
    if not isinstance(delay, timedelta):
        if delay != delay or delay in (float("inf"), float("-inf")):  # NaN or infinite
            raise InvalidOperationError(f"delay must be a finite number of seconds, not {delay!r}.")
        try:
            delay = timedelta(seconds=delay)
        except OverflowError as exc:
            raise InvalidOperationError(f"delay {delay!r} seconds is too large.") from exc
    if delay < timedelta(0):
        raise InvalidOperationError(f"delay must not be negative, got {given!r}.")
    return delay


def _check_operationtype(operationtype: Any) -> None:
    """Refuse what can't name a handler before the registry is asked: a list or a dict would
    fail there as unhashable, with a ``TypeError`` that names neither argument nor fix."""
    if not isinstance(operationtype, str):
        raise UnknownOperationTypeError(
            f"operationtype must be a string naming a registered handler, not {operationtype!r}."
        )


def _checked_alias(using: Any) -> str:
    """The database to write to, refusing a ``using`` that names none of ``DATABASES`` with
    this library's error (Django's would come from the first query, and a non-string alias
    fails as a confusing ``TypeError``)."""
    if using is not None and (not isinstance(using, str) or using not in connections):
        raise InvalidOperationError(
            f"using must be the alias of a database in DATABASES "
            f"({', '.join(map(repr, connections))}), not {using!r}."
        )
    return write_alias(using)


def _check_replace(replace: Any) -> None:
    # Not truthiness: replace="no" would debounce, updating an operation the caller meant to
    # keep (the @handler decorator refuses a non-bool ``atomic`` for the same reason).
    if not isinstance(replace, bool):
        raise InvalidOperationError(f"replace must be True or False, not {replace!r}.")


@dataclass(frozen=True)
class _Context:
    content_type: ContentType | None
    object_id: str | None


#: The context of operations about no object (one instance: ``enqueue_many`` asks per item).
_NO_CONTEXT = _Context(None, None)


def _resolve_context(context_object: models.Model | None, alias: str) -> _Context:
    if context_object is None:
        return _NO_CONTEXT
    check_context_object(context_object)
    content_type = ContentType.objects.db_manager(alias).get_for_model(context_object)
    return _Context(content_type, str(context_object.pk))


def _check_started_by(started_by: Any) -> None:
    if started_by is None:
        return
    user_model = BatchOperation._meta.get_field("started_by").related_model
    if not isinstance(started_by, user_model) or is_unsaved(started_by):
        raise InvalidOperationError(
            "started_by must be a saved user instance or None "
            f"(got {started_by!r}; pass None for anonymous users)."
        )


def _check_priority(priority: Any) -> int:
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not -32768 <= priority <= 32767
    ):
        raise InvalidOperationError(
            f"priority must be an integer from -32768 to 32767, not {priority!r}."
        )
    return priority


def _debounce_key(operationtype: str, context: _Context) -> str:
    content_type_id = context.content_type.pk if context.content_type else ""
    raw = f"{operationtype}\x00{content_type_id}\x00{context.object_id or ''}"
    return hashlib.sha256(raw.encode()).hexdigest()


def _created_now(using: str) -> datetime:
    """An operation's ``created_datetime``: the earlier of this process's clock and the
    database's. The poller's window leaves to the publishers what falls due within
    ``DISPATCH_HORIZON`` of it, and a publisher (the web process, a relay, a retry) judges by the
    later of its own clock and the database's: from a web server whose clock runs ahead, an
    operation could otherwise fall between the two and wait for a drain, a poll interval late."""
    return min(timezone.now(), database_now(using))


def _build(
    operationtype: str,
    *,
    context: _Context,
    input_data: Any,
    run_after: datetime,
    started_by: Any,
    queue: str | None,
    priority: int,
    created: datetime,
) -> BatchOperation:
    registered = registry[operationtype]  # raises UnknownOperationTypeError, listing known types
    if input_data is not None:
        encode_json(input_data, max_bytes=get_settings().MAX_INPUT_BYTES)
    if queue is not None and not is_queue_name(queue):
        raise InvalidOperationError(
            "queue must be a non-empty string of at most 100 characters (and no NUL), "
            f"not {queue!r}."
        )
    return BatchOperation(
        operationtype=operationtype,
        context_content_type=context.content_type,
        context_object_id=context.object_id,
        input_data=input_data,
        run_after=run_after,
        started_by=started_by,
        queue=queue or registered.resolved_queue(),
        priority=priority,
        status=BatchOperation.STATUS_UNPROCESSED,
        created_datetime=created,
    )


def enqueue(
    operationtype: str,
    *,
    context_object: models.Model | None = None,
    input_data: Any = None,
    delay: timedelta | float | None = None,
    run_after: datetime | None = None,
    started_by: Any = None,
    queue: str | None = None,
    priority: int = 0,
    replace: bool = False,
    using: str | None = None,
) -> BatchOperation:
    """Store an operation for the handler of ``operationtype`` and dispatch it after commit.

    ``delay`` (a timedelta or seconds) or ``run_after`` (an aware datetime) sets when it is
    due; by default it is due now. With ``replace=True``, an unprocessed operation of the same
    operationtype and context object is updated instead (debounce; see :doc:`howto/debounce`
    for which one, when an attempt put back for a retry is pending too).
    Raises a subclass of :class:`~batchframework.exceptions.InvalidOperationError` and writes
    nothing when an argument is invalid.
    """
    _check_operationtype(operationtype)
    _check_replace(replace)
    alias = _checked_alias(using)
    due = resolve_run_after(delay, run_after, alias)
    _check_started_by(started_by)
    _check_dispatcher()
    context = _resolve_context(context_object, alias)
    operation = _build(
        operationtype,
        context=context,
        input_data=input_data,
        run_after=due,
        started_by=started_by,
        queue=queue,
        priority=_check_priority(priority),
        created=_created_now(alias),
    )
    if replace:
        operation = _insert_or_replace(operation, _debounce_key(operationtype, context), alias)
        _after_enqueue([operation], alias)
        return operation
    channel = _notify_channel(alias)
    insert(operation, alias=alias, notify=channel)
    _after_enqueue([operation], alias, announced=channel is not None)
    return operation


def _check_dispatcher() -> None:
    """Raise ``ImproperlyConfigured`` for a dispatcher that is not one, before anything is
    written rather than after (cached: no cost once it is built)."""
    from ..dispatch import get_dispatcher

    get_dispatcher()


def _notify_channel(alias: str) -> str | None:
    from ..dispatch import get_dispatcher

    if connections[alias].vendor != "postgresql":
        return None
    return get_dispatcher().notify_channel(alias)


def _insert_or_replace(operation: BatchOperation, key: str, alias: str) -> BatchOperation:
    """Update the pending operation of this operationtype and context, or insert one.

    Race-free: the operation updated or inserted carries ``debounce_key``, unique among pending
    operations, so of two concurrent inserts one fails and retries as an update of the other's
    row. Exactly one row is updated: the key's holder, else the newest pending one. Others may
    be pending too — an attempt that failed and waits for its retry, or one a stopping worker
    gave back, while a change made during its run was stored as a new operation; or plain
    enqueues — and they keep their own values: updating them as well would make the same
    work run twice.
    """
    manager = BatchOperation.objects.db_manager(alias)
    pending = manager.unprocessed().filter(
        operationtype=operation.operationtype,
        context_content_type=operation.context_content_type,
        context_object_id=operation.context_object_id,
    )
    changes = {
        "run_after": operation.run_after,
        "input_data": operation.input_data,
        "priority": operation.priority,
        "queue": operation.queue,
        "started_by": operation.started_by,
        "debounce_key": key,
    }
    # Our own transaction, not a caller's: one a deadlock rolled back can be run again.
    outermost = not connections[alias].in_atomic_block
    for _ in range(_REPLACE_ATTEMPTS):
        try:
            with transaction.atomic(using=alias):
                current = (
                    pending.select_for_update()
                    .order_by(F("debounce_key").asc(nulls_last=True), "-pk")
                    .first()
                )
                try:
                    with transaction.atomic(using=alias):
                        if current is not None:
                            # Still pending? (Without row locks, SQLite, a claim may have won
                            # it.)
                            if not pending.filter(pk=current.pk).update(**changes):
                                continue
                            for name, value in changes.items():
                                setattr(current, name, value)
                            return current
                        operation.debounce_key = key
                        insert(operation, alias=alias)
                except IntegrityError:
                    # Another pending operation took the key meanwhile: update that one.
                    operation.pk = None
                    operation._state.adding = True
                    continue
                return operation
        except OperationalError as exc:
            # MySQL/MariaDB: two concurrent ``FOR UPDATE`` reads that found nothing hold gap
            # locks, and their INSERTs deadlock; InnoDB rolls back the whole transaction. In
            # a caller's transaction that is the caller's to retry.
            if not (outermost and is_deadlock(exc)):
                raise
            operation.pk = None
            operation._state.adding = True
    raise OperationStateError(
        f"Could not enqueue {operation.operationtype!r} with replace=True: "
        f"{_REPLACE_ATTEMPTS} concurrent attempts conflicted."
    )


def enqueue_many(
    operationtype: str,
    items: Iterable[Mapping[str, Any]],
    *,
    delay: timedelta | float | None = None,
    run_after: datetime | None = None,
    started_by: Any = None,
    queue: str | None = None,
    priority: int = 0,
    batch_size: int = 1000,
    using: str | None = None,
) -> list[BatchOperation]:
    """Store many operations of one operationtype: one INSERT per ``batch_size`` chunk.

    Each item is a mapping with optional ``context_object``, ``input_data``, ``delay``,
    ``run_after`` and ``priority`` keys overriding the call's defaults (a ``delay`` or
    ``run_after`` of ``None`` counts as not given). All items are validated before the first
    INSERT; an invalid item writes nothing.
    """
    _check_operationtype(operationtype)
    alias = _checked_alias(using)
    items = _iterable_items(items)
    _check_started_by(started_by)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOperationError(f"batch_size must be a positive integer, not {batch_size!r}.")
    allowed = {"context_object", "input_data", "delay", "run_after", "priority"}
    max_bytes = get_settings().MAX_INPUT_BYTES
    # The call's shared values (and their validation: operationtype, queue, priority).
    template = _build(
        operationtype,
        context=_NO_CONTEXT,
        input_data=None,
        run_after=timezone.now(),
        started_by=started_by,
        queue=queue,
        priority=_check_priority(priority),
        created=_created_now(alias),
    )
    # Items without a time of their own share the call's, computed (and validated) once.
    call_due = resolve_run_after(delay, run_after, alias)
    rows: list[Row] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidOperationError(
                f"enqueue_many item {index} must be a mapping (such as a dict with an "
                f"'input_data' key), not {reprlib.repr(item)}."
            )
        unknown = set(item) - allowed
        if unknown:
            raise InvalidOperationError(
                f"enqueue_many item {index} has unknown key(s) {sorted(unknown, key=repr)}; "
                f"allowed: {sorted(allowed)}."
            )
        try:
            # ``None`` is "not given", as for enqueue() (``{"run_after": obj.scheduled_at}``
            # of an object that has none): the call's time, not "due now".
            due = (
                resolve_run_after(item.get("delay"), item.get("run_after"), alias)
                if item.get("delay") is not None or item.get("run_after") is not None
                else call_due
            )
            context = _resolve_context(item.get("context_object"), alias)
            input_data = item.get("input_data")
            rows.append(
                Row(
                    context_content_type=context.content_type,
                    context_object_id=context.object_id,
                    input_data=input_data,
                    input_json=None
                    if input_data is None
                    else encode_json(input_data, max_bytes=max_bytes),
                    run_after=due,
                    priority=_check_priority(item.get("priority", priority)),
                )
            )
        except InvalidOperationError as exc:
            raise type(exc)(f"enqueue_many item {index}: {exc}") from exc
    if not rows:
        return []
    with transaction.atomic(using=alias):
        created = store(template, rows, alias=alias, batch_size=batch_size)
        _after_enqueue(created, alias)
    return created


def _iterable_items(items: Any) -> Iterator[Any]:
    """``items`` as an iterator, refused when it is no collection of items: ``None`` or a
    number would fail as "not iterable", and one mapping alone would be taken for its keys
    (``{"input_data": 1}`` as the items "input_data", reported as unknown keys '_', 'a'...)."""
    expected = "an iterable of items, one mapping per operation ([{'input_data': ...}, ...])"
    if isinstance(items, Mapping | str | bytes):
        raise InvalidOperationError(
            f"enqueue_many takes {expected}, not a single {type(items).__name__} "
            f"{reprlib.repr(items)}: for one operation, pass [item]."
        )
    try:
        return iter(items)
    except TypeError:
        raise InvalidOperationError(
            f"enqueue_many takes {expected}, not {reprlib.repr(items)}."
        ) from None


def _after_enqueue(
    operations: list[BatchOperation], alias: str, *, announced: bool = False
) -> None:
    """Signal, and dispatch after commit unless the INSERT announced them already (NOTIFY,
    delivered on commit to the dispatcher's listener)."""
    operations_enqueued.send(sender=BatchOperation, operations=operations)
    if not announced:
        dispatch_on_commit(operations, alias)


def dispatch_on_commit(operations: list[BatchOperation], alias: str) -> None:
    """Hand ``operations`` to the dispatcher once the transaction on ``alias`` commits."""
    from ..dispatch import get_dispatcher

    dispatcher = get_dispatcher()
    if dispatcher.dispatches_anything:
        transaction.on_commit(
            lambda: dispatcher.dispatch_safely(operations, using=alias), using=alias
        )
